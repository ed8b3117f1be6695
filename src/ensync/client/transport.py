"""The seam between the SDK and a wire protocol.

A transport is one authenticated connection to an engine. The SDK's client,
subscriptions and reconnection logic are written once over this protocol;
`ensync.client.grpc` and the WebSocket transport implement it.

Transports raise only `ensync.errors` exceptions: an
`EnSyncConnectionError` when the link is the problem,
the operation's own error class when the engine refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ensync.errors import EnSyncError
from ensync.protocol.records import Delivery, ReplayInfo

__all__ = [
    "ClientTransport",
    "ConnectInfo",
    "Delivery",
    "LostCallback",
    "Observer",
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


@dataclass(frozen=True, slots=True)
class WireReplay:
    """A replayed message and the engine's replay information (if it sent any)."""

    message: Delivery
    info: ReplayInfo | None


LostCallback = Callable[[BaseException], None]


class Observer(Protocol):
    """Where observed copies of one pattern go (``EnSyncClient.observe``)."""

    def copied(self, delivery: Delivery) -> None:
        """One copy of a new message whose name matches the pattern."""
        ...

    def dropped(self, count: int) -> None:
        """The engine dropped ``count`` copies for this session (read too slowly)."""
        ...


class ClientTransport(Protocol):
    """One connection to an engine. Create, ``connect``, use, ``close``."""

    @property
    def client_id(self) -> str:
        """The id the engine issued at connect ("" before)."""
        ...

    async def connect(self, app_key: str) -> ConnectInfo:
        """Open the link and authenticate; raises EnSyncAuthError or EnSyncConnectionError."""
        ...

    def on_lost(self, callback: LostCallback) -> None:
        """Call ``callback`` once if the link breaks after connect (not on close)."""
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

    async def subscribe(self, name: str, deliver: Callable[[Delivery], None]) -> None:
        """Start receiving ``name``; ``deliver`` is called for every message, in order."""
        ...

    async def unsubscribe(self, name: str) -> None: ...

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Receive copies of the app's new messages matching ``pattern``
        without taking them; raises EnSyncSubscriptionError if refused."""
        ...

    async def unobserve(self, pattern: str) -> None: ...

    def consumed(self, name: str) -> None:
        """A delivery of ``name`` was taken up by the application: the engine
        may send one more (flow control; a no-op where the wire has none)."""
        ...

    async def ack(self, name: str, idem: str, block: int) -> None: ...

    def ack_soon(
        self, name: str, idem: str, block: int, failed: Callable[[EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Send an ack without awaiting it; ``failed(error)`` hears if it fails.
        Returns a future done once answered, or ``None`` when this transport
        cannot now (the caller then awaits `ack`)."""
        ...

    async def defer(self, name: str, idem: str, delay_ms: int, reason: str) -> int:
        """Returns the scheduled delivery time (epoch ms)."""
        ...

    async def discard(self, name: str, idem: str, reason: str) -> None: ...

    async def extend(self, name: str, idem: str) -> int:
        """Push back the ack deadline of a message in flight; returns the new one."""
        ...

    async def release(self, name: str, idem: str, reason: str) -> int | None:
        """Give a message back unsettled (its handler failed); returns when it is
        visible again, ``None`` if the engine dead-lettered it."""
        ...

    async def replay(self, name: str, idem: str) -> WireReplay: ...

    async def pause(self, name: str, reason: str) -> None: ...

    async def resume(self, name: str) -> None: ...

    async def close(self) -> None:
        """Close the link; idempotent; does not trigger the lost callback."""
        ...
