"""ensync's batched session over WebSocket: binary frames on the connection
that sent CONN, negotiated in the CONN answer; the text protocol unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ensync._proto import ensync_pb2 as pb
from ensync.crypto import seal
from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine
from tests.support.timing import eventually, seconds

NAME = "orders/created"


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with run_engine(ack_deadline_ms=5000) as running:
        yield running


async def conn(server: TestServer, app: NewApp) -> tuple[ClientConnection, str, dict[str, str]]:
    ws = await connect(f"ws://127.0.0.1:{server.http_port}/message")
    await ws.send(f"CONN;ACCESS_KEY=:{app.app_key}")
    reply = await text(ws)
    assert reply.startswith("+PASS:{"), reply
    inner = reply.removeprefix("+PASS:{").removesuffix("}")
    fields = dict(item.strip().split("=", 1) for item in inner.split(","))
    return ws, fields["clientId"], fields


async def receive(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), seconds(5))


async def text(ws: ClientConnection) -> str:
    frame = await receive(ws)
    assert isinstance(frame, str), frame
    return frame


async def frame(ws: ClientConnection) -> pb.ServerFrame:
    data = await receive(ws)
    assert isinstance(data, bytes), data
    return pb.ServerFrame.FromString(data)


def hello(client_id: str, *capabilities: str) -> bytes:
    return pb.ClientFrame(
        hello=pb.SessionHello(client_id=client_id, version=1, capabilities=list(capabilities))
    ).SerializeToString()


def publishes(to: NewApp, seqs: range) -> bytes:
    items = [
        pb.SessionPublish(
            seq=seq, message_name=NAME, payload=seal(b"{}", to.app_id), delivery_to=to.app_id
        )
        for seq in seqs
    ]
    return pb.ClientFrame(publishes=items).SerializeToString()


async def test_conn_offers_the_session_and_both_protocols_share_the_socket(
    server: TestServer,
) -> None:
    alice = await server.create_app("alice")
    ws, client_id, fields = await conn(server, alice)
    assert fields["session"] == "1"
    await ws.send(hello(client_id))
    welcome = (await frame(ws)).welcome
    assert welcome.version == 1
    assert int(welcome.limits["max_frame_bytes"]) > 0
    await ws.send(publishes(alice, range(1, 101)))
    published: set[int] = set()
    while len(published) < 100:
        batch = await frame(ws)
        assert all(item.success for item in batch.published)
        published.update(item.seq for item in batch.published)
    assert published == set(range(1, 101))
    assert await server.engine.store.backlog() == {alice.app_id: 100}
    # Text commands go on as before, answered in text.
    await ws.send(f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{NAME}")
    assert await text(ws) == "+PASS:subscribed"
    record = await text(ws)  # no deliveries capability: records stay text
    assert record.startswith("+RECORD:")
    await ws.close()


async def test_deliveries_move_to_the_session_and_spend_credits(server: TestServer) -> None:
    alice = await server.create_app("alice")
    bob = await server.create_app("bob")
    sender, sender_id, _ = await conn(server, alice)
    await sender.send(hello(sender_id))
    await frame(sender)
    receiver, receiver_id, _ = await conn(server, bob)
    await receiver.send(hello(receiver_id, "deliveries"))
    assert list((await frame(receiver)).welcome.capabilities) == [
        "deliveries",
        "observe",
        "goodbye",
    ]
    await receiver.send(f"SUB;CLIENT_ID=:{receiver_id};EVENT_NAME=:{NAME}")
    assert await text(receiver) == "+PASS:subscribed"
    await sender.send(publishes(bob, range(1, 4)))
    answered = 0
    while answered < 3:
        answered += len((await frame(sender)).published)
    # No credit yet: nothing is sent, and nothing is leased to bob.
    await eventually(server.engine.quiescent)
    assert server.engine.statistics().in_flight == 0
    credit = pb.SessionCredit(message_name=NAME, credit=2)
    await receiver.send(pb.ClientFrame(credits=[credit]).SerializeToString())
    got: list[pb.MessageStreamResponse] = []
    while len(got) < 2:
        got += (await frame(receiver)).deliveries
    assert [d.partition_block for d in got] == [1, 2]
    settle = pb.SessionSettle(seq=1, kind=pb.SETTLE_ACK, message_idem=got[0].message_idem)
    await receiver.send(pb.ClientFrame(settles=[settle]).SerializeToString())
    (settled,) = (await frame(receiver)).settled
    assert (settled.seq, settled.success) == (1, True)
    await eventually(server.engine.quiescent)
    assert server.engine.statistics().in_flight == 1  # the third waits for credit
    for ws in (sender, receiver):
        await ws.close()


async def test_a_hello_before_conn_is_a_refused_command_and_a_foreign_one_closes(
    server: TestServer,
) -> None:
    alice = await server.create_app("alice")
    ws = await connect(f"ws://127.0.0.1:{server.http_port}/message")
    await ws.send(hello("someone"))
    assert (await text(ws)).startswith("-FAIL:")
    await ws.close()
    ws, _, _ = await conn(server, alice)
    await ws.send(b"\x00\x01 not a frame")
    assert (await text(ws)).startswith("-FAIL:")  # as for any binary message
    await ws.send(hello("not-this-connections-client"))
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert "unknown client_id" in closed.value.rcvd.reason


async def test_an_engine_without_sessions_offers_none_and_refuses_hellos() -> None:
    async with run_engine(sessions=False) as server:
        alice = await server.create_app("alice")
        ws, client_id, fields = await conn(server, alice)
        assert "session" not in fields
        await ws.send(hello(client_id))
        assert (await text(ws)).startswith("-FAIL:")
        await ws.close()
