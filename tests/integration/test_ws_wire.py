"""The engine's WebSocket obligations (PROTOCOL.md §3, §7), on raw frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ensync.crypto import seal
from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine
from tests.support.http import http_get
from tests.support.timing import eventually, seconds


@dataclass
class Wire:
    server: TestServer
    alice: NewApp
    bob: NewApp
    sockets: list[ClientConnection]

    async def open(self, path: str = "/message", **options: object) -> ClientConnection:
        ws = await connect(f"ws://127.0.0.1:{self.server.http_port}{path}", **options)  # type: ignore[arg-type]
        self.sockets.append(ws)
        return ws

    async def conn(self, app: NewApp, path: str = "/message") -> tuple[ClientConnection, str]:
        ws = await self.open(path)
        await ws.send(f"CONN;ACCESS_KEY=:{app.app_key}")
        reply = await recv(ws)
        assert reply.startswith("+PASS:{clientId="), reply
        client_id = reply.split("clientId=", 1)[1].split(",", 1)[0]
        return ws, client_id

    def pub(self, client_id: str, to: NewApp, name: str = "x", metadata: str = "{}") -> str:
        payload = seal(b'{"a":1}', to.app_id)
        return (
            f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name};PAYLOAD=:{payload}"
            f";DELIVERY_TO=:{to.app_id};METADATA=:{metadata}"
        )


async def recv(ws: ClientConnection, timeout_s: float = 2.0) -> str:
    frame = await asyncio.wait_for(ws.recv(), seconds(timeout_s))
    assert isinstance(frame, str)
    return frame


async def silent(ws: ClientConnection, for_s: float = 0.2) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), for_s)
    except TimeoutError:
        return True
    return False


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    async with run_engine(ack_deadline_ms=5000, max_payload_bytes=64 * 1024) as server:
        state = Wire(server, await server.create_app("alice"), await server.create_app("bob"), [])
        try:
            yield state
        finally:
            for ws in state.sockets:
                await ws.close()


async def test_conn_reply_and_failed_conn_keeps_the_socket(wire: Wire) -> None:
    ws = await wire.open()
    await ws.send("CONN;ACCESS_KEY=:wrong")
    assert (await recv(ws)).startswith("-FAIL:")
    await ws.send(f"CONN;ACCESS_KEY=:{wire.alice.app_key}")
    reply = await recv(ws)
    assert reply.startswith("+PASS:{clientId=")
    inner = reply.removeprefix("+PASS:{").removesuffix("}")
    fields = dict(item.strip().split("=", 1) for item in inner.split(","))
    assert set(fields) >= {"clientId", "clientHash"}
    for value in fields.values():
        assert not set(value) & set(",={}; ")


async def test_commands_before_conn_and_with_foreign_ids_fail(wire: Wire) -> None:
    ws = await wire.open()
    await ws.send("SUB;CLIENT_ID=:x;EVENT_NAME=:x")
    assert (await recv(ws)).startswith("-FAIL:")
    _, other_id = await wire.conn(wire.bob)
    ws2, _ = await wire.conn(wire.alice)
    await ws2.send(f"SUB;CLIENT_ID=:{other_id};EVENT_NAME=:x")
    assert (await recv(ws2)).startswith("-FAIL:")
    assert not wire.server.engine.sessions[other_id].subscriptions


async def test_pong_gets_no_reply_and_replies_keep_order(wire: Wire) -> None:
    ws, client = await wire.conn(wire.alice)
    await ws.send("PONG")
    assert await silent(ws)
    frames = [wire.pub(client, wire.bob, name=f"n{i}") for i in range(20)]
    frames.insert(7, "NONSENSE")
    frames.insert(12, f"ACK;CLIENT_ID=:{client};EVENT_IDEM=:01NOPE;BLOCK=:1;EVENT_NAME=:x")
    for frame in frames:
        await ws.send(frame)
    replies = [await recv(ws) for _ in frames]
    assert [r[:6] for r in replies] == [
        "-FAIL:" if i in (7, 12) else "+PASS:" for i in range(len(frames))
    ]
    idems = [r.removeprefix("+PASS:") for i, r in enumerate(replies) if i not in (7, 12)]
    stored = [await wire.server.engine.store.get(idem) for idem in idems]
    assert [m.name for m in stored if m is not None] == [f"n{i}" for i in range(20)]


async def test_records_follow_the_sub_reply_and_have_the_documented_shape(wire: Wire) -> None:
    sender, alice = await wire.conn(wire.alice)
    for _ in range(3):
        await sender.send(
            wire.pub(alice, wire.bob, metadata='{"persist":true,"headers":{"k":"v"}}')
        )
        assert (await recv(sender)).startswith("+PASS:")
    ws, bob = await wire.conn(wire.bob, path="/")  # any path is a WebSocket endpoint
    await ws.send(f"SUB;CLIENT_ID=:{bob};EVENT_NAME=:x")
    assert await recv(ws) == "+PASS:subscribed"
    records = [json.loads((await recv(ws)).removeprefix("+RECORD:")) for _ in range(3)]
    first = records[0]
    assert set(first) == {
        "id",
        "idem",
        "name",
        "block",
        "loggedAt",
        "payload",
        "metadata",
        "sender",
        "attempt",
    }
    assert first["attempt"] == 1
    assert first["id"] == first["idem"]
    assert first["block"] == "1"
    assert isinstance(first["loggedAt"], int)
    assert first["metadata"] == {"persist": True, "headers": {"k": "v"}}
    assert first["sender"] == wire.alice.app_id
    assert [r["block"] for r in records] == ["1", "2", "3"]
    await ws.send(f"ACK;CLIENT_ID=:{bob};EVENT_IDEM=:{first['idem']};BLOCK=:1;EVENT_NAME=:x")
    assert (await recv(ws)).startswith("+PASS:")
    await ws.send(f"REPLAY;CLIENT_ID=:{bob};EVENT_IDEM=:{first['idem']};EVENT_NAME=:x")
    replayed = json.loads((await recv(ws)).removeprefix("+REPLAY:"))
    assert replayed["idem"] == first["idem"]
    assert replayed["metadata"]["$internal"]["replay_info"]["wasAcknowledged"] is True


async def test_a_closed_socket_requeues_its_messages(wire: Wire) -> None:
    sender, alice = await wire.conn(wire.alice)
    first, bob = await wire.conn(wire.bob)
    await first.send(f"SUB;CLIENT_ID=:{bob};EVENT_NAME=:x")
    assert await recv(first) == "+PASS:subscribed"
    await sender.send(wire.pub(alice, wire.bob))
    idem = (await recv(sender)).removeprefix("+PASS:")
    assert json.loads((await recv(first)).removeprefix("+RECORD:"))["idem"] == idem
    second, bob2 = await wire.conn(wire.bob)
    await second.send(f"SUB;CLIENT_ID=:{bob2};EVENT_NAME=:x")
    assert await recv(second) == "+PASS:subscribed"
    await first.close()
    assert json.loads((await recv(second)).removeprefix("+RECORD:"))["idem"] == idem


async def test_binary_and_oversized_frames(wire: Wire) -> None:
    ws, _ = await wire.conn(wire.alice)
    await ws.send(b"\x00\x01binary")
    assert (await recv(ws)).startswith("-FAIL:")
    await ws.send("x" * (2 * 1024 * 1024))  # over the largest request a 64 KiB payload makes
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    # The engine keeps serving others.
    other, _ = await wire.conn(wire.bob)
    await other.send("PONG")
    assert await silent(other)


async def test_invalid_utf8_is_refused_with_a_close_code(wire: Wire) -> None:
    ws, _ = await wire.conn(wire.alice)
    # A text frame with invalid UTF-8 cannot be sent by a conforming client
    # library; write it raw on the socket.
    transport = ws.transport
    frame = bytes([0x81, 0x80 | 2]) + b"\x00\x00\x00\x00" + b"\xff\xfe"
    transport.write(frame)
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007
    await eventually(lambda: wire.server.engine.statistics().sessions == 0)


async def test_metrics_are_served_in_the_prometheus_format(wire: Wire) -> None:
    sender, alice = await wire.conn(wire.alice)
    await sender.send(wire.pub(alice, wire.bob))
    assert (await recv(sender)).startswith("+PASS:")
    status, raw = await http_get(wire.server.http_port, "/metrics")
    assert status == 200
    assert "ensync_published_total 1.0" in raw
    assert 'ensync_backlog{app="bob"} 1.0' in raw
    assert "ensync_connected_clients 1.0" in raw
    for name in ("delivered", "acked", "deferred", "discarded", "redelivered", "dead_lettered"):
        assert f"ensync_{name}_total" in raw


async def test_a_silent_peer_is_dropped_and_its_messages_requeued() -> None:
    from tests.support.proxy import tcp_proxy

    async with run_engine(ack_deadline_ms=60_000, ws_ping_interval_ms=200) as server:
        alice = await server.create_app("alice")
        bob = await server.create_app("bob")
        state = Wire(server, alice, bob, [])
        sender, alice_id = await state.conn(alice)
        async with tcp_proxy(server.http_port) as proxy:
            ghost = await connect(f"ws://127.0.0.1:{proxy.port}/message", ping_interval=None)
            await ghost.send(f"CONN;ACCESS_KEY=:{bob.app_key}")
            ghost_id = (await recv(ghost)).split("clientId=", 1)[1].split(",", 1)[0]
            await ghost.send(f"SUB;CLIENT_ID=:{ghost_id};EVENT_NAME=:x")
            assert await recv(ghost) == "+PASS:subscribed"
            await sender.send(state.pub(alice_id, bob))
            idem = (await recv(sender)).removeprefix("+PASS:")
            assert json.loads((await recv(ghost)).removeprefix("+RECORD:"))["idem"] == idem
            healthy, bob_id = await state.conn(bob)
            await healthy.send(f"SUB;CLIENT_ID=:{bob_id};EVENT_NAME=:x")
            assert await recv(healthy) == "+PASS:subscribed"
            proxy.stall()
            # Within a few ping intervals the engine gives up on the silent
            # peer and hands its message to the healthy client.
            record = json.loads((await recv(healthy, timeout_s=5)).removeprefix("+RECORD:"))
            assert record["idem"] == idem
            assert ghost_id not in server.engine.sessions
            proxy.restore()
            await ghost.close()
        for ws in state.sockets:
            await ws.close()
