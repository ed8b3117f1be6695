"""The engine's gRPC obligations (PROTOCOL.md §2, §7), checked on raw calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from ensync._proto import ensync_pb2 as pb
from ensync.crypto import seal
from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine
from tests.support.timing import seconds

SERVICE = "/ensync.EnSyncService/"


class Stub:
    """Raw calls with a chosen user agent, as different official clients send them."""

    def __init__(self, port: int, user_agent: str | None = None) -> None:
        options = [("grpc.primary_user_agent", user_agent)] if user_agent else []
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)

    async def call(self, method: str, request: Any, response_type: Any) -> Any:
        multicallable: grpc.aio.UnaryUnaryMultiCallable[Any, Any] = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return await multicallable(request, timeout=seconds(5))

    def subscribe(self, client_id: str, name: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
        multicallable: grpc.aio.UnaryStreamMultiCallable[Any, Any] = self.channel.unary_stream(
            SERVICE + "Subscribe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.MessageStreamResponse.FromString,
        )
        return multicallable(pb.SubscribeRequest(client_id=client_id, message_name=name))

    async def connect(self, app: NewApp) -> str:
        response = await self.call(
            "Connect", pb.ConnectRequest(access_key=app.app_key), pb.ConnectResponse
        )
        assert response.success, response.error_message
        return str(response.client_id)

    async def publish(
        self, client_id: str, name: str, to: NewApp, method: str = "PublishMessage"
    ) -> str:
        request = pb.PublishMessageRequest(
            client_id=client_id,
            message_name=name,
            payload=seal(b'{"a":1}', to.app_id),
            delivery_to=to.app_id,
            metadata='{"persist":true,"headers":{}}',
        )
        response = await self.call(method, request, pb.PublishMessageResponse)
        assert response.success, response.error_message
        return str(response.message_idem)


@dataclass
class Wire:
    server: TestServer
    alice: NewApp
    bob: NewApp
    stubs: list[Stub]

    def stub(self, user_agent: str | None = None) -> Stub:
        stub = Stub(self.server.server.grpc_port, user_agent)
        self.stubs.append(stub)
        return stub


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    async with run_engine(ack_deadline_ms=5000) as server:
        state = Wire(server, await server.create_app("alice"), await server.create_app("bob"), [])
        try:
            yield state
        finally:
            for stub in state.stubs:
                await stub.channel.close()


async def next_item(call: grpc.aio.UnaryStreamCall[Any, Any], timeout_s: float = 2.0) -> Any:
    return await asyncio.wait_for(call.read(), seconds(timeout_s))


async def nothing_arrives(call: grpc.aio.UnaryStreamCall[Any, Any]) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(call.read())), 0.2)
    except TimeoutError:
        return True
    return False


async def test_connect_reports_failure_in_the_response(wire: Wire) -> None:
    stub = wire.stub()
    response = await stub.call("Connect", pb.ConnectRequest(access_key="nope"), pb.ConnectResponse)
    assert not response.success
    assert "app key" in response.error_message
    ok = await stub.connect(wire.alice)
    for bad in (",", "=", "{", "}", ";", " "):
        assert bad not in ok


async def test_semantic_errors_are_success_false_never_a_status(wire: Wire) -> None:
    stub = wire.stub()
    client = await stub.connect(wire.alice)
    bad_publish = pb.PublishMessageRequest(
        client_id=client, message_name="x", payload="zz", delivery_to="bad", metadata="{}"
    )
    response = await stub.call("PublishMessage", bad_publish, pb.PublishMessageResponse)
    assert not response.success
    assert "recipient" in response.error_message
    ack = pb.AcknowledgeRequest(client_id=client, message_idem="01NOPE", partition_block=1)
    acked = await stub.call("AcknowledgeMessage", ack, pb.AcknowledgeResponse)
    assert not acked.success
    assert "not found" in acked.message
    unknown = pb.AcknowledgeRequest(client_id="ghost", message_idem="x")
    refused = await stub.call("AcknowledgeMessage", unknown, pb.AcknowledgeResponse)
    assert not refused.success
    heartbeat = await stub.call(
        "Heartbeat", pb.HeartbeatRequest(client_id="ghost"), pb.HeartbeatResponse
    )
    assert not heartbeat.success
    alive = await stub.call(
        "Heartbeat", pb.HeartbeatRequest(client_id=client), pb.HeartbeatResponse
    )
    assert alive.success


async def test_event_generation_methods_are_served(wire: Wire) -> None:
    stub = wire.stub("grpc-node-js/1.2.0")
    alice = await stub.connect(wire.alice)
    bob = await stub.connect(wire.bob)
    stream = stub.subscribe(bob, "legacy")
    idem = await stub.publish(alice, "legacy", wire.bob, method="PublishEvent")
    item = await next_item(stream)
    assert item.message_idem == idem
    ack = pb.AcknowledgeRequest(client_id=bob, message_idem=idem, partition_block=1)
    response = await stub.call("AcknowledgeEvent", ack, pb.AcknowledgeResponse)
    assert response.success
    replay = await stub.call(
        "ReplayEvent",
        pb.ReplayRequest(client_id=bob, message_idem=idem),
        pb.ReplayResponse,
    )
    data = json.loads(replay.message_data)
    assert data["event_idem"] == idem
    assert data["event_name"] == "legacy"
    for method, request, response_type in (
        ("DeferEvent", pb.DeferRequest(client_id=bob, message_idem=idem), pb.DeferResponse),
        ("DiscardEvent", pb.DiscardRequest(client_id=bob, message_idem=idem), pb.DiscardResponse),
        ("PauseEvents", pb.PauseRequest(client_id=bob, message_name="legacy"), pb.PauseResponse),
        (
            "ContinueEvents",
            pb.ContinueRequest(client_id=bob, message_name="legacy"),
            pb.ContinueResponse,
        ),
    ):
        answer = await stub.call(method, request, response_type)
        assert answer.message, method  # answered by a handler, not UNIMPLEMENTED
    stream.cancel()


async def test_python_clients_get_each_message_on_the_oldest_stream_of_its_name(
    wire: Wire,
) -> None:
    stub = wire.stub()
    alice = await stub.connect(wire.alice)
    bob = await stub.connect(wire.bob)
    first = stub.subscribe(bob, "a")
    second = stub.subscribe(bob, "a")  # the official Python client opens two
    other = stub.subscribe(bob, "b")
    await first.wait_for_connection()
    await second.wait_for_connection()
    await other.wait_for_connection()
    idem_a = await stub.publish(alice, "a", wire.bob)
    idem_b = await stub.publish(alice, "b", wire.bob)
    assert (await next_item(first)).message_idem == idem_a
    assert (await next_item(other)).message_idem == idem_b
    assert await nothing_arrives(second)
    for call in (first, second, other):
        call.cancel()


async def test_grpc_js_clients_get_everything_on_their_oldest_stream(wire: Wire) -> None:
    stub = wire.stub("grpc-node-js/1.12.0")
    publisher = wire.stub()
    alice = await publisher.connect(wire.alice)
    bob = await stub.connect(wire.bob)
    first = stub.subscribe(bob, "a")
    second = stub.subscribe(bob, "b")
    await first.wait_for_connection()
    await second.wait_for_connection()
    idem_b = await publisher.publish(alice, "b", wire.bob)
    assert (await next_item(first)).message_idem == idem_b
    assert await nothing_arrives(second)
    # Unsubscribe never ends a stream.
    response = await stub.call(
        "Unsubscribe",
        pb.UnsubscribeRequest(client_id=bob, message_name="a"),
        pb.UnsubscribeResponse,
    )
    assert response.success
    assert first.done() is False
    # When the oldest stream goes, the client is gone: its other stream ends OK.
    first.cancel()
    await asyncio.wait_for(second.wait_for_connection(), seconds(2))
    code = await asyncio.wait_for(second.code(), seconds(2))
    assert code == grpc.StatusCode.OK
    heartbeat = await stub.call(
        "Heartbeat", pb.HeartbeatRequest(client_id=bob), pb.HeartbeatResponse
    )
    assert not heartbeat.success


async def test_subscribe_with_unknown_client_ends_at_once(wire: Wire) -> None:
    python = wire.stub().subscribe("ghost", "x")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(python.read(), seconds(2))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    node = wire.stub("grpc-node-js/1.12.0").subscribe("ghost", "x")
    assert await asyncio.wait_for(node.code(), seconds(2)) == grpc.StatusCode.OK


async def test_replay_data_depends_on_the_client(wire: Wire) -> None:
    publisher = wire.stub()
    alice = await publisher.connect(wire.alice)
    idem = await publisher.publish(alice, "x", wire.bob)
    request_for: dict[str, str] = {}
    for agent in ("python", "node", "go"):
        stub = wire.stub(
            {"python": None, "node": "grpc-node-js/1.12.0", "go": "grpc-go/1.64.0"}[agent]
        )
        bob = await stub.connect(wire.bob)
        response = await stub.call(
            "ReplayMessage", pb.ReplayRequest(client_id=bob, message_idem=idem), pb.ReplayResponse
        )
        assert response.success
        request_for[agent] = response.message_data
    stored = await wire.server.engine.store.get(idem)
    assert stored is not None
    assert request_for["python"] == stored.payload  # grpc-python decrypts it directly
    for agent in ("node", "go"):
        data = json.loads(request_for[agent])
        assert set(data) == {
            "message_idem",
            "message_name",
            "payload",
            "partition_block",
            "metadata",
            "sender",
        }
        assert data["payload"] == stored.payload
        assert data["sender"] == wire.alice.app_id
        meta = json.loads(data["metadata"])  # a JSON string, as Node needs
        assert meta["$internal"]["replay_info"]["isReplayed"] is True
        assert meta["$internal"]["replay_info"]["wasAcknowledged"] is False


async def test_defer_answers_the_delivery_time_in_epoch_ms(wire: Wire) -> None:
    stub = wire.stub()
    alice = await stub.connect(wire.alice)
    bob = await stub.connect(wire.bob)
    idem = await stub.publish(alice, "x", wire.bob)
    now = wire.server.engine.clock.now_ms()
    response = await stub.call(
        "DeferMessage",
        pb.DeferRequest(client_id=bob, message_idem=idem, delay_ms=60_000, reason="later"),
        pb.DeferResponse,
    )
    assert response.success
    assert now + 60_000 <= response.delivery_time <= now + 65_000
    too_long = await stub.call(
        "DeferMessage",
        pb.DeferRequest(client_id=bob, message_idem=idem, delay_ms=86_400_001),
        pb.DeferResponse,
    )
    assert not too_long.success
