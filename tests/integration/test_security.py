"""Only the right app gets in, reads or settles; limits hold; TLS works.

Each protection is checked over both transports where a client can reach it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ensync import (
    ConnectionState,
    EnSyncAuthError,
    EnSyncClient,
    EnSyncConnectionError,
    EnSyncEngine,
    EnSyncError,
    EnSyncPublishError,
    EnSyncReplayError,
    EnSyncSubscriptionError,
    Message,
)
from ensync._proto import ensync_pb2 as pb
from ensync.client.engine import BaseEngine
from ensync.crypto import seal
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.runtime.clock import wall_clock_ms
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.http import http_get
from tests.support.timing import eventually, seconds

TRANSPORTS = ["grpc", "ws"]


@dataclass
class World:
    server: TestServer
    transport: str
    alice: NewApp
    bob: NewApp
    engines: list[BaseEngine]

    def engine(self, **options: Any) -> BaseEngine:
        made: BaseEngine = (
            WsEngine(self.server.ws_url, **options)
            if self.transport == "ws"
            else EnSyncEngine(self.server.grpc_url, **options)
        )
        self.engines.append(made)
        return made

    async def connect(self, app: NewApp, **options: Any) -> EnSyncClient:
        return await self.engine(**options).create_client(
            app.app_key, app_secret_key=app.secret_key
        )

    def cli_registry(self) -> AppRegistry:
        """A registry of its own on the same store: what ``ensync app ...`` does
        from another process (the engine learns of it only by re-reading)."""
        return AppRegistry(self.server.engine.store, wall_clock_ms, cache_ms=0)


@pytest.fixture(params=TRANSPORTS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    async with run_engine(
        ack_deadline_ms=2000,
        app_refresh_ms=50,
        max_clients_per_app=3,
        max_subscriptions_per_client=2,
        max_metadata_bytes=200,
        max_name_length=40,
        max_payload_bytes=4096,
    ) as server:
        state = World(
            server,
            request.param,
            await server.create_app("alice"),
            await server.create_app("bob"),
            [],
        )
        try:
            yield state
        finally:
            for engine in state.engines:
                await engine.close()


# --- keys ---------------------------------------------------------------------


async def test_revoking_cuts_off_connected_clients(world: World) -> None:
    errors: list[EnSyncError] = []
    engine = world.engine(reconnect_interval=20, max_reconnect_attempts=3)
    engine.on("error", errors.append)
    bob = await engine.create_client(world.bob.app_key, app_secret_key=world.bob.secret_key)
    await bob.subscribe("x")
    await world.cli_registry().revoke("bob")
    # The engine ends the session; the client cannot get back in.
    await eventually(lambda: bool(errors), timeout_s=5)
    assert errors[0].name == "EnSyncAuthError"
    assert not any(s.app.name == "bob" for s in world.server.engine.sessions.values())
    with pytest.raises(EnSyncConnectionError):
        await bob.publish("x", [world.alice.app_id], {"a": 1})
    with pytest.raises(EnSyncAuthError):
        await world.engine().create_client(world.bob.app_key)


async def test_rotating_a_key_retires_the_old_one(world: World) -> None:
    alice = await world.connect(world.alice, max_reconnect_attempts=1, reconnect_interval=20)
    new_key = await world.cli_registry().rotate_key("alice")
    await eventually(
        lambda: not any(s.app.name == "alice" for s in world.server.engine.sessions.values()),
        timeout_s=5,
    )
    with pytest.raises(EnSyncAuthError):
        await world.engine().create_client(world.alice.app_key)
    renewed = await world.engine().create_client(new_key)
    assert await renewed.publish("x", [world.bob.app_id], {"a": 1})
    # The old client's next call fails; it tries to come back with the old
    # key and gives up loudly.
    with pytest.raises(EnSyncConnectionError):
        await alice.publish("x", [world.bob.app_id], {"a": 2})
    await eventually(lambda: alice.state is ConnectionState.FAILED, timeout_s=5)


async def test_raw_grpc_streams_end_when_their_app_is_revoked() -> None:
    async with run_engine(app_refresh_ms=50) as server:
        bob = await server.create_app("bob")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
            connect_call = channel.unary_unary(
                "/ensync.EnSyncService/Connect",
                request_serializer=pb.ConnectRequest.SerializeToString,
                response_deserializer=pb.ConnectResponse.FromString,
            )
            client_id = (await connect_call(pb.ConnectRequest(access_key=bob.app_key))).client_id
            stream = channel.unary_stream(
                "/ensync.EnSyncService/Subscribe",
                request_serializer=pb.SubscribeRequest.SerializeToString,
                response_deserializer=pb.MessageStreamResponse.FromString,
            )(pb.SubscribeRequest(client_id=client_id, message_name="x"))
            await stream.wait_for_connection()
            await AppRegistry(server.engine.store, wall_clock_ms, 0).revoke("bob")
            assert await asyncio.wait_for(stream.code(), seconds(5)) == grpc.StatusCode.OK
            heartbeat = channel.unary_unary(
                "/ensync.EnSyncService/Heartbeat",
                request_serializer=pb.HeartbeatRequest.SerializeToString,
                response_deserializer=pb.HeartbeatResponse.FromString,
            )
            assert not (await heartbeat(pb.HeartbeatRequest(client_id=client_id))).success


async def test_raw_websockets_close_when_their_app_is_revoked() -> None:
    async with run_engine(app_refresh_ms=50) as server:
        bob = await server.create_app("bob")
        async with connect(f"{server.ws_url}/message") as ws:
            await ws.send(f"CONN;ACCESS_KEY=:{bob.app_key}")
            assert str(await ws.recv()).startswith("+PASS:")
            await AppRegistry(server.engine.store, wall_clock_ms, 0).revoke("bob")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), seconds(5))
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008


# --- isolation ----------------------------------------------------------------


async def test_another_app_cannot_settle_replay_or_probe_a_message(world: World) -> None:
    alice = await world.connect(world.alice)
    bob = await world.connect(world.bob)
    bob_sub = await bob.subscribe("x", auto_ack=False)
    got: list[Message] = []
    bob_sub.on(got.append)
    idem = await alice.publish("x", [world.bob.app_id], {"secret": 1})
    await eventually(lambda: len(got) == 1)
    mallory = await world.connect(world.alice)  # another app than the recipient
    sub = await mallory.subscribe("x")
    texts: dict[str, list[str]] = {"real": [], "unknown": []}
    for kind, target in (("real", idem), ("unknown", "01AAAAAAAAAAAAAAAAAAAAAAAA")):
        for verb in (
            sub.ack(target, 1),
            sub.defer(target, 1000, "x"),
            sub.discard(target, "x"),
            sub.replay(target),
        ):
            with pytest.raises(EnSyncError) as caught:
                await verb
            texts[kind].append(caught.value.message.replace(target, "<idem>"))
    # Exactly the same answers whether the message exists or not.
    assert texts["real"] == texts["unknown"]
    assert all("not found" in text for text in texts["real"])
    stored = await world.server.engine.store.get(idem)
    assert stored is not None
    assert stored.state.name == "PENDING"
    await bob_sub.ack(idem, 1)


async def test_subscribing_to_the_same_name_does_not_read_another_apps_messages(
    world: World,
) -> None:
    alice = await world.connect(world.alice)
    bob = await world.connect(world.bob)
    eavesdropper: list[Message] = []
    (await alice.subscribe("private")).on(eavesdropper.append)
    owner: list[Message] = []
    (await bob.subscribe("private")).on(owner.append)
    await alice.publish("private", [world.bob.app_id], {"for": "bob"})
    await eventually(lambda: len(owner) == 1)
    # Positive control: alice's own message on the name, published after,
    # reaches her; bob's would have reached her before it.
    mine = await bob.publish("private", [world.alice.app_id], {"for": "alice"})
    await eventually(lambda: len(eavesdropper) == 1)
    assert [m.idem for m in eavesdropper] == [mine]


async def test_the_sender_is_always_set_by_the_engine(world: World) -> None:
    alice = await world.connect(world.alice)
    bob = await world.connect(world.bob)
    got: list[Message] = []
    (await bob.subscribe("x")).on(got.append)
    # Whatever a publisher writes into its metadata, the sender is its own app id.
    await alice.publish(
        "x", [world.bob.app_id], {"a": 1}, {"headers": {"sender": world.bob.app_id}}
    )
    await eventually(lambda: len(got) == 1)
    assert got[0].sender == world.alice.app_id
    with pytest.raises(EnSyncReplayError):
        await (await alice.subscribe("y")).replay(got[0].idem)


# --- authorization ------------------------------------------------------------


async def test_publish_and_subscribe_rules_are_enforced(world: World) -> None:
    await world.cli_registry().allow("alice", publish=("orders/*",), subscribe=("billing/#",))
    alice = await world.connect(world.alice)  # a new session reads the app afresh
    assert await alice.publish("orders/created", [world.bob.app_id], {"a": 1})
    with pytest.raises(EnSyncPublishError) as refused:
        await alice.publish("payments/made", [world.bob.app_id], {"a": 1})
    assert "may not publish 'payments/made'" in refused.value.message
    await alice.subscribe("billing/invoices/new")
    with pytest.raises(EnSyncSubscriptionError) as denied:
        await alice.subscribe("orders/created")
    assert "may not subscribe to 'orders/created'" in denied.value.message
    assert world.server.engine.stats.denied == 2


async def test_narrowing_rules_stops_deliveries_of_a_forbidden_name(world: World) -> None:
    alice = await world.connect(world.alice)
    bob = await world.connect(world.bob)
    got: list[Message] = []
    (await bob.subscribe("news")).on(got.append)
    await alice.publish("news", [world.bob.app_id], {"i": 1})
    await eventually(lambda: len(got) == 1)
    billing: list[Message] = []
    (await bob.subscribe("billing/due")).on(billing.append)
    await world.cli_registry().allow("bob", subscribe=("billing/#",))
    # The engine re-reads apps (every 50 ms here): wait until it has.
    sessions = world.server.engine.sessions
    await eventually(
        lambda: all("news" not in s.subscriptions for s in sessions.values() if s.app.name == "bob")
    )
    await alice.publish("news", [world.bob.app_id], {"i": 2})
    # Positive control: a message on an allowed name, published after, arrives.
    await alice.publish("billing/due", [world.bob.app_id], {"i": 3})
    await eventually(lambda: len(billing) == 1)
    assert len(got) == 1


# --- limits -------------------------------------------------------------------


async def test_limits_refuse_clearly_and_are_counted(world: World) -> None:
    alice = await world.connect(world.alice)
    to_bob = [world.bob.app_id]
    # The SDK knows the payload limit (the engine says it at connect) and
    # refuses before sending, naming the size and the limit.
    with pytest.raises(EnSyncPublishError) as too_big:
        await alice.publish("x", to_bob, {"p": "x" * 5000})
    assert too_big.value.message == (
        "payload is 5008 bytes of JSON, more than the engine's limit of 4096 bytes"
    )
    assert world.server.engine.stats.limit_rejections.get("payload_size", 0) == 0
    # Exactly at the limit still goes through, envelope and all.
    await alice.publish("x", to_bob, {"p": "x" * (4096 - 8)})
    cases: list[tuple[str, Callable[[], Any], str]] = [
        (
            "metadata_size",
            lambda: alice.publish("x", to_bob, {"a": 1}, {"headers": {"h": "y" * 300}}),
            "metadata",
        ),
        ("name_length", lambda: alice.publish("n" * 41, to_bob, {"a": 1}), "40"),
    ]
    for limit, call, words in cases:
        with pytest.raises(EnSyncPublishError) as refused:
            await call()
        assert words in refused.value.message, limit
        assert world.server.engine.stats.limit_rejections[limit] == 1
    await alice.subscribe("one")
    await alice.subscribe("two")
    with pytest.raises(EnSyncSubscriptionError) as too_many:
        await alice.subscribe("three")
    assert "limit is 2" in too_many.value.message
    await world.connect(world.alice)
    await world.connect(world.alice)
    with pytest.raises(EnSyncError) as crowded:
        await world.connect(world.alice)
    assert "limit is 3" in crowded.value.message
    counts = world.server.engine.stats.limit_rejections
    assert counts["subscriptions_per_client"] == 1
    assert counts["clients_per_app"] == 1


async def test_rate_limit_per_app(world: World) -> None:
    world.server.engine.config = world.server.engine.config.__class__(
        **{**_fields(world.server.engine.config), "rate_limit_per_app": 20}
    )
    alice = await world.connect(world.alice, reconnect_interval=20)
    results = await asyncio.gather(
        *(alice.publish("x", [world.bob.app_id], {"i": i}) for i in range(60)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, EnSyncError)]
    assert refused
    assert all("exceeded its rate of 20 requests/s" in str(r) for r in refused)
    assert len(refused) < 60
    assert world.server.engine.stats.limit_rejections["request_rate"] == len(refused)


def _fields(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


async def test_grpc_limits_never_use_a_status_clients_retry() -> None:
    async with run_engine(max_payload_bytes=100, rate_limit_per_app=5) as server:
        alice = await server.create_app("alice")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
            call = channel.unary_unary(
                "/ensync.EnSyncService/Connect",
                request_serializer=pb.ConnectRequest.SerializeToString,
                response_deserializer=pb.ConnectResponse.FromString,
            )
            client_id = (await call(pb.ConnectRequest(access_key=alice.app_key))).client_id
            publish = channel.unary_unary(
                "/ensync.EnSyncService/PublishMessage",
                request_serializer=pb.PublishMessageRequest.SerializeToString,
                response_deserializer=pb.PublishMessageResponse.FromString,
            )
            answers = [
                await publish(
                    pb.PublishMessageRequest(
                        client_id=client_id,
                        message_name="x",
                        payload=seal(b'{"x":"' + b"a" * 300 + b'"}', alice.app_id),
                        delivery_to=alice.app_id,
                        metadata="{}",
                    )
                )
                for _ in range(10)
            ]
    # Every refusal (size, then rate) came back as success=false, never a status.
    assert not any(answer.success for answer in answers)
    assert any("exceeded its rate" in answer.error_message for answer in answers)
    assert any("more than the limit of 100 bytes" in answer.error_message for answer in answers)


async def test_metrics_count_refusals(world: World) -> None:
    alice = await world.connect(world.alice)
    with pytest.raises(EnSyncPublishError):
        await alice.publish("n" * 41, [world.bob.app_id], {"a": 1})
    _, text = await http_get(world.server.http_port, "/metrics")
    assert 'ensync_limit_rejections_total{limit="name_length"} 1.0' in text
    assert "ensync_denied_total 0.0" in text


# --- TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for extra in server_cert.cert_chain_pems[1:]:
        extra.write_to_path(str(files["cert"]), append=True)
    return files


async def test_tls_on_both_transports(certificates: dict[str, Path]) -> None:
    tls = (certificates["cert"], certificates["key"])
    async with run_engine(tls=tls) as server:
        alice = await server.create_app("alice")
        ca = str(certificates["ca"])
        secure = [
            EnSyncEngine(server.grpcs_url, ca_file=ca),
            WsEngine(server.wss_url, ca_file=ca),
        ]
        try:
            for number, engine in enumerate(secure):
                client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
                got: list[Message] = []
                name = f"tls/{number}"
                (await client.subscribe(name)).on(got.append)
                await client.publish(name, [alice.app_id], {"over": "tls"})
                await eventually(lambda g=got: len(g) == 1)  # type: ignore[misc]
        finally:
            for engine in secure:
                await engine.close()
        # Without the CA the certificate is not trusted; plaintext is refused.
        untrusted = [
            EnSyncEngine(server.grpcs_url, call_timeout=3000),
            WsEngine(server.wss_url, call_timeout=3000),
            EnSyncEngine(f"grpc://localhost:{server.server.grpc_port}", call_timeout=3000),
            WsEngine(f"ws://localhost:{server.http_port}", call_timeout=3000),
        ]
        for engine in untrusted:
            with pytest.raises(EnSyncConnectionError):
                await engine.create_client(alice.app_key)
            await engine.close()


def test_serve_refuses_half_or_unreadable_tls(tmp_path: Path) -> None:
    from tests.support.cli import ensync

    half = ensync("serve", "--data", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem"))
    assert half.returncode == 2
    assert "--tls-cert and --tls-key go together" in half.stderr
    missing = ensync(
        "serve",
        "--data",
        str(tmp_path),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--tls-cert",
        str(tmp_path / "nope.pem"),
        "--tls-key",
        str(tmp_path / "nope.key"),
    )
    assert missing.returncode == 1
    assert "TLS" in missing.stderr


def test_cli_allow_and_rotate(tmp_path: Path) -> None:
    from tests.support.cli import ensync

    data = str(tmp_path)
    created = json.loads(ensync("app", "create", "shop", "--data", data, "--json").stdout)
    allowed = ensync(
        "app", "allow", "shop", "--publish", "orders/*", "--subscribe", "billing/#", "--data", data
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "publish orders/*; subscribe billing/#" in allowed.stdout
    listed = json.loads(ensync("app", "list", "--json", "--data", data).stdout)
    assert listed[0]["publish"] == ["orders/*"]
    assert listed[0]["subscribe"] == ["billing/#"]
    bad = ensync("app", "allow", "shop", "--publish", "a/#/b", "--data", data)
    assert bad.returncode == 2
    assert "'#' may only be the last segment" in bad.stderr
    rotated = json.loads(ensync("app", "rotate-key", "shop", "--json", "--data", data).stdout)
    assert rotated["name"] == "shop"
    assert rotated["app_key"] != created["app_key"]
    assert rotated["app_key"].startswith("ensk_")


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_the_payload_limit_is_the_json_before_encryption(transport: str) -> None:
    # The default limit, 1 MiB of JSON: its envelope (~1.8 MiB) fits the
    # transports, and one byte more is refused by the SDK before sending.
    async with run_engine() as server:
        alice = await server.create_app("alice")
        limit = server.engine.config.max_payload_bytes
        engine: Any = (
            EnSyncEngine(server.grpc_url, max_reconnect_attempts=0)
            if transport == "grpc"
            else WsEngine(server.ws_url, max_reconnect_attempts=0)
        )
        events: list[str] = []
        engine.on("disconnect", lambda cause: events.append(f"disconnect: {cause}"))
        try:
            client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
            at_limit = {"p": "x" * (limit - 8)}
            await client.publish("big", [alice.app_id], at_limit)
            together = await client.publish(
                "big", [alice.app_id, (await server.create_app("bob")).app_id], at_limit
            )
            assert together.count(",") == 1
            with pytest.raises(EnSyncPublishError, match=f"limit of {limit} bytes"):
                await client.publish("big", [alice.app_id], {"p": "x" * (limit - 7)})
            assert events == []  # never taken for a connection problem
            assert (await server.engine.store.backlog())[alice.app_id] == 2
        finally:
            await engine.close()
