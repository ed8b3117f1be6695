"""The connection component on its own, over fake transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ensync import errors
from ensync.client.connection import Connection, ConnectionOptions, ConnectionState
from ensync.client.events import EventEmitter
from ensync.client.transport import ConnectInfo
from tests.support.timing import eventually

__all__: list[str] = []


class FakeTransport:
    """Connects when ``gate`` opens; remembers whether it was closed."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.closed = False
        self.lost: Callable[[BaseException], None] | None = None
        self.client_id = ""

    async def connect(self, app_key: str, lost: Callable[[BaseException], None]) -> ConnectInfo:
        self.lost = lost
        if self.gate is not None:
            await self.gate.wait()
        self.client_id = "client-1"
        return ConnectInfo(client_id="client-1", client_hash="hash")

    async def heartbeat(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


async def test_closing_while_a_reconnect_is_connecting_closes_that_transport() -> None:
    # The new transport holds a session on the engine (and a stream): left
    # open, the engine would keep that session for good.
    made: list[FakeTransport] = []
    gate = asyncio.Event()

    def factory() -> Any:
        transport = FakeTransport(gate if made else None)
        made.append(transport)
        return transport

    connection = Connection(
        [factory],
        "key",
        ConnectionOptions(reconnect_interval_ms=1, heartbeat_interval_ms=60_000),
        EventEmitter(),
    )
    await connection.open()
    first = made[0]
    assert first.lost is not None
    first.lost(errors.EnSyncConnectionError("cut"))
    # The reconnect is connecting, and waits at the gate.
    await eventually(lambda: len(made) == 2, what="a reconnect attempt")
    await connection.close()
    assert connection.state is ConnectionState.CLOSED
    assert made[1].closed
