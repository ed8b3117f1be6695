"""Two engine cores in one process over one store instance, on every backend.

This is the shape of a cluster (several engine nodes over one shared store)
without the network: the store alone must keep the cores from delivering a
message to two clients at once, numbering a block twice, or storing a
retried publish twice.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from ensync.protocol.headers import IDEMPOTENCY_HEADER
from ensync.server.config import EngineConfig
from ensync.server.core.apps import NewApp
from ensync.server.runtime.engine import Engine
from ensync.server.store import Store
from tests.conformance.stores import BACKENDS, Backend
from tests.support.clock import FakeClock
from tests.support.engine_calls import Calls
from tests.support.timing import eventually
from tests.unit.server.fakes import FakeRouter, envelope

__all__: list[str] = []

NAME = "orders/created"


@dataclass
class Cluster:
    store: Store
    clock: FakeClock
    a: Engine
    b: Engine
    alice: NewApp
    bob: NewApp

    async def publish(self, core: Engine, client_id: str, i: int, key: str | None = None) -> str:
        headers = {IDEMPOTENCY_HEADER: key} if key is not None else {}
        metadata = json.dumps({"persist": True, "headers": headers})
        return await Calls(core).publish(
            client_id, NAME, envelope(self.bob.app_id), self.bob.app_id, metadata
        )


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
async def cluster(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    backend: Backend = request.param
    store = backend.factory(tmp_path)
    await store.open()
    clock = FakeClock()
    config = EngineConfig(ack_deadline_ms=1_000, redelivery_backoff_ms=(0,))
    a, b = Engine(store, config, clock=clock), Engine(store, config, clock=clock)
    await a.start()
    await b.start()
    try:
        alice = await a.apps.create("alice")
        bob = await b.apps.create("bob")
        yield Cluster(store, clock, a, b, alice, bob)
    finally:
        await a.stop()
        await b.stop()
        await store.close()


async def test_no_message_is_delivered_to_two_clients_at_once(cluster: Cluster) -> None:
    on_a, on_b = FakeRouter(), FakeRouter()
    first = await Calls(cluster.a).connect(cluster.bob.app_key, on_a)
    second = await Calls(cluster.b).connect(cluster.bob.app_key, on_b)
    Calls(cluster.a).subscribe(first.client_id, NAME)
    Calls(cluster.b).subscribe(second.client_id, NAME)
    publisher = await Calls(cluster.a).connect(cluster.alice.app_key, FakeRouter())
    sent = [await cluster.publish(cluster.a, publisher.client_id, i) for i in range(200)]

    def delivered() -> list[str]:
        return [d.idem for d in on_a.received + on_b.received]

    await eventually(lambda: len(delivered()) >= 200, what="200 deliveries")
    assert sorted(delivered()) == sorted(sent)  # each exactly once
    assert on_a.received
    assert on_b.received  # the cores compete for one partition
    # Past the deadline every message is delivered once more, still never twice at once.
    cluster.clock.advance(1_000)
    await eventually(lambda: len(delivered()) >= 400, what="200 redeliveries")
    assert sorted(delivered()) == sorted(sent * 2)
    assert {d.attempt for d in on_a.received + on_b.received} == {1, 2}


async def test_no_block_number_is_given_twice(cluster: Cluster) -> None:
    via_a = await Calls(cluster.a).connect(cluster.alice.app_key, FakeRouter())
    via_b = await Calls(cluster.b).connect(cluster.alice.app_key, FakeRouter())
    idems = await asyncio.gather(
        *(
            cluster.publish(core, client.client_id, i)
            for i in range(100)
            for core, client in ((cluster.a, via_a), (cluster.b, via_b))
        )
    )
    blocks = []
    for idem in idems:
        stored = await cluster.store.get(idem)
        assert stored is not None
        blocks.append(stored.block)
    assert sorted(blocks) == list(range(1, 201))


async def test_a_publish_retried_through_another_core_is_stored_once(cluster: Cluster) -> None:
    via_a = await Calls(cluster.a).connect(cluster.alice.app_key, FakeRouter())
    via_b = await Calls(cluster.b).connect(cluster.alice.app_key, FakeRouter())
    original = await cluster.publish(cluster.a, via_a.client_id, 1, key="retry-me")
    retried = await cluster.publish(cluster.b, via_b.client_id, 1, key="retry-me")
    assert retried == original
    assert cluster.b.stats.deduplicated == 1
    assert await cluster.store.backlog() == {cluster.bob.app_id: 1}


async def test_a_lease_held_by_a_vanished_core_comes_back_to_the_other(cluster: Cluster) -> None:
    on_a, on_b = FakeRouter(), FakeRouter()
    first = await Calls(cluster.a).connect(cluster.bob.app_key, on_a)
    Calls(cluster.a).subscribe(first.client_id, NAME)
    publisher = await Calls(cluster.b).connect(cluster.alice.app_key, FakeRouter())
    idem = await cluster.publish(cluster.b, publisher.client_id, 1)
    await eventually(lambda: [d.idem for d in on_a.received] == [idem], what="delivery on a")
    # Core a stops answering (its client's lease stays in the store); b's
    # client takes the message once the lease ran out.
    on_a.open = False
    second = await Calls(cluster.b).connect(cluster.bob.app_key, on_b)
    Calls(cluster.b).subscribe(second.client_id, NAME)
    cluster.clock.advance(1_000)
    await eventually(lambda: [d.idem for d in on_b.received] == [idem], what="redelivery on b")
    assert on_b.received[0].attempt == 2
