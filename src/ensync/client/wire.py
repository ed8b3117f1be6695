"""What the two network transports share: `WireTransport`.

A network transport connects, authenticates, sizes its calls in flight by
what the engine advertised and, when the engine offers ensync's batched
session (`ensync.client.session`), moves publishes, settlements,
observations and (if the engine agrees) deliveries onto it. What is left to
each wire protocol is small: how to dial and authenticate, how to open the
session's `FrameLink`, the official calls used without a session, and
subscribing, pausing, replaying and heartbeats, which always use the wire's
own calls.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ensync import errors
from ensync.client.limiter import CallLimiter, LimiterStatistics
from ensync.client.session import SUBSCRIPTION_CREDIT, FrameLink, SessionStream
from ensync.client.transport import (
    ConnectInfo,
    Deliver,
    LostCallback,
    Observer,
    Settlement,
    WireReplay,
)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "Authenticated", "WireTransport"]

# Calls on the wire at once when the engine does not say how many it takes.
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class Authenticated:
    """What a wire protocol's connect learnt (see `WireTransport._authenticate`).

    Attributes:
        info: the engine's answer, as the client sees it.
        max_in_flight: calls to keep on the wire at once.
        offers_session: whether to try the batched session.
    """

    info: ConnectInfo
    max_in_flight: int
    offers_session: bool


class WireTransport(ABC):
    """A `ClientTransport` over a network link, with the batched session when offered.

    Args:
        call_timeout_s: how long a call may wait for its answer.
    """

    def __init__(self, *, call_timeout_s: float) -> None:
        self._timeout = call_timeout_s
        self._client_id = ""
        self._lost: LostCallback | None = None
        self._lost_reported = False
        self._closed = False
        self._limiter = CallLimiter(DEFAULT_MAX_IN_FLIGHT)
        # ensync's batched session, when the engine offers one (off: the
        # official calls only, as against an engine without it).
        self.use_session = True
        self._batched: SessionStream | None = None
        # Where deliveries of each subscribed name go, on any path.
        self._routes: dict[str, Deliver] = {}

    def statistics(self) -> LimiterStatistics:
        """Calls on the wire and calls waiting for room."""
        return self._limiter.statistics()

    # ------------------------------------------------------------------ the wire's part

    @abstractmethod
    async def _authenticate(self, app_key: str) -> Authenticated:
        """Dial the engine and authenticate with ``app_key``."""

    @abstractmethod
    async def _open_session(self) -> SessionStream | None:
        """Open the batched session; ``None`` if the engine turns out to have none.

        Started with `_start_session` over the wire's link.
        """

    @abstractmethod
    async def _publish_unbatched(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> str:
        """Publish with the wire's own call; the idem."""

    @abstractmethod
    async def _settle_unbatched(self, settlement: Settlement) -> int | None:
        """Settle with the wire's own call."""

    @abstractmethod
    async def _subscribe_wire(self, name: str) -> None:
        """Ask the engine for deliveries of ``name`` (they go to ``_routes``)."""

    @abstractmethod
    async def _unsubscribe_wire(self, name: str) -> None:
        """Ask the engine to stop delivering ``name``."""

    @abstractmethod
    async def _close_wire(self) -> None:
        """Close the link and end every task of the wire protocol."""

    @abstractmethod
    async def heartbeat(self) -> None:
        """Prove liveness; raises EnSyncConnectionError if the session is gone."""

    @abstractmethod
    async def replay(self, name: str, idem: str) -> WireReplay:
        """Read a message of the app back by idem."""

    @abstractmethod
    async def pause(self, name: str, reason: str) -> None:
        """No new deliveries of ``name`` until `resume`."""

    @abstractmethod
    async def resume(self, name: str) -> None:
        """Undo `pause`."""

    # ------------------------------------------------------------------ shared

    async def connect(self, app_key: str, lost: LostCallback) -> ConnectInfo:
        """Authenticate, then open the batched session if the engine offers it."""
        self._lost = lost
        answer = await self._authenticate(app_key)
        self._client_id = answer.info.client_id
        self._limiter.resize(answer.max_in_flight)
        if self.use_session and answer.offers_session:
            self._batched = await self._open_session()
        return answer.info

    async def _start_session(self, link: FrameLink) -> SessionStream:
        """Start the session on ``link`` (see `SessionStream.start`)."""
        return await SessionStream.start(
            link,
            self._client_id,
            timeout_s=self._timeout,
            route=self._routes.get,
            lost=self._report_lost,
        )

    async def publish(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> str:
        """Publish one envelope to one recipient; the idem."""
        if self._batched is not None:
            return await self._batched.publish(name, recipient, payload, metadata, payload_metadata)
        return await self._publish_unbatched(name, recipient, payload, metadata, payload_metadata)

    async def settle(self, settlement: Settlement) -> int | None:
        """Settle one message (see `Settlement`)."""
        if self._batched is not None:
            return await self._batched.settle(settlement)
        return await self._settle_unbatched(settlement)

    def settle_soon(
        self, settlement: Settlement, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Settle without awaiting, on the session; ``None`` without one."""
        if self._batched is None:
            return None
        return self._batched.settle_soon(settlement, failed)

    async def subscribe(self, name: str, deliver: Deliver) -> None:
        """Start receiving ``name``."""
        if self._closed:
            raise errors.EnSyncConnectionError("the connection is closed")
        # Routed first: deliveries may follow the engine's answer at once.
        self._routes[name] = deliver
        try:
            await self._subscribe_wire(name)
        except BaseException:
            if self._routes.get(name) is deliver:
                del self._routes[name]
            raise
        if self._batched is not None and self._batched.deliveries:
            self._batched.credit(name, SUBSCRIPTION_CREDIT)

    async def unsubscribe(self, name: str) -> None:
        """Stop receiving ``name``."""
        await self._unsubscribe_wire(name)
        self._routes.pop(name, None)

    def consumed(self, name: str) -> None:
        """A delivery was taken up: one more credit.

        The session's flow control; the official protocols have none.
        """
        if self._batched is not None and self._batched.deliveries and name in self._routes:
            self._batched.credit(name, 1)

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Copies of the app's new messages matching ``pattern`` (session only)."""
        if self._batched is None:
            raise _observing_needs_the_session()
        await self._batched.observe(pattern, observer)

    async def unobserve(self, pattern: str) -> None:
        """Stop the copies for ``pattern``."""
        if self._batched is None:
            raise _observing_needs_the_session()
        await self._batched.unobserve(pattern)

    async def close(self) -> None:
        """Say goodbye on the session, close the link; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._limiter.close(errors.EnSyncConnectionError("the connection was closed"))
        if self._batched is not None:
            await self._batched.close()
        await self._close_wire()

    def _report_lost(self, exc: BaseException) -> None:
        """The link broke: tell the connection, once (never after close)."""
        if self._closed or self._lost_reported:
            return
        self._lost_reported = True
        if self._lost is not None:
            self._lost(exc)


def _observing_needs_the_session() -> errors.EnSyncSubscriptionError:
    return errors.EnSyncSubscriptionError(
        "observing needs the batched session, which this connection does not use"
    )
