"""ensync's batched session stream (``ensync.EnSyncSession/Session``) on the wire,
and the SDK's choice between it and the unary calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from ensync import EnSyncEngine
from ensync._proto import ensync_pb2 as pb
from ensync.crypto import generate_keypair, seal
from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.timing import eventually, seconds

NAME = "orders/created"


@dataclass
class Raw:
    """A bare gRPC client of the session service."""

    server: TestServer
    channel: grpc.aio.Channel

    async def connect(self, app: NewApp) -> str:
        connect = self.channel.unary_unary(
            "/ensync.EnSyncService/Connect",
            request_serializer=pb.ConnectRequest.SerializeToString,
            response_deserializer=pb.ConnectResponse.FromString,
        )
        response = await connect(pb.ConnectRequest(access_key=app.app_key))
        assert response.success
        return str(response.client_id)

    def session(self) -> grpc.aio.StreamStreamCall[pb.ClientFrame, pb.ServerFrame]:
        method: grpc.aio.StreamStreamMultiCallable[pb.ClientFrame, pb.ServerFrame] = (
            self.channel.stream_stream(
                "/ensync.EnSyncSession/Session",
                request_serializer=pb.ClientFrame.SerializeToString,
                response_deserializer=pb.ServerFrame.FromString,
            )
        )
        return method()

    def subscribe(self, client_id: str, name: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
        subscribe = self.channel.unary_stream(
            "/ensync.EnSyncService/Subscribe",
            request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=pb.MessageStreamResponse.FromString,
        )
        return subscribe(pb.SubscribeRequest(client_id=client_id, message_name=name))


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    async with (
        run_engine(ack_deadline_ms=5_000) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel,
    ):
        yield Raw(server, channel)


async def read(call: grpc.aio.StreamStreamCall[pb.ClientFrame, pb.ServerFrame]) -> pb.ServerFrame:
    frame = await asyncio.wait_for(call.read(), seconds(5))
    assert isinstance(frame, pb.ServerFrame)
    return frame


async def hello(
    call: grpc.aio.StreamStreamCall[pb.ClientFrame, pb.ServerFrame],
    client_id: str,
    *capabilities: str,
) -> pb.SessionWelcome:
    await call.write(
        pb.ClientFrame(
            hello=pb.SessionHello(client_id=client_id, version=1, capabilities=capabilities)
        )
    )
    return (await read(call)).welcome


async def test_a_session_for_an_unknown_client_or_without_hello_is_refused(raw: Raw) -> None:
    unknown = raw.session()
    await unknown.write(pb.ClientFrame(hello=pb.SessionHello(client_id="nobody", version=1)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read(unknown)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown client_id" in (refused.value.details() or "")
    no_hello = raw.session()
    await no_hello.write(pb.ClientFrame(publishes=[pb.SessionPublish(seq=1)]))
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await read(no_hello)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_publishes_and_settlements_travel_in_frames(raw: Raw) -> None:
    alice = await raw.server.create_app("alice")
    bob = await raw.server.create_app("bob")
    client = await raw.connect(alice)
    call = raw.session()
    welcome = await hello(call, client)
    assert welcome.version == 1
    assert int(welcome.limits["max_frame_bytes"]) > 1_000_000
    stranger = generate_keypair().app_id
    await call.write(
        pb.ClientFrame(
            publishes=[
                pb.SessionPublish(
                    seq=seq, message_name=NAME, payload=seal(b"{}", to), delivery_to=to
                )
                for seq, to in ((1, bob.app_id), (2, stranger), (3, bob.app_id))
            ]
        )
    )
    results: dict[int, pb.SessionPublished] = {}
    while len(results) < 3:
        for item in (await read(call)).published:
            results[item.seq] = item
    assert results[1].success
    assert results[3].success
    assert not results[2].success
    assert f"recipient {stranger} is not a registered app" in results[2].error_message
    # Numbered in the order they came: block 1, then block 2.
    first = await raw.server.engine.store.get(results[1].message_idem)
    third = await raw.server.engine.store.get(results[3].message_idem)
    assert first is not None
    assert third is not None
    assert (first.block, third.block) == (1, 2)
    # Bob settles through his own session: one ack, one unknown idem.
    bob_client = await raw.connect(bob)
    bob_call = raw.session()
    await hello(bob_call, bob_client)
    await bob_call.write(
        pb.ClientFrame(
            settles=[
                pb.SessionSettle(seq=7, kind=pb.SETTLE_ACK, message_idem=first.idem),
                pb.SessionSettle(
                    seq=8, kind=pb.SETTLE_DISCARD, message_idem="01NOSUCHMESSAGE0000000000"
                ),
            ]
        )
    )
    settled: dict[int, pb.SessionSettled] = {}
    while len(settled) < 2:
        for answer in (await read(bob_call)).settled:
            settled[answer.seq] = answer
    assert settled[7].success
    assert not settled[8].success
    assert "not found" in settled[8].message
    acked = await raw.server.engine.store.get(first.idem)
    assert acked is not None
    assert acked.state.name == "ACKED"
    for session in (call, bob_call):
        await session.done_writing()


async def test_a_half_closed_session_answers_everything_it_was_sent() -> None:
    # Publishes and acks in flight when the client half-closes are answered
    # before the stream ends: a client closing cleanly learns every outcome.
    # (SQLite: its writes take real time, so answers are still due then.)
    async with (
        run_engine("sqlite:") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel,
    ):
        await half_close_after_publishing(Raw(server, channel))


async def half_close_after_publishing(raw: Raw) -> None:
    alice = await raw.server.create_app("alice")
    client = await raw.connect(alice)
    call = raw.session()
    await hello(call, client)
    payload = seal(b"{}", alice.app_id)
    await call.write(
        pb.ClientFrame(
            publishes=[
                pb.SessionPublish(
                    seq=seq, message_name=NAME, payload=payload, delivery_to=alice.app_id
                )
                for seq in range(1, 201)
            ]
        )
    )
    await call.write(
        pb.ClientFrame(
            settles=[pb.SessionSettle(seq=500, kind=pb.SETTLE_ACK, message_idem="01NOSUCH")]
        )
    )
    await call.done_writing()
    published: set[int] = set()
    settled: set[int] = set()
    while (frame := await asyncio.wait_for(call.read(), seconds(5))) is not grpc.aio.EOF:
        assert isinstance(frame, pb.ServerFrame)
        published.update(item.seq for item in frame.published if item.success)
        settled.update(item.seq for item in frame.settled)
    assert published == set(range(1, 201))
    assert settled == {500}
    assert await raw.server.engine.store.backlog() == {alice.app_id: 200}


async def test_deliveries_on_the_session_spend_credits(raw: Raw) -> None:
    alice = await raw.server.create_app("alice")
    bob = await raw.server.create_app("bob")
    sender = await raw.connect(alice)
    sending = raw.session()
    await hello(sending, sender)
    receiver = await raw.connect(bob)
    subscription = raw.subscribe(receiver, NAME)  # registers the name; stays open
    await subscription.wait_for_connection()
    call = raw.session()
    welcome = await hello(call, receiver, "deliveries")
    assert list(welcome.capabilities) == ["deliveries", "observe", "goodbye"]
    await sending.write(
        pb.ClientFrame(
            publishes=[
                pb.SessionPublish(
                    seq=i,
                    message_name=NAME,
                    payload=seal(b"{}", bob.app_id),
                    delivery_to=bob.app_id,
                )
                for i in range(1, 4)
            ]
        )
    )
    published = 0
    while published < 3:
        published += len((await read(sending)).published)
    # No credit yet: nothing is sent, and nothing is leased to bob.
    await eventually(raw.server.engine.quiescent)
    assert raw.server.engine.statistics().in_flight == 0
    await call.write(pb.ClientFrame(credits=[pb.SessionCredit(message_name=NAME, credit=2)]))
    got: list[pb.MessageStreamResponse] = []
    while len(got) < 2:
        got += (await read(call)).deliveries
    assert [d.partition_block for d in got] == [1, 2]
    await eventually(raw.server.engine.quiescent)
    assert raw.server.engine.statistics().in_flight == 2  # the third waits for credit
    await call.write(pb.ClientFrame(credits=[pb.SessionCredit(message_name=NAME, credit=1)]))
    last = await read(call)
    assert [d.partition_block for d in last.deliveries] == [3]
    subscription.cancel()
    for session in (call, sending):
        await session.done_writing()


@pytest.mark.parametrize("session", [True, False], ids=["session", "no-session"])
@pytest.mark.parametrize("over", ["grpc", "ws"])
async def test_the_sdk_uses_the_session_when_the_engine_has_one(session: bool, over: str) -> None:
    async with run_engine(sessions=session) as server:
        alice = await server.create_app("alice")
        engine: Any = EnSyncEngine(server.grpc_url) if over == "grpc" else WsEngine(server.ws_url)
        try:
            client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
            transport: Any = client._connection.transport
            assert (transport._batched is not None) is session
            got: list[Any] = []
            (await client.subscribe(NAME)).on(got.append)
            await client.publish(NAME, [alice.app_id], {"i": 1})
            await eventually(lambda: len(got) == 1)
        finally:
            with contextlib.suppress(Exception):
                await engine.close()


async def test_a_slow_subscriber_on_a_backlog_loses_nothing() -> None:
    # The session window is wider than the credits the SDK grants at once:
    # the engine must claim only what it can push. Claiming more and giving
    # the rest back, over and over, once used up delivery attempts and
    # dead-lettered messages that no client had ever seen.
    async with run_engine(rate_limit_per_app=0) as server:
        alice = await server.create_app("alice")
        bob = await server.create_app("bob")
        sender = EnSyncEngine(server.grpc_url)
        receiver = EnSyncEngine(server.grpc_url)
        handled = 0

        async def slow(_message: Any) -> None:
            nonlocal handled
            await asyncio.sleep(0.002)
            handled += 1

        try:
            client = await sender.create_client(alice.app_key)
            await asyncio.gather(
                *(client.publish(NAME, [bob.app_id], {"i": i}) for i in range(2000))
            )
            reader = await receiver.create_client(bob.app_key, app_secret_key=bob.secret_key)
            (await reader.subscribe(NAME)).on(slow)
            await eventually(lambda: handled >= 100, timeout_s=30)
            await receiver.close()
            await eventually(server.engine.quiescent)
            stats = server.engine.stats
            assert stats.dead_lettered == 0
            assert stats.redelivered == 0
            assert stats.acked == handled
            assert await server.engine.store.backlog() == {bob.app_id: 2000 - handled}
        finally:
            await sender.close()
            await receiver.close()
