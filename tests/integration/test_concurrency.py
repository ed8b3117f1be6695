"""Any number of concurrent calls from one client works, on either transport.

A client with more calls in flight than the engine lets one connection hold
must never break its own connection: the SDK keeps its calls on the wire
below the engine's advertised bound and queues the rest, and a refused
stream is sent again rather than read as a lost link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ensync import EnSyncEngine
from ensync._proto import ensync_pb2 as pb
from ensync.client.grpc_transport import GrpcClientTransport, max_in_flight
from ensync.client.ws_transport import max_in_flight as ws_max_in_flight
from ensync.crypto import generate_keypair, seal
from ensync.protocol.urls import parse_engine_url
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.timing import seconds

CALLS = 10_000


@pytest.fixture
async def roomy_server() -> AsyncIterator[TestServer]:
    # The default request rate (20,000/s per app) would refuse part of a
    # 10,000-call burst on a fast machine; this test is about connections.
    async with run_engine(rate_limit_per_app=0) as running:
        yield running


@pytest.mark.slow
@pytest.mark.timeout(seconds(120))
@pytest.mark.parametrize("transport", ["grpc", "ws", "ws-text"])
async def test_ten_thousand_concurrent_publishes_from_one_client_all_land_once(
    roomy_server: TestServer, transport: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        server = roomy_server
        if transport == "ws-text":  # the official text protocol, no batched session
            server = await stack.enter_async_context(
                run_engine(rate_limit_per_app=0, sessions=False)
            )
        await publish_ten_thousand(server, transport)


async def publish_ten_thousand(server: TestServer, transport: str) -> None:
    alice = await server.create_app("alice")
    bob = await server.create_app("bob")
    engine: Any = EnSyncEngine(server.grpc_url) if transport == "grpc" else WsEngine(server.ws_url)
    events: list[str] = []
    engine.on("disconnect", lambda cause: events.append(f"disconnect: {cause}"))
    engine.on("reconnect", lambda attempt: events.append("reconnect"))
    try:
        client = await engine.create_client(alice.app_key)
        idems = await asyncio.gather(
            *(client.publish("load/burst", [bob.app_id], {"i": i}) for i in range(CALLS))
        )
        assert events == []  # the connection never broke
        assert server.engine.stats.connects == 1
        assert len(set(idems)) == CALLS
        assert server.engine.stats.deduplicated == 0  # none was sent twice
        assert (await server.engine.store.backlog()) == {bob.app_id: CALLS}
    finally:
        await engine.close()


async def test_the_engine_advertises_its_bounds_and_the_sdk_stays_below_them(
    server: TestServer,
) -> None:
    alice = await server.create_app("alice")
    engine = EnSyncEngine(server.grpc_url)
    ws_engine = WsEngine(server.ws_url)
    try:
        client = await engine.create_client(alice.app_key)
        ws_client = await ws_engine.create_client(alice.app_key)
        grpc_stats = client._connection.transport.statistics()  # type: ignore[attr-defined]
        ws_stats = ws_client._connection.transport.statistics()  # type: ignore[attr-defined]
    finally:
        await engine.close()
        await ws_engine.close()
    config = server.engine.config
    streams = max(200, config.max_subscriptions_per_client + 100)
    assert 0 < grpc_stats.limit <= streams - config.max_subscriptions_per_client
    assert 0 < ws_stats.limit < 512
    # Without advertised bounds (another engine) the SDK picks modest ones.
    assert max_in_flight({}) == ws_max_in_flight({}) == 64


class _Crowded:
    """A gRPC server that takes four streams per connection and counts every
    stream as long as its call lives (grpcio's default), with slow answers:
    a client with many calls in flight gets streams refused."""

    def __init__(self) -> None:
        self.answered = 0
        self.server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 4)])
        handler = grpc.unary_unary_rpc_method_handler(
            self._publish,
            request_deserializer=pb.PublishMessageRequest.FromString,
            response_serializer=pb.PublishMessageResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ensync.EnSyncService", {"PublishMessage": handler}
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _publish(
        self, request: pb.PublishMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishMessageResponse:
        await asyncio.sleep(0.002)
        self.answered += 1
        return pb.PublishMessageResponse(success=True, message_idem=f"m{self.answered}")


async def _plain_grpcio_failures(port: int, calls: int) -> int:
    """How many of ``calls`` concurrent publishes a plain grpcio channel loses."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        publish = channel.unary_unary(
            "/ensync.EnSyncService/PublishMessage",
            request_serializer=pb.PublishMessageRequest.SerializeToString,
            response_deserializer=pb.PublishMessageResponse.FromString,
        )
        results = await asyncio.gather(
            *(publish(pb.PublishMessageRequest(), timeout=10) for _ in range(calls)),
            return_exceptions=True,
        )
    return sum(isinstance(result, grpc.aio.AioRpcError) for result in results)


async def test_refused_streams_are_sent_again_not_read_as_a_lost_link() -> None:
    crowded = _Crowded()
    await crowded.server.start()
    try:
        # Positive control: this server does refuse streams under this load.
        assert await _plain_grpcio_failures(crowded.port, 300) > 0
        transport = GrpcClientTransport(parse_engine_url(f"grpc://127.0.0.1:{crowded.port}"))
        # Bounds sized for another engine: this one refuses well below them.
        transport._limiter.resize(1000)
        lost: list[BaseException] = []
        transport._lost = lost.append  # what connect() would install (not called here)
        recipient = generate_keypair().app_id
        envelope = seal(b"{}", recipient)
        crowded.answered = 0
        try:
            results = await asyncio.gather(
                *(transport.publish("x", recipient, envelope, "{}", None) for _ in range(300))
            )
        finally:
            await transport.close()
    finally:
        await crowded.server.stop(None)
    assert lost == []
    assert len(results) == 300
    assert crowded.answered == 300
