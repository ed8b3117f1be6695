"""Observing (``EnSyncClient.observe``, ``ensync tail``): copies of an app's
new messages without taking them, on both transports' batched session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ensync import (
    EnSyncEngine,
    EnSyncSubscriptionError,
    EnSyncValidationError,
    Message,
)
from ensync.client.engine import BaseEngine
from ensync.client.observation import Observation
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.proxy import tcp_proxy
from tests.support.timing import eventually, seconds


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with run_engine(ack_deadline_ms=5000) as running:
        yield running


@pytest.fixture(params=["grpc", "ws"])
async def make(
    request: pytest.FixtureRequest, server: TestServer
) -> AsyncIterator[Callable[..., BaseEngine]]:
    engines: list[BaseEngine] = []

    def new(**options: Any) -> BaseEngine:
        engine: BaseEngine = (
            WsEngine(server.ws_url, **options)
            if request.param == "ws"
            else EnSyncEngine(server.grpc_url, **options)
        )
        engines.append(engine)
        return engine

    yield new
    for engine in engines:
        await engine.close()


async def next_copy(observation: Observation) -> Message:
    return await asyncio.wait_for(anext(observation), seconds(5))


async def test_an_observer_sees_every_new_message_and_takes_none(
    server: TestServer, make: Callable[..., BaseEngine]
) -> None:
    shop, warehouse = await server.create_app("shop"), await server.create_app("warehouse")
    publisher = await make().create_client(shop.app_key)
    consumer = await make().create_client(warehouse.app_key, app_secret_key=warehouse.secret_key)
    watcher = await make().create_client(warehouse.app_key, app_secret_key=warehouse.secret_key)
    got: list[Message] = []
    sub = await consumer.subscribe("orders/created")
    sub.on(got.append)
    watching = await watcher.observe("orders/*")

    sent = [
        await publisher.publish("orders/created", [warehouse.app_id], {"i": i}) for i in range(5)
    ]
    await publisher.publish("billing/paid", [warehouse.app_id], {"not": "matched"})
    await publisher.publish("orders/shipped", [warehouse.app_id], {"i": 5})

    copies = [await next_copy(watching) for _ in range(6)]
    assert [c.idem for c in copies[:5]] == sent
    assert [c.payload for c in copies] == [{"i": i} for i in range(6)]
    assert copies[5].message_name == "orders/shipped"
    assert all(c.attempt == 0 and c.sender == shop.app_id for c in copies)
    # The consumer got and acked each message once: the observer leased nothing.
    await eventually(lambda: len(got) == 5)
    await eventually(lambda: server.engine.stats.acked == 5)
    assert [m.attempt for m in got] == [1] * 5
    # orders/shipped has no consumer: it waits for one, untouched.
    late = await consumer.subscribe("orders/shipped")
    late_got: list[Message] = []
    late.on(late_got.append)
    await eventually(lambda: len(late_got) == 1)
    assert late_got[0].attempt == 1
    assert watching.missed == 0
    # persist: false messages are copied too (they are stored, in memory).
    volatile = await publisher.publish(
        "orders/created", [warehouse.app_id], {"i": 6}, {"persist": False}
    )
    assert (await next_copy(watching)).idem == volatile
    assert server.engine.stats.observed == 7
    await watching.close()
    await eventually(lambda: not server.engine.observers)


async def test_only_names_the_app_may_subscribe_to_are_copied(
    server: TestServer, make: Callable[..., BaseEngine]
) -> None:
    shop, warehouse = await server.create_app("shop"), await server.create_app("warehouse")
    await server.engine.apps.allow("warehouse", subscribe=("orders/#",))
    publisher = await make().create_client(shop.app_key)
    watcher = await make().create_client(warehouse.app_key, app_secret_key=warehouse.secret_key)
    async with await watcher.observe("#") as watching:
        await publisher.publish("payroll/run", [warehouse.app_id], {"secret": True})
        await publisher.publish("orders/created", [warehouse.app_id], {"ok": True})
        copy = await next_copy(watching)
        assert copy.message_name == "orders/created"


async def test_bad_patterns_doubles_and_keyless_clients_are_refused(
    server: TestServer, make: Callable[..., BaseEngine]
) -> None:
    app = await server.create_app("warehouse")
    client = await make().create_client(app.app_key, app_secret_key=app.secret_key)
    with pytest.raises(EnSyncValidationError, match="pattern"):
        await client.observe("orders/#/x")
    keyless = await make().create_client(app.app_key)
    with pytest.raises(EnSyncValidationError, match="secret key"):
        await keyless.observe("orders/*")
    watching = await client.observe("orders/*")
    with pytest.raises(EnSyncSubscriptionError, match="already observing"):
        await client.observe("orders/*")
    await watching.close()
    again = await client.observe("orders/*")  # closed: the pattern is free again
    await again.close()


async def test_closing_the_client_ends_the_observation_on_the_engine(
    server: TestServer, make: Callable[..., BaseEngine]
) -> None:
    app = await server.create_app("warehouse")
    client = await make().create_client(app.app_key, app_secret_key=app.secret_key)
    watching = await client.observe("#")
    waiter = asyncio.create_task(anext(watching))
    assert server.engine.observers
    await client.close()
    await eventually(lambda: not server.engine.observers)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, seconds(5))


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_without_the_batched_session_observing_is_refused_clearly(transport: str) -> None:
    async with run_engine(sessions=False) as server:
        app = await server.create_app("warehouse")
        engine: BaseEngine = (
            WsEngine(server.ws_url) if transport == "ws" else EnSyncEngine(server.grpc_url)
        )
        try:
            client = await engine.create_client(app.app_key, app_secret_key=app.secret_key)
            with pytest.raises(EnSyncSubscriptionError, match="batched session"):
                await client.observe("#")
        finally:
            await engine.close()


async def test_an_observation_survives_a_reconnect(server: TestServer) -> None:
    shop, warehouse = await server.create_app("shop"), await server.create_app("warehouse")
    publisher_engine = EnSyncEngine(server.grpc_url)
    async with tcp_proxy(server.server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}", reconnect_interval=20, max_reconnect_attempts=50
        )
        reconnected: list[int] = []
        engine.on("reconnect", reconnected.append)
        try:
            publisher = await publisher_engine.create_client(shop.app_key)
            watcher = await engine.create_client(
                warehouse.app_key, app_secret_key=warehouse.secret_key
            )
            watching = await watcher.observe("orders/*")
            await publisher.publish("orders/created", [warehouse.app_id], {"i": 1})
            assert (await next_copy(watching)).payload == {"i": 1}
            await proxy.cut()
            proxy.restore()
            await eventually(lambda: bool(reconnected), timeout_s=10)
            await publisher.publish("orders/created", [warehouse.app_id], {"i": 2})
            assert (await next_copy(watching)).payload == {"i": 2}
        finally:
            await engine.close()
            await publisher_engine.close()


async def test_closing_an_observation_over_a_dead_link_does_not_raise(
    server: TestServer,
) -> None:
    app = await server.create_app("warehouse")
    async with tcp_proxy(server.grpc_port) as proxy:
        engine = EnSyncEngine(
            f"grpc://127.0.0.1:{proxy.port}",
            call_timeout=300,
            reconnect_interval=5000,
            max_reconnect_attempts=1,
        )
        try:
            client = await engine.create_client(app.app_key, app_secret_key=app.secret_key)
            watching = await client.observe("#")
            proxy.stall()  # the engine will never answer the stop
            await watching.close()
            await proxy.cut()
            await eventually(lambda: not server.engine.observers)
        finally:
            await engine.close()
