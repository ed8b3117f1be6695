"""The seam between the SDK and an engine.

A transport is one authenticated connection to an engine. The SDK's client,
subscriptions and reconnection logic are written once over this protocol;
the gRPC and WebSocket transports implement it over the network
(`ensync.client.wire`), and `ensync.testing.MemoryTransport` over an engine
in the same process.

Transports raise only `ensync.errors` exceptions: an
`EnSyncConnectionError` when the link is the problem,
the operation's own error class when the engine refused.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ensync import errors
from ensync.protocol.records import Delivery, ReplayInfo

__all__ = [
    "ClientTransport",
    "ConnectInfo",
    "Deliver",
    "Delivery",
    "LostCallback",
    "Observer",
    "SettleKind",
    "Settlement",
    "WireReplay",
    "digits",
]


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """The engine's answer to a successful connect."""

    client_id: str
    client_hash: str
    # The engine's ack deadline when it says (ensync does): the SDK extends
    # leases of long-running handlers before it passes.
    ack_deadline_ms: int | None = None
    # The engine's limit on a payload's JSON (before encryption) when it says.
    max_payload_bytes: int | None = None
    # The connected app's id when the engine says (ensync does).
    app_id: str | None = None


def digits(value: str) -> int | None:
    """A whole number the engine advertised, or None when it did not say."""
    return int(value) if value.isdigit() else None


class SettleKind(enum.Enum):
    """What a settlement does with a message in flight."""

    ACK = "ack"  # done; kept for replay
    DEFER = "defer"  # delivered again after ``delay_ms``
    DISCARD = "discard"  # never delivered again; to the dead letters
    EXTEND = "extend"  # the ack deadline moves out
    RELEASE = "release"  # given back unsettled (its handler failed)


_SETTLE_ERRORS: dict[SettleKind, type[errors.EnSyncError]] = {
    SettleKind.ACK: errors.EnSyncAckError,
    SettleKind.DEFER: errors.EnSyncDeferError,
    SettleKind.DISCARD: errors.EnSyncDiscardError,
    SettleKind.EXTEND: errors.EnSyncAckError,
    SettleKind.RELEASE: errors.EnSyncAckError,
}


@dataclass(frozen=True, slots=True)
class Settlement:
    """One message settled: what to do with it and the fields that kind uses.

    The answer (`ClientTransport.settle`) is a time for ``DEFER`` (when it
    is delivered again), ``EXTEND`` (the new ack deadline) and ``RELEASE``
    (when it is delivered again, ``None`` if the engine dead-lettered it);
    ``None`` for ``ACK`` and ``DISCARD``. All times are epoch milliseconds.
    """

    kind: SettleKind
    name: str
    idem: str
    # The message's block: the official ack calls carry it.
    block: int = 0
    delay_ms: int = 0
    reason: str = ""

    @property
    def error(self) -> type[errors.EnSyncError]:
        """The error class of a refusal of this kind."""
        return _SETTLE_ERRORS[self.kind]


@dataclass(frozen=True, slots=True)
class WireReplay:
    """A replayed message and the engine's replay information (if it sent any)."""

    message: Delivery
    info: ReplayInfo | None


LostCallback = Callable[[BaseException], None]
Deliver = Callable[[Delivery], None]


class Observer(Protocol):
    """Where observed copies of one pattern go (``EnSyncClient.observe``)."""

    def copied(self, delivery: Delivery) -> None:
        """One copy of a new message whose name matches the pattern."""
        ...

    def dropped(self, count: int) -> None:
        """The engine dropped ``count`` copies for this session (read too slowly)."""
        ...


class ClientTransport(Protocol):
    """One connection to an engine. Create, ``connect``, use, ``close``.

    Every call but ``connect`` is made after a successful ``connect``.
    """

    async def connect(self, app_key: str, lost: LostCallback) -> ConnectInfo:
        """Open the link and authenticate.

        ``lost(cause)`` is called once if the link breaks later (never after
        ``close``).

        Raises:
            EnSyncAuthError: the key was refused.
            EnSyncConnectionError: the engine cannot be reached.
        """
        ...

    async def heartbeat(self) -> None:
        """Prove liveness; raises EnSyncConnectionError if the session is gone."""
        ...

    async def publish(
        self,
        name: str,
        recipient: str,
        payload: str,
        metadata: str,
        payload_metadata: str | None,
    ) -> str:
        """Publish one envelope to one recipient; returns the idem."""
        ...

    async def subscribe(self, name: str, deliver: Deliver) -> None:
        """Start receiving ``name``; ``deliver`` is called for every message, in order."""
        ...

    async def unsubscribe(self, name: str) -> None:
        """Stop receiving ``name``."""
        ...

    def consumed(self, name: str) -> None:
        """A delivery of ``name`` was taken up: the engine may send one more.

        Flow control; a no-op where the wire has none.
        """
        ...

    async def settle(self, settlement: Settlement) -> int | None:
        """Settle one message; the answer `Settlement` describes.

        Raises:
            EnSyncError: ``settlement.error`` if the engine refused.
        """
        ...

    def settle_soon(
        self, settlement: Settlement, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Send a settlement without awaiting it; ``failed(error)`` hears if it fails.

        Returns a future done once answered, or ``None`` when this transport
        cannot now (the caller then awaits `settle`).
        """
        ...

    async def replay(self, name: str, idem: str) -> WireReplay:
        """Read a message of the app back by idem (``name`` may be empty)."""
        ...

    async def pause(self, name: str, reason: str) -> None:
        """No new deliveries of ``name`` until `resume`."""
        ...

    async def resume(self, name: str) -> None:
        """Undo `pause`."""
        ...

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Receive copies of the app's new messages matching ``pattern``, without taking them.

        Raises EnSyncSubscriptionError if refused.
        """
        ...

    async def unobserve(self, pattern: str) -> None:
        """Stop the copies for ``pattern``."""
        ...

    async def close(self) -> None:
        """Close the link; idempotent; never calls the ``lost`` callback."""
        ...
