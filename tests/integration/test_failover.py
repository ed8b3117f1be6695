"""The SDK over several engine nodes: ``EnSyncEngine([url1, url2])`` connects
to the first that answers, spreads clients over the nodes, and moves a
client whose node goes away to another, subscriptions included."""

from __future__ import annotations

import contextlib
import pathlib

import pytest

from ensync import EnSyncEngine, EnSyncValidationError, Message
from ensync.testing import run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.cli import free_port
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually

__all__: list[str] = []


async def test_a_client_connects_to_the_first_node_that_answers() -> None:
    async with run_engine() as server:
        app = await server.create_app("shop")
        dead = f"grpc://127.0.0.1:{free_port()}"
        engine = EnSyncEngine([dead, server.grpc_url], max_reconnect_attempts=1)
        try:
            client = await engine.create_client(app.app_key)
            assert client.client_id
        finally:
            await engine.close()


def test_engine_urls_are_checked() -> None:
    with pytest.raises(EnSyncValidationError, match="at least one engine URL"):
        EnSyncEngine([])
    with pytest.raises(EnSyncValidationError, match="ws://"):
        WsEngine(["ws://localhost:8080", "localhost"])


async def test_clients_spread_over_the_nodes_and_move_when_theirs_stops(
    tmp_path: pathlib.Path,
) -> None:
    store = f"{nats_url()}?namespace={namespace_for(tmp_path)}"
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(run_engine(store))
        node_two = contextlib.AsyncExitStack()
        stack.push_async_callback(node_two.aclose)
        second = await node_two.enter_async_context(run_engine(store))
        shop = await first.create_app("shop")
        warehouse = await first.create_app("warehouse")
        engine = EnSyncEngine([first.grpc_url, second.grpc_url], reconnect_interval=100)
        stack.push_async_callback(engine.close)
        publisher = await engine.create_client(shop.app_key)
        consumer = await engine.create_client(
            warehouse.app_key, app_secret_key=warehouse.secret_key
        )
        # One client on each node.
        assert set(first.engine.sessions) == {publisher.client_id}
        assert set(second.engine.sessions) == {consumer.client_id}
        got: list[Message] = []
        subscription = await consumer.subscribe("orders/created")
        subscription.on(got.append)
        await publisher.publish("orders/created", [warehouse.app_id], {"i": 1})
        await eventually(lambda: [m.payload for m in got] == [{"i": 1}])
        # The consumer's node stops; it moves to the first node, subscription and all.
        await node_two.aclose()
        await eventually(lambda: consumer.client_id in first.engine.sessions, what="the move")
        await publisher.publish("orders/created", [warehouse.app_id], {"i": 2})
        await eventually(lambda: [m.payload for m in got] == [{"i": 1}, {"i": 2}])
