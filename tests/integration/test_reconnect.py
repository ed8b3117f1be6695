"""The SDK heals a broken link: reconnect, resubscribe, keep handlers and pauses."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from ensync import ConnectionState, EnSyncConnectionError, EnSyncEngine, EnSyncError, Message
from ensync.client.grpc_transport import GrpcClientTransport
from ensync.server.core.calls import Subscribe
from ensync.server.core.errors import ServiceError
from ensync.server.store import StoreError
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.cli import free_port
from tests.support.proxy import tcp_proxy
from tests.support.timing import eventually


async def test_reconnects_resubscribes_and_keeps_handlers(server: TestServer) -> None:
    alice = await server.create_app("alice")
    bob = await server.create_app("bob")
    publisher_engine = EnSyncEngine(server.grpc_url)
    async with tcp_proxy(server.server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}", reconnect_interval=50, max_reconnect_attempts=20
        )
        events: list[str] = []
        engine.on("disconnect", lambda cause: events.append("disconnect"))
        engine.on("reconnect", lambda attempt: events.append("reconnect"))
        try:
            publisher = await publisher_engine.create_client(alice.app_key)
            client = await engine.create_client(bob.app_key, app_secret_key=bob.secret_key)
            got: list[Message] = []
            also: list[Message] = []
            sub = await client.subscribe("x")
            sub.on(got.append)
            sub.on(also.append)
            paused = await client.subscribe("held")
            held: list[Message] = []
            paused.on(held.append)
            await paused.pause("kept across reconnects")
            first_id = client.client_id

            await publisher.publish("x", [bob.app_id], {"i": 1})
            await eventually(lambda: len(got) == 1)

            await proxy.cut()
            await eventually(lambda: "disconnect" in events)
            state_while_down = client.state
            assert state_while_down is ConnectionState.RECONNECTING
            # A publish while the link is down waits for it and is then sent.
            pending = asyncio.create_task(client.publish("x", [bob.app_id], {"i": 0}))
            # Positive control: a reconnect attempt was turned away meanwhile.
            await eventually(lambda: proxy.refused >= 1)
            assert not pending.done()
            proxy.restore()
            await eventually(lambda: "reconnect" in events, timeout_s=10)
            retried = await asyncio.wait_for(pending, 10)
            await eventually(lambda: retried in [m.idem for m in got])
            assert client.state is ConnectionState.CONNECTED
            assert client.client_id != first_id  # a new session

            await publisher.publish("held", [bob.app_id], {"i": 3})
            # Positive control: a message published after it arrives.
            await publisher.publish("x", [bob.app_id], {"i": 2})
            await eventually(lambda: [m.payload["i"] for m in got][-1:] == [2])
            assert [m.payload["i"] for m in also][-1] == 2
            assert held == []  # the pause was restored on the new session
            await paused.resume()
            await eventually(lambda: len(held) == 1)
        finally:
            await engine.close()
            await publisher_engine.close()


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_gives_up_after_max_attempts_and_says_so(server: TestServer, transport: str) -> None:
    bob = await server.create_app("bob")
    port = server.server.grpc_port if transport == "grpc" else server.http_port
    async with tcp_proxy(port) as proxy:
        options: dict[str, Any] = {
            "reconnect_interval": 20,
            "max_reconnect_attempts": 2,
            "call_timeout": 500,
        }
        engine: Any = (
            EnSyncEngine(f"grpc://127.0.0.1:{proxy.port}", **options)
            if transport == "grpc"
            else WsEngine(f"ws://127.0.0.1:{proxy.port}", **options)
        )
        errors: list[EnSyncError] = []
        engine.on("error", errors.append)
        try:
            client = await engine.create_client(bob.app_key, app_secret_key=bob.secret_key)
            iterated = await client.subscribe("x")
            handled = await client.subscribe("y")
            handled.on(lambda message: None)

            async def iterate() -> None:
                async for _ in iterated:
                    pass

            loop = asyncio.get_running_loop().create_task(iterate())
            await asyncio.sleep(0.05)
            await proxy.cut()
            await eventually(lambda: client.state is ConnectionState.FAILED, timeout_s=10)
            assert len(errors) == 1  # handlers hear of it through "error" listeners
            assert "2 attempts" in errors[0].message
            assert errors[0].name == "EnSyncConnectionError"
            # The async for loop ends with the error instead of waiting forever.
            with pytest.raises(EnSyncConnectionError, match="2 attempts"):
                await asyncio.wait_for(loop, 5)
            with pytest.raises(EnSyncConnectionError, match="2 attempts"):
                async for _ in iterated:
                    pass
            # Further calls fail at once, saying why.
            started = asyncio.get_running_loop().time()
            with pytest.raises(EnSyncConnectionError, match=r"failed for good.*2 attempts"):
                await client.publish("x", [bob.app_id], {"late": True})
            with pytest.raises(EnSyncConnectionError, match="failed for good"):
                await iterated.ack("01ABC", 1)
            assert asyncio.get_running_loop().time() - started < 0.4
        finally:
            await engine.close()


async def test_revoked_key_fails_the_reconnect_loudly(server: TestServer) -> None:
    bob = await server.create_app("bob")
    async with tcp_proxy(server.server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}", reconnect_interval=20, max_reconnect_attempts=50
        )
        errors: list[EnSyncError] = []
        engine.on("error", errors.append)
        try:
            client = await engine.create_client(bob.app_key, app_secret_key=bob.secret_key)
            await client.subscribe("x")
            await server.engine.apps.revoke("bob")
            await proxy.cut()
            proxy.restore()
            await eventually(lambda: client.state is ConnectionState.FAILED, timeout_s=10)
            assert errors
            assert errors[0].name == "EnSyncAuthError"
        finally:
            await engine.close()


async def test_a_publish_whose_answer_was_lost_is_not_stored_twice(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await server.create_app("alice")
    bob = await server.create_app("bob")
    engine = EnSyncEngine(server.grpc_url, reconnect_interval=20, max_reconnect_attempts=20)
    real_publish = GrpcClientTransport.publish
    lost = {"once": False}

    async def answer_lost(self: GrpcClientTransport, *args: Any) -> str:
        idem = await real_publish(self, *args)
        if not lost["once"]:
            # The engine stored it, but the answer never reaches the client.
            lost["once"] = True
            self._report_lost(EnSyncConnectionError("cut after the commit"))
            raise EnSyncConnectionError("connection to the engine lost")
        return idem

    monkeypatch.setattr(GrpcClientTransport, "publish", answer_lost)
    try:
        client = await engine.create_client(alice.app_key)
        idem = await client.publish("x", [bob.app_id], {"i": 1})
        assert lost["once"]
        assert await server.engine.store.backlog() == {bob.app_id: 1}  # stored once
        stored = await server.engine.store.get(idem)
        assert stored is not None
        assert server.engine.stats.deduplicated == 1
    finally:
        await engine.close()


async def test_a_refused_resubscribe_fails_loudly(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = await server.create_app("bob")
    async with tcp_proxy(server.server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}", reconnect_interval=20, max_reconnect_attempts=50
        )
        errors: list[EnSyncError] = []
        engine.on("error", errors.append)
        try:
            client = await engine.create_client(bob.app_key, app_secret_key=bob.secret_key)
            await client.subscribe("x")

            def refuse(call: Subscribe) -> None:
                raise ServiceError.invalid(f"subscriptions to {call.name!r} are closed")

            monkeypatch.setattr(server.engine.operations, "subscribe", refuse)
            await proxy.cut()
            proxy.restore()
            await eventually(lambda: client.state is ConnectionState.FAILED, timeout_s=10)
            assert len(errors) == 1
            assert errors[0].name == "EnSyncSubscriptionError"
            assert "'x'" in errors[0].message
        finally:
            await engine.close()


async def test_a_publisher_heals_at_once_when_the_engine_restarts(tmp_path: Path) -> None:
    """No subscription, no heartbeat due: the first refused call (the engine
    forgot the session) makes the client reconnect, and the publish goes
    through on the new session."""
    from ensync.server.config import ServerConfig
    from ensync.server.serving import running_server

    port = free_port()
    config = ServerConfig(
        data_dir=tmp_path, grpc_address=f"127.0.0.1:{port}", http_address="127.0.0.1:0"
    )
    engine = EnSyncEngine(
        f"grpc://127.0.0.1:{port}", reconnect_interval=20, max_reconnect_attempts=50
    )
    try:
        async with running_server(config) as first:
            alice = await first.engine.apps.create("alice")
            bob = await first.engine.apps.create("bob")
            client = await engine.create_client(alice.app_key)
            await client.publish("x", [bob.app_id], {"i": 1})
        async with running_server(config) as second:
            started = asyncio.get_running_loop().time()
            idem = await asyncio.wait_for(client.publish("x", [bob.app_id], {"i": 2}), 10)
            assert asyncio.get_running_loop().time() - started < 5  # not a heartbeat away
            assert await second.engine.store.get(idem) is not None
    finally:
        await engine.close()


async def test_calls_cut_off_by_a_reconnect_fail_as_connection_errors() -> None:
    """A call in flight when its transport is replaced raises EnSyncConnectionError,
    never a bare CancelledError."""
    from ensync.client.grpc_transport import GrpcClientTransport as Transport
    from ensync.client.transport import SettleKind, Settlement
    from ensync.protocol.urls import parse_engine_url

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts the connection, never answers
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(parse_engine_url(f"grpc://127.0.0.1:{port}"), call_timeout_s=10)
    try:
        ack = Settlement(SettleKind.ACK, "x", "01IDEM", 1)
        pending = asyncio.create_task(transport.settle(ack))
        await asyncio.sleep(0.2)
        await transport.close()
        with pytest.raises(EnSyncConnectionError):
            await asyncio.wait_for(pending, 5)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_stalled_link_is_detected_and_healed(server: TestServer, transport: str) -> None:
    """The link stays open but carries nothing: heartbeats time out, the
    client reconnects once bytes flow again, and its handler keeps working."""
    alice = await server.create_app("alice")
    bob = await server.create_app("bob")
    target = server.server.grpc_port if transport == "grpc" else server.http_port
    publisher = EnSyncEngine(server.grpc_url)
    async with tcp_proxy(target) as proxy:
        url = f"{transport}://127.0.0.1:{proxy.port}"
        options: dict[str, Any] = {
            "reconnect_interval": 50,
            "max_reconnect_attempts": 100,
            "call_timeout": 500,
        }
        if transport == "ws":
            engine: Any = WsEngine(url, ping_interval=200, **options)
        else:
            engine = EnSyncEngine(url, heartbeat_interval=200, **options)
        events: list[str] = []
        engine.on("disconnect", lambda cause: events.append("disconnect"))
        engine.on("reconnect", lambda attempt: events.append("reconnect"))
        try:
            sender = await publisher.create_client(alice.app_key)
            client = await engine.create_client(bob.app_key, app_secret_key=bob.secret_key)
            got: list[Message] = []
            (await client.subscribe("x")).on(got.append)
            await sender.publish("x", [bob.app_id], {"i": 1})
            await eventually(lambda: len(got) == 1)
            proxy.stall()
            await eventually(lambda: "disconnect" in events, timeout_s=10)
            proxy.restore()
            await eventually(lambda: "reconnect" in events, timeout_s=15)
            await sender.publish("x", [bob.app_id], {"i": 2})
            await eventually(lambda: [m.payload["i"] for m in got][-1:] == [2], timeout_s=10)
        finally:
            await engine.close()
            await publisher.close()


async def test_the_first_attempt_after_the_engine_is_back_connects(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    # gRPC shares a connection between channels to one address and, after
    # failures, backs off before it tries again: a reconnect attempt inside
    # that window would fail without trying. Each attempt has its own.
    app = await server.create_app("a")
    caplog.set_level(logging.DEBUG, logger="ensync.client.connection")
    async with tcp_proxy(server.server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}", reconnect_interval=50, max_reconnect_attempts=0
        )
        # Retry every 100 ms at most, to see attempts inside gRPC's back-off.
        engine._options = dataclasses.replace(engine._options, max_reconnect_delay_ms=100)
        reconnected: list[int] = []
        engine.on("reconnect", reconnected.append)
        try:
            await engine.create_client(app.app_key)
            await proxy.cut()
            await asyncio.sleep(4)  # long enough for gRPC's back-off to grow past 1 s
            failed_before = failures(caplog)
            assert failed_before >= 5  # positive control: the link really was down
            proxy.restore()
            await eventually(lambda: bool(reconnected), timeout_s=10)
            # At most the one attempt that was under way when the link came back.
            assert failures(caplog) - failed_before <= 1
        finally:
            await engine.close()


def failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum("reconnect attempt" in r.getMessage() for r in caplog.records)


async def test_a_store_outage_at_connect_is_worth_retrying_not_a_refused_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A replicated store electing a leader fails the key lookup for a moment:
    # clients must keep trying, not give up as if the key were wrong.
    async with run_engine() as server:
        app = await server.create_app("shop")

        async def unavailable(key_hash: bytes) -> None:
            raise StoreError("no leader yet")

        monkeypatch.setattr(server.engine.store, "get_app_by_key_hash", unavailable)
        for engine in (
            EnSyncEngine(server.grpc_url, max_reconnect_attempts=1),
            WsEngine(server.ws_url, max_reconnect_attempts=1),
        ):
            try:
                with pytest.raises(EnSyncConnectionError, match="storage failed; retry later"):
                    await engine.create_client(app.app_key)
            finally:
                await engine.close()
        monkeypatch.undo()
        engine = EnSyncEngine(server.grpc_url)
        try:
            assert (await engine.create_client(app.app_key)).client_id
        finally:
            await engine.close()
