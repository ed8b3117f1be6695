"""What a subscription needs from its client, and what it reports of itself."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ensync import errors
from ensync.client.transport import ClientTransport, Settlement

if TYPE_CHECKING:
    from ensync.client.subscription import Subscription

__all__ = ["SubscriptionLink", "SubscriptionStatistics", "settle_quietly"]

log = logging.getLogger(__name__)


class SubscriptionLink(Protocol):
    """What a subscription needs from its client, and nothing more."""

    @property
    def ack_deadline_ms(self) -> int | None:
        """The engine's ack deadline, if it said (leases are kept within it)."""
        ...

    def transport(self) -> ClientTransport:
        """The live transport; raises EnSyncConnectionError while the link is down."""
        ...

    async def pause(self, name: str, reason: str) -> None:
        """Pause ``name`` for the client (and after a reconnect)."""
        ...

    async def resume(self, name: str) -> None:
        """Resume ``name`` for the client."""
        ...

    async def unsubscribe(self, name: str) -> None:
        """Unsubscribe the client from ``name``."""
        ...

    def report(self, error: errors.EnSyncError) -> None:
        """Tell the application (``error`` listeners) about a failure."""
        ...

    def consumed(self, name: str) -> None:
        """A delivery was taken up: the engine may send another (flow control)."""
        ...

    def forget(self, subscription: Subscription) -> None:
        """The subscription ended: the client no longer lists it."""
        ...


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of a `Subscription`.

    Attributes:
        buffered: messages received and not yet handled.
        handlers: registered handlers.
        iterators: ``async for`` loops running.
        leases_kept: messages whose lease the subscription keeps extending.
    """

    buffered: int
    handlers: int
    iterators: int
    leases_kept: int


async def settle_quietly(link: SubscriptionLink, settlement: Settlement, *, report: bool) -> None:
    """Settle in the background.

    A failure goes to the error listeners (``report``) or to the debug log.
    """
    try:
        await link.transport().settle(settlement)
    except errors.EnSyncError as exc:
        if report:
            link.report(exc)
        else:
            log.debug("could not %s %s: %s", settlement.kind.value, settlement.idem, exc)
