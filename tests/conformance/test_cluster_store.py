"""Two engine nodes' stores on a real nats-server (store/jetstream/cluster_store.py,
store/jetstream/peers.py): every call answered whichever node owns its
partition, news of a partition reaching the node that waits for it, and
calls that wait for a slot's new owner while it moves."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator

import pytest

from ensync.server.core.ids import new_idem
from ensync.server.store import MessageState, NewMessage, Release, Settlement
from ensync.server.store.jetstream.cluster_store import ClusterStore
from ensync.server.store.ownership import LeaseTiming, slot_of
from tests.conformance.stores import POLICY, RECIPIENT, T0, append, claim, idems, new
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually

SLOTS = 8
TIMING = LeaseTiming(ttl_ms=3000, renew_every_ms=300, margin_ms=1200)


@pytest.fixture
async def pair(tmp_path: pathlib.Path) -> AsyncIterator[tuple[ClusterStore, ClusterStore]]:
    """Two nodes of one namespace, each serving half the slots."""
    made = [
        ClusterStore(
            [nats_url()],
            namespace=namespace_for(tmp_path),
            slots=SLOTS,
            node=node,
            timing=TIMING,
        )
        for node in ("a", "b")
    ]
    try:
        for store in made:
            await store.open()
        first, second = made
        await eventually(
            lambda: len(first._table.slots) == len(second._table.slots) == SLOTS // 2,
            15,
            "both nodes serving half the slots",
        )
        yield first, second
    finally:
        for store in made:
            await store.close()


def names_of(store: ClusterStore, *, served: bool, count: int = 2) -> list[str]:
    """Message names whose partitions ``store`` serves (or does not)."""
    found = [
        name
        for name in (f"orders/{i}" for i in range(200))
        if store.serves(slot_of(RECIPIENT, name, SLOTS)) is served
    ]
    return found[:count]


def message(name: str, index: int, **changes: object) -> NewMessage:
    """A publish whose id carries its partition's slot, as the engine makes them."""
    idem = new_idem(T0 + index, slot=slot_of(RECIPIENT, name, SLOTS))
    return new(idem, name=name, **changes)


async def test_every_call_is_answered_whichever_node_owns_the_partition(
    pair: tuple[ClusterStore, ClusterStore],
) -> None:
    first, second = pair
    here, there = names_of(first, served=True)[0], names_of(first, served=False)[0]
    sent = [message(name, i) for i in range(3) for name in (here, there)]
    results = await append(first, *sent)
    assert [(r.error, r.block) for r in results] == [(None, b) for b in (1, 1, 2, 2, 3, 3)]
    (later,) = await append(second, message(there, 9))
    assert later.block == 4  # one numbering, whichever node took the publish
    for store, name in ((second, here), (first, there)):  # each claims the other's partition
        claimed = await claim(store, name=name)
        assert [lease.message.block for lease in claimed.leases][:3] == [1, 2, 3]
        first_lease, second_lease, *_ = claimed.leases
        assert await store.extend(first_lease.message.idem, first_lease.token, T0 + 9_000)
        done = await store.settle(
            [Settlement(first_lease.message.idem, MessageState.ACKED)], now_ms=T0 + 1
        )
        assert done == [True]
        (released,) = await store.release(
            [Release(second_lease.message.idem, second_lease.token)], now_ms=T0, policy=POLICY
        )
        assert released.visible_at_ms is not None
        assert await store.defer(second_lease.message.idem, T0 + 50_000, T0 + 2)
        acked = await store.get(first_lease.message.idem)
        assert acked is not None
        assert acked.state is MessageState.ACKED
    # Dead letters and the backlog of every node, from either.
    dead = message(there, 20)
    await append(second, dead)
    await first.settle([Settlement(dead.idem, MessageState.DEAD, "bad")], now_ms=T0 + 3)
    for store in pair:
        assert [m.idem for m in await store.list_dead(RECIPIENT, 10)] == [dead.idem]
        assert [r.idem for r in await store.list_dead_refs(RECIPIENT)] == [dead.idem]
        assert (await store.backlog())[RECIPIENT] == 7 - 2  # published, less the acked
    assert await first.redrive(dead.idem, T0 + 4)
    assert await second.list_dead(RECIPIENT, 10) == []


async def test_news_of_a_partition_owned_elsewhere_reaches_the_node_that_waits(
    pair: tuple[ClusterStore, ClusterStore],
) -> None:
    first, second = pair
    there = names_of(first, served=False)[0]
    heard: list[tuple[str, str]] = []
    first.watch(lambda recipient, name: heard.append((recipient, name)))
    assert (await claim(first, name=there)).leases == ()  # waits for news of it
    sent = message(there, 1)
    await append(second, sent)
    await eventually(lambda: (RECIPIENT, there) in heard, 5, "news of the partition")
    assert idems(await claim(first, name=there)) == [sent.idem]


async def test_a_call_waits_for_the_new_owner_when_a_node_leaves(
    pair: tuple[ClusterStore, ClusterStore],
) -> None:
    first, second = pair
    there = names_of(first, served=False)[0]
    await append(first, message(there, 1))
    await second.close()  # lets its slots go: the first node takes them
    (stored,) = await append(first, message(there, 2))
    assert (stored.error, stored.block) == (None, 2)
    await eventually(lambda: len(first._table.slots) == SLOTS, 15, "one node serving all")
    assert len(idems(await claim(first, name=there))) == 2


async def test_calls_fail_clearly_when_no_node_serves_a_slot(tmp_path: pathlib.Path) -> None:
    store = ClusterStore(
        [nats_url()],
        namespace=namespace_for(tmp_path),
        slots=SLOTS,
        node="alone",
        timing=TIMING,
        route_within_s=0.5,
    )
    await store.open()
    try:
        keeper = store._keeper
        assert keeper is not None
        there = names_of(store, served=True)[0]
        await keeper.stop(release=True)  # serves nothing, and nobody else does
        with pytest.raises(Exception, match="no owner"):
            await asyncio.wait_for(claim(store, name=there), 10)
    finally:
        await store.close()


async def test_a_call_that_waited_for_an_owner_counts_its_times_from_after_the_wait(
    pair: tuple[ClusterStore, ClusterStore],
) -> None:
    first, second = pair
    there = names_of(first, served=False)[0]
    await append(first, message(there, 1))
    # The owner stops answering and renewing (a node that died): its slots
    # are owned again once their leases lapse, seconds later.
    keeper, server = second._keeper, second._server
    assert keeper is not None
    assert server is not None
    assert keeper._task is not None
    keeper._task.cancel()
    await server.stop()
    started = time.monotonic()
    (lease,) = (await claim(first, name=there)).leases
    waited_ms = (time.monotonic() - started) * 1000
    assert waited_ms > 1_000
    # A lease taken with the claim's time of seconds ago would be over already.
    assert lease.deadline_ms >= T0 + POLICY.lease_ms + waited_ms - 100
