"""Connections that never speak are closed; past the caps, new ones at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ensync import EnSyncEngine
from ensync.server.openfiles import caps_fit, connection_budget
from ensync.testing import run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.http import http_get
from tests.support.timing import seconds


async def _lifetime(port: int, send: bytes = b"") -> float:
    """Seconds until the engine closes a connection that sends ``send`` and
    then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(send)
        while await asyncio.wait_for(reader.read(4096), seconds(10)):
            pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


def test_the_default_cap_leaves_room_in_the_open_files_limit() -> None:
    for limit in (256, 1024, 4096, 1 << 20):
        assert caps_fit(connection_budget(limit), limit)
    assert not caps_fit(1000, 1024)


async def test_silent_connections_are_closed_at_the_handshake_deadline() -> None:
    async with run_engine(handshake_timeout_ms=300) as server:
        grpc_silent, http_unfinished = await asyncio.gather(
            _lifetime(server.grpc_port),
            _lifetime(server.http_port, b"GET /message HTTP/1.1\r\nHost: x\r\n"),
        )
        assert 0.2 < grpc_silent < 3
        assert 0.2 < http_unfinished < 3
        # An upgraded socket that never connects a client is closed too.
        async with connect(f"ws://127.0.0.1:{server.http_port}/message") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), seconds(3))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "no valid CONN" in closed.value.rcvd.reason
        # Clients that connect in time are not touched by the deadline.
        alice = await server.create_app("alice")
        engines = [EnSyncEngine(server.grpc_url), WsEngine(server.ws_url)]
        try:
            clients = [await e.create_client(alice.app_key) for e in engines]
            await asyncio.sleep(0.6)
            for client in clients:
                await client.publish("orders/created", [alice.app_id], {"ok": True})
        finally:
            for engine in engines:
                await engine.close()


async def test_connections_past_the_per_address_cap_are_closed_at_once_and_counted() -> None:
    async with run_engine(max_connections_per_address=3) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.http_port) for _ in range(3)]
        try:
            assert await _lifetime(server.http_port) < 0.5
            _, metrics = await _metrics_after_closing(server.http_port, held)
        finally:
            for _, writer in held:
                writer.close()
        assert 'ensync_limit_rejections_total{limit="connections_per_address"} 1.0' in metrics


async def _metrics_after_closing(
    port: int, held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> tuple[int, str]:
    for _, writer in held:
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.1)  # the engine sees them gone; room for the scrape
    return await http_get(port, "/metrics")


async def test_connections_past_the_total_cap_are_closed_at_once() -> None:
    async with run_engine(max_connections=4) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.grpc_port) for _ in range(4)]
        try:
            assert await _lifetime(server.grpc_port) < 0.5
        finally:
            for _, writer in held:
                writer.close()
        held = [await asyncio.open_connection("127.0.0.1", server.http_port) for _ in range(4)]
        try:
            assert await _lifetime(server.http_port) < 0.5
            _, metrics = await _metrics_after_closing(server.http_port, held)
        finally:
            for _, writer in held:
                writer.close()
        assert 'ensync_limit_rejections_total{limit="connections"} 1.0' in metrics
