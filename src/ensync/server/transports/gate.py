"""Connection caps of the HTTP listeners: in total and per client address.

A connection past a cap is closed as soon as it is accepted, before it costs
more than its descriptor; each refusal is counted in ``/metrics``
(``ensync_limit_rejections_total{limit="connections"}`` and
``{limit="connections_per_address"}``) and logged at most once a second per
kind. The gRPC listener's total is grpcio's own
(``grpc.max_allowed_incoming_connections``), which offers no per-address cap.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection

from ensync.server.core.throttled import ThrottledLog
from ensync.server.openfiles import max_connections
from ensync.server.runtime.engine import Engine

__all__ = ["ConnectionGate"]

log = logging.getLogger(__name__)


class ConnectionGate:
    """Counts the connections of the HTTP listeners that share it, and refuses
    those past ``max_connections`` in all or ``max_connections_per_address``
    from one address (both from the engine's config)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._max = max_connections(engine.config.max_connections)
        self._open = 0
        self._by_address: dict[str, int] = {}
        self._refusals = ThrottledLog(log, engine.clock.now_ms, what="refused")

    @property
    def open(self) -> int:
        """Connections admitted and not yet closed."""
        return self._open

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; ``False``: close it now."""
        held = self._by_address.get(address, 0)
        if self._open >= self._max:
            self._refuse("connections", f"{self._open} connections open, the most allowed")
            return False
        if held >= self._engine.config.max_connections_per_address:
            self._refuse(
                "connections_per_address",
                f"{held} connections open from {address}, the most allowed from one address",
            )
            return False
        self._open += 1
        self._by_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """A connection `admit` counted has closed."""
        self._open -= 1
        held = self._by_address.pop(address, 1) - 1
        if held > 0:
            self._by_address[address] = held

    def connection_class(self) -> type[ServerConnection]:
        """A websockets connection class that passes through this gate."""
        gate = self

        class GatedConnection(ServerConnection):
            _gated_address: str | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                peer: Any = transport.get_extra_info("peername")
                address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
                if gate.admit(address):
                    self._gated_address = address
                elif isinstance(transport, asyncio.Transport):
                    transport.abort()  # before it costs more than its descriptor

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                if self._gated_address is not None:
                    gate.release(self._gated_address)
                    self._gated_address = None

        return GatedConnection

    def _refuse(self, limit: str, text: str) -> None:
        counts = self._engine.stats.limit_rejections
        counts[limit] = counts.get(limit, 0) + 1
        self._refusals.note(limit, text)
