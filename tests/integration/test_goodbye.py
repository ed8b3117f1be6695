"""A client that closes says goodbye: its session ends at once on the engine,
it stops counting against its app's client limit, and what it held goes to
the app's other clients without waiting for a timeout."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ensync import EnSyncEngine, Message
from ensync._proto import ensync_pb2 as pb
from ensync.client.engine import BaseEngine
from ensync.crypto import seal
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.integration.test_grpc_session import Raw, hello, read
from tests.support.timing import seconds

NAME = "orders/created"


def _engine(server: TestServer, transport: str) -> BaseEngine:
    if transport == "ws":
        return WsEngine(server.ws_url)
    return EnSyncEngine(server.grpc_url)


def _first(future: asyncio.Future[Message], message: Message) -> None:
    if not future.done():
        future.set_result(message)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_closed_clients_leave_at_once(transport: str) -> None:
    # The heartbeat timeout (90 s by default) would keep each closed client
    # counted: with a limit of 3, the 4th client in a row was refused.
    async with run_engine(max_clients_per_app=3) as server:
        alice = await server.create_app("alice")
        for _ in range(6):
            engine = _engine(server, transport)
            try:
                client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
                await client.publish(NAME, [alice.app_id], {"n": 1})
                assert server.engine.statistics().sessions == 1
            finally:
                await engine.close()
            assert server.engine.statistics().sessions == 0


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_closing_clients_unsettled_message_goes_to_another_client(transport: str) -> None:
    async with run_engine(ack_deadline_ms=60_000) as server:
        alice = await server.create_app("alice")
        engines = [_engine(server, transport) for _ in range(2)]
        try:
            first, second = [
                await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
                for engine in engines
            ]
            held: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            first_sub = await first.subscribe(NAME, auto_ack=False)
            first_sub.on(lambda m: _first(held, m))
            await first.publish(NAME, [alice.app_id], {"n": 1})
            message: Message = await asyncio.wait_for(held, seconds(5))
            again: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            second_sub = await second.subscribe(NAME, auto_ack=False)
            second_sub.on(lambda m: _first(again, m))
            await engines[0].close()  # unacked: the engine gives it to `second` now
            redelivered: Message = await asyncio.wait_for(again, seconds(5))
            assert redelivered.idem == message.idem
            assert redelivered.attempt == 2
        finally:
            for engine in engines:
                await engine.close()


async def test_a_goodbye_on_the_wire_answers_first_then_ends_the_session() -> None:
    async with (
        run_engine("sqlite:") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel,
    ):
        raw = Raw(server, channel)
        alice = await server.create_app("alice")
        client = await raw.connect(alice)
        call = raw.session()
        welcome = await hello(call, client)
        assert "goodbye" in welcome.capabilities
        payload = seal(b"{}", alice.app_id)
        publishes = [
            pb.SessionPublish(seq=seq, message_name=NAME, payload=payload, delivery_to=alice.app_id)
            for seq in range(1, 51)
        ]
        await call.write(pb.ClientFrame(publishes=publishes, goodbye=True))
        published: set[int] = set()
        frames: list[pb.ServerFrame] = []
        while (frame := await asyncio.wait_for(call.read(), seconds(5))) is not grpc.aio.EOF:
            assert isinstance(frame, pb.ServerFrame)
            frames.append(frame)
            published.update(item.seq for item in frame.published if item.success)
        assert published == set(range(1, 51))
        assert frames[-1].goodbye
        assert not any(f.goodbye for f in frames[:-1])
        assert client not in server.engine.sessions
        # The client id is dead: another session for it is refused.
        refused = raw.session()
        await refused.write(pb.ClientFrame(hello=pb.SessionHello(client_id=client, version=1)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await read(refused)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
