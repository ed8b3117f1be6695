"""The official Go client's habits (PROTOCOL.md §6, G-grpc / G-ws), reproduced
with raw calls shaped like its own (user agent ``grpc-go/…``)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect as ws_connect

from ensync._proto import ensync_pb2 as pb
from ensync.crypto import seal
from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine
from tests.support.http import http_get
from tests.support.timing import eventually, seconds

GO_AGENT = "grpc-go/1.64.0"
NAME = "orders/created"


@dataclass
class Raw:
    """A bare gRPC client with a chosen user agent."""

    server: TestServer
    agent: str
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.server.server.grpc_port}",
            options=[("grpc.primary_user_agent", self.agent)],
        )

    def unary(self, method: str, request: Any, response: Any) -> Any:
        call = self.channel.unary_unary(
            f"/ensync.EnSyncService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return call(request)

    async def connect(self, app: NewApp) -> str:
        answer = await self.unary(
            "Connect", pb.ConnectRequest(access_key=app.app_key), pb.ConnectResponse
        )
        assert answer.success, answer.error_message
        return str(answer.client_id)

    def subscribe(self, client_id: str, name: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
        method = self.channel.unary_stream(
            "/ensync.EnSyncService/Subscribe",
            request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=pb.MessageStreamResponse.FromString,
        )
        return method(pb.SubscribeRequest(client_id=client_id, message_name=name))

    async def refused_subscribe(self, client_id: str, name: str) -> tuple[float, grpc.StatusCode]:
        started = time.monotonic()
        call = self.subscribe(client_id, name)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        return time.monotonic() - started, refused.value.code()


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with run_engine(max_clients_per_app=1, max_payload_bytes=4096) as running:
        yield running


async def test_a_refused_subscribe_from_a_go_client_waits_a_second(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ensync.server")
    go = Raw(server, GO_AGENT)
    other = Raw(server, "grpc-python/1.66.0")
    go_id = await go.connect(await server.create_app("gopher"))
    other_id = await other.connect(await server.create_app("python"))
    for _ in range(2):  # the Go client subscribes again at once after a refusal
        took, code = await go.refused_subscribe(go_id, "bad;name")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert took >= 0.95
    # Positive control: everyone else hears at once.
    took, code = await other.refused_subscribe(other_id, "bad;name")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert took < 0.9
    assert server.engine.stats.subscribe_refusals == 3
    logged = [r for r in caplog.records if "subscribe of client" in r.getMessage()]
    assert len(logged) == 2  # once per client and name, not once per attempt
    _, body = await http_get(server.http_port, "/metrics")
    assert re.search(r"^ensync_subscribe_refusals_total 3\.0$", body, re.MULTILINE), body
    for raw in (go, other):
        await raw.channel.close()


async def test_a_closed_go_client_leaves_within_ten_seconds(server: TestServer) -> None:
    gopher = await server.create_app("gopher")
    tidy = await server.create_app("tidy")
    python = await server.create_app("python")
    sender = await server.create_app("sender")
    # A Go client that closes: its streams are cancelled, no Unsubscribe, no
    # further call (its Close() sends nothing).
    closing = Raw(server, GO_AGENT)
    closing_id = await closing.connect(gopher)
    streams = [closing.subscribe(closing_id, name) for name in (NAME, "orders/updated")]
    for stream in streams:
        await stream.wait_for_connection()
    # A Go client that unsubscribes properly, then stays quiet for a while.
    unsubscribing = Raw(server, GO_AGENT)
    unsubscribing_id = await unsubscribing.connect(tidy)
    stream = unsubscribing.subscribe(unsubscribing_id, NAME)
    await stream.wait_for_connection()
    answer = await unsubscribing.unary(
        "Unsubscribe",
        pb.UnsubscribeRequest(client_id=unsubscribing_id, message_name=NAME),
        pb.UnsubscribeResponse,
    )
    assert answer.success
    stream.cancel()
    # Another client whose stream ends: it may come back with the same id.
    reconnecting = Raw(server, "grpc-python/1.66.0")
    reconnecting_id = await reconnecting.connect(python)
    other_stream = reconnecting.subscribe(reconnecting_id, NAME)
    await other_stream.wait_for_connection()
    other_stream.cancel()
    # The closing client holds a lease when it goes.
    publisher = Raw(server, "grpc-python/1.66.0")
    publisher_id = await publisher.connect(sender)
    published = await publisher.unary(
        "PublishMessage",
        pb.PublishMessageRequest(
            client_id=publisher_id,
            message_name=NAME,
            payload=seal(b"{}", gopher.app_id),
            delivery_to=gopher.app_id,
        ),
        pb.PublishMessageResponse,
    )
    assert published.success
    await eventually(lambda: server.engine.statistics().in_flight == 1)
    for stream in streams:
        stream.cancel()
    await closing.channel.close()
    closed_at = time.monotonic()

    await eventually(
        lambda: server.engine.sessions.get(closing_id) is None, timeout_s=10, what="go client gone"
    )
    assert time.monotonic() - closed_at <= seconds(10)
    assert server.engine.statistics().in_flight == 0  # its lease went back
    assert await server.engine.store.backlog() == {gopher.app_id: 1}
    # Its app has room again (max_clients_per_app=1); the others are still here.
    again = Raw(server, GO_AGENT)
    await again.connect(gopher)
    assert server.engine.sessions.get(unsubscribing_id) is not None
    assert server.engine.sessions.get(reconnecting_id) is not None
    for raw in (unsubscribing, reconnecting, publisher, again):
        await raw.channel.close()


async def test_records_and_replays_carry_an_integer_logged_at(server: TestServer) -> None:
    # The Go WebSocket client reads loggedAt as an int64 and drops a record
    # whose loggedAt is a string or has a fraction.
    app = await server.create_app("gopher")
    ws = await ws_connect(f"ws://127.0.0.1:{server.http_port}/")  # the URL verbatim, as Go
    await ws.send(f"CONN;ACCESS_KEY=:{app.app_key}")
    reply = str(await asyncio.wait_for(ws.recv(), seconds(5)))
    client_id = reply.split("clientId=", 1)[1].split(",", 1)[0]
    await ws.send(f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{NAME}")
    assert await asyncio.wait_for(ws.recv(), seconds(5)) == "+PASS:subscribed"
    payload = seal(b'{"a":1}', app.app_id)
    await ws.send(
        f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:{NAME};PAYLOAD=:{payload}"
        f";DELIVERY_TO=:{app.app_id};METADATA=:{{}}"
    )
    frames = [str(await asyncio.wait_for(ws.recv(), seconds(5))) for _ in range(2)]
    (record_frame,) = [f for f in frames if f.startswith("+RECORD:")]
    record = json.loads(record_frame.removeprefix("+RECORD:"))
    await ws.send(f"REPLAY;CLIENT_ID=:{client_id};EVENT_IDEM=:{record['idem']};EVENT_NAME=:{NAME}")
    replay_frame = str(await asyncio.wait_for(ws.recv(), seconds(5)))
    replayed = json.loads(replay_frame.removeprefix("+REPLAY:"))
    for found in (record, replayed):
        assert type(found["loggedAt"]) is int
    await ws.close()


# What the engine answers to each refusal, word for word. The Go client
# re-sends a request whose refusal contains the word "connection" (three
# times), so no text says it unless the failure is one.
GRPC_REFUSALS = {
    "connect bad key": "app key is not valid (unknown or revoked)",
    "connect over limit": "app 'gopher' already has 1 connected clients, the limit is 1",
    "publish unknown client": "unknown client_id: connect first",
    "publish bad name": (
        "malformed message name 'bad;name': use segments of letters, digits, '_', '.', '-'"
        " separated by single '/'"
    ),
    "publish bad recipient": "recipient 'xyz' is not base64 (expected an app id)",
    "publish unknown recipient": f"recipient {'A' * 43}= is not a registered app",
    "publish bad payload": "payload is not a base64-encoded JSON envelope",
    "publish too big": (
        "payload holds about 9008 bytes of JSON (a 16216-byte envelope), more than the limit"
        " of 4096 bytes"
    ),
    "publish bad metadata": "metadata is not valid JSON",
    "ack unknown": "message 'nope' not found",
    "defer bad delay": "delay_ms -5 is outside 0..86400000 (24 h)",
    "discard unknown": "message 'nope' not found",
    "replay unknown": "message 'nope' not found",
    "subscribe bad name": (
        "malformed message name 'bad;name': use segments of letters, digits, '_', '.', '-'"
        " separated by single '/'"
    ),
}
WS_REFUSALS = {
    "command before CONN": "-FAIL:not connected: send CONN first (got SUB)",
    "CONN twice": "-FAIL:already connected: send CONN once per socket",
    "another client's id": "-FAIL:CLIENT_ID 'someone-else' is not the client id of this socket",
    "subscribe bad name": (
        "-FAIL:malformed message name 'bad//name': use segments of letters, digits, '_', '.',"
        " '-' separated by single '/'"
    ),
}


async def test_refusal_texts_are_pinned_and_never_mention_a_connection(
    server: TestServer,
) -> None:
    app = await server.create_app("gopher")
    other = await server.create_app("other")
    go = Raw(server, GO_AGENT)
    seen: dict[str, str] = {}
    refused = await go.unary("Connect", pb.ConnectRequest(access_key="nope"), pb.ConnectResponse)
    seen["connect bad key"] = refused.error_message
    client_id = await go.connect(app)
    refused = await go.unary(
        "Connect", pb.ConnectRequest(access_key=app.app_key), pb.ConnectResponse
    )
    seen["connect over limit"] = refused.error_message

    async def publish(**changes: str) -> str:
        request = {
            "client_id": client_id,
            "message_name": NAME,
            "payload": seal(b"{}", other.app_id),
            "delivery_to": other.app_id,
            "metadata": "{}",
            **changes,
        }
        answer = await go.unary(
            "PublishMessage", pb.PublishMessageRequest(**request), pb.PublishMessageResponse
        )
        assert not answer.success
        return str(answer.error_message)

    seen["publish unknown client"] = await publish(client_id="nobody")
    seen["publish bad name"] = await publish(message_name="bad;name")
    seen["publish bad recipient"] = await publish(delivery_to="xyz")
    seen["publish unknown recipient"] = await publish(delivery_to="A" * 43 + "=")
    seen["publish bad payload"] = await publish(payload="not base64!")
    big = seal(b'{"a":"' + b"x" * 9000 + b'"}', other.app_id)
    seen["publish too big"] = await publish(payload=big)
    seen["publish bad metadata"] = await publish(metadata="{not json")
    for verb, request, response, key in (
        (
            "AcknowledgeMessage",
            pb.AcknowledgeRequest(client_id=client_id, message_idem="nope", message_name=NAME),
            pb.AcknowledgeResponse,
            "ack unknown",
        ),
        (
            "DeferMessage",
            pb.DeferRequest(client_id=client_id, message_idem="nope", delay_ms=-5),
            pb.DeferResponse,
            "defer bad delay",
        ),
        (
            "DiscardMessage",
            pb.DiscardRequest(client_id=client_id, message_idem="nope"),
            pb.DiscardResponse,
            "discard unknown",
        ),
        (
            "ReplayMessage",
            pb.ReplayRequest(client_id=client_id, message_idem="nope", message_name=NAME),
            pb.ReplayResponse,
            "replay unknown",
        ),
    ):
        answer = await go.unary(verb, request, response)
        assert not answer.success
        seen[key] = answer.message
    with pytest.raises(grpc.aio.AioRpcError) as status:
        async for _ in go.subscribe(client_id, "bad;name"):
            pass
    seen["subscribe bad name"] = str(status.value.details())
    assert seen == GRPC_REFUSALS

    ws_seen: dict[str, str] = {}
    ws = await ws_connect(f"ws://127.0.0.1:{server.http_port}/")
    await ws.send(f"SUB;CLIENT_ID=:x;EVENT_NAME=:{NAME}")
    ws_seen["command before CONN"] = str(await asyncio.wait_for(ws.recv(), seconds(5)))
    await ws.send(f"CONN;ACCESS_KEY=:{other.app_key}")
    reply = str(await asyncio.wait_for(ws.recv(), seconds(5)))
    ws_id = reply.split("clientId=", 1)[1].split(",", 1)[0]
    for key, command in (
        ("CONN twice", f"CONN;ACCESS_KEY=:{other.app_key}"),
        ("another client's id", f"SUB;CLIENT_ID=:someone-else;EVENT_NAME=:{NAME}"),
        ("subscribe bad name", f"SUB;CLIENT_ID=:{ws_id};EVENT_NAME=:bad//name"),
    ):
        await ws.send(command)
        ws_seen[key] = str(await asyncio.wait_for(ws.recv(), seconds(5)))
    await ws.close()
    assert ws_seen == WS_REFUSALS
    for text in (*seen.values(), *ws_seen.values()):
        assert "connection" not in text.lower()
    await go.channel.close()
