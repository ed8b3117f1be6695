"""The engine's operations one call at a time, as tests make them.

Transports hand :class:`~ensync.server.runtime.operations.Operations` batches
of call values; a test usually makes one call and awaits its answer.
"""

from __future__ import annotations

from ensync.server.core.calls import (
    Pause,
    Publish,
    Replay,
    Resume,
    Settle,
    SettleKind,
    Subscribe,
    Unsubscribe,
)
from ensync.server.core.model import ReplayResult, SessionInfo, SessionRouter
from ensync.server.runtime.engine import Engine

__all__ = ["Calls"]


class Calls:
    """One call at a time to ``engine.operations``."""

    def __init__(self, engine: Engine) -> None:
        self.ops = engine.operations

    async def connect(self, app_key: str, router: SessionRouter) -> SessionInfo:
        return await self.ops.connect(app_key, router)

    def heartbeat(self, client_id: str) -> bool:
        return self.ops.heartbeat(client_id)

    def disconnect(self, client_id: str) -> None:
        self.ops.gone(client_id)

    def routes_changed(self, client_id: str) -> None:
        self.ops.routes_changed(client_id)

    async def publish(
        self,
        client_id: str,
        name: str,
        payload: str,
        recipient: str,
        metadata: str,
        payload_metadata: str | None = None,
    ) -> str:
        call = Publish(client_id, name, payload, recipient, metadata, payload_metadata)
        (answer,) = await self.ops.publish([call])
        return await answer

    async def _settle(self, call: Settle) -> int | None:
        (answer,) = self.ops.settle([call])
        return await answer

    async def ack(self, client_id: str, idem: str) -> None:
        await self._settle(Settle(client_id, idem))

    async def defer(self, client_id: str, idem: str, delay_ms: int, reason: str) -> int:
        when = await self._settle(
            Settle(client_id, idem, SettleKind.DEFER, delay_ms=delay_ms, reason=reason)
        )
        assert when is not None
        return when

    async def discard(self, client_id: str, idem: str, reason: str) -> None:
        await self._settle(Settle(client_id, idem, SettleKind.DISCARD, reason=reason))

    async def extend(self, client_id: str, idem: str) -> int:
        deadline = await self._settle(Settle(client_id, idem, SettleKind.EXTEND))
        assert deadline is not None
        return deadline

    async def release(self, client_id: str, idem: str, reason: str) -> int | None:
        return await self._settle(Settle(client_id, idem, SettleKind.RELEASE, reason=reason))

    async def replay(self, client_id: str, idem: str) -> ReplayResult:
        return await self.ops.replay(Replay(client_id, idem))

    def subscribe(self, client_id: str, name: str) -> None:
        self.ops.subscribe(Subscribe(client_id, name))

    def unsubscribe(self, client_id: str, name: str) -> bool:
        return self.ops.unsubscribe(Unsubscribe(client_id, name))

    def pause(self, client_id: str, name: str, reason: str = "") -> None:
        self.ops.pause(Pause(client_id, name, reason))

    def resume(self, client_id: str, name: str) -> None:
        self.ops.resume(Resume(client_id, name))
