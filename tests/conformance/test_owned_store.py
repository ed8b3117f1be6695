"""One owner per partition on a real nats-server (store/jetstream/owned.py,
owned_store.py, store/jetstream/cluster_store.py): what a node that takes a slot
over finds, what a former owner can no longer do, and retention in bulk.
Calls forwarded between nodes: test_cluster_store.py.

The store contract itself runs against this backend in test_store.py and
test_lifecycle.py ("owned").
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ensync.server.core.ids import new_idem
from ensync.server.store import MessageState, Release, Settlement, StoreError
from ensync.server.store.jetstream.cluster_store import ClusterStore
from ensync.server.store.jetstream.owned import NotOwnedError
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.server.store.jetstream.partition_logs import FencedError
from ensync.server.store.ownership import LeaseTiming, slot_of
from tests.conformance.stores import (
    NAME,
    OTHER_NAME,
    POLICY,
    RECIPIENT,
    SENDER,
    T0,
    append,
    claim,
    idems,
    new,
)
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually

SLOTS = 4
# Short leases, so that a node that stops renewing loses its slots quickly,
# with room for a loaded machine's slow turns.
TIMING = LeaseTiming(ttl_ms=3000, renew_every_ms=300, margin_ms=1200)


@pytest.fixture
async def nodes(tmp_path: pathlib.Path) -> AsyncIterator[Callable[[str], ClusterStore]]:
    """Nodes of one namespace; every one closed at the end."""
    made: list[ClusterStore] = []

    def node(node_id: str) -> ClusterStore:
        store = ClusterStore(
            [nats_url()],
            namespace=namespace_for(tmp_path),
            slots=SLOTS,
            node=node_id,
            timing=TIMING,
        )
        made.append(store)
        return store

    try:
        yield node
    finally:
        for store in made:
            await store.close()


async def stream_messages(store: ClusterStore) -> int:
    info = await store.api.request(f"$JS.API.STREAM.INFO.{store.names.owned}")
    return int(info["state"]["messages"])


async def test_a_new_owner_finds_what_the_former_one_left(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first = nodes("a")
    await first.open()
    await append(
        first,
        *(new(f"m-{i}") for i in range(1, 7)),
        new("keyed", dedupe_key="k-1"),
        new("v", persist=False),
    )
    leases = {lease.message.idem: lease for lease in (await claim(first, limit=10)).leases}
    assert sorted(leases) == ["keyed", "m-1", "m-2", "m-3", "m-4", "m-5", "m-6", "v"]
    await first.settle(
        [Settlement("m-1", MessageState.ACKED), Settlement("m-2", MessageState.DEAD, "bad")],
        now_ms=T0 + 10,
    )
    assert await first.defer("m-3", T0 + 60_000, T0 + 20)
    await first.release([Release("m-4", leases["m-4"].token)], now_ms=T0 + 30, policy=POLICY)
    await first.close()  # lets its slots go at once

    second = nodes("b")
    await second.open()
    # Unsettled messages are pending again, in block order, their attempts
    # counted where a release recorded them; the deferral waits; the
    # persist: false message was lost with its owner.
    claimed = await claim(second, now_ms=T0 + 1_000, limit=10)
    assert idems(claimed) == ["m-4", "m-5", "m-6", "keyed"]
    assert [lease.message.attempts for lease in claimed.leases] == [2, 1, 1, 1]
    await second.settle(
        [Settlement(idem, MessageState.ACKED) for idem in idems(claimed)], now_ms=T0 + 1_000
    )
    assert idems(await claim(second, now_ms=T0 + 59_999)) == []
    assert idems(await claim(second, now_ms=T0 + 60_000)) == ["m-3"]
    acked = await second.get("m-1")
    assert acked is not None
    assert (acked.state, acked.settled_at_ms) == (MessageState.ACKED, T0 + 10)
    (dead,) = await second.list_dead(RECIPIENT, 10)
    assert (dead.idem, dead.dead_reason, dead.settled_at_ms) == ("m-2", "bad", T0 + 10)
    assert await second.get("v") is None
    # Numbering goes on after every block the former owner gave, and an
    # idempotency key it stored is still known.
    (later, again) = await append(second, new("later"), new("keyed-again", dedupe_key="k-1"))
    assert later.block == 9
    assert (again.idem, again.duplicate) == ("keyed", True)
    assert await second.redrive("m-2", T0 + 70_000)
    assert "m-2" in idems(await claim(second, now_ms=T0 + 70_000))


async def test_a_redelivered_message_reaches_the_delivery_limit_across_owners(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first = nodes("a")
    await first.open()
    await append(first, new("m-1"))
    for attempt in range(2):
        (lease,) = (await claim(first, now_ms=T0 + attempt * 10_000)).leases
        await first.release(
            [Release("m-1", lease.token, failure="boom")],
            now_ms=T0 + attempt * 10_000,
            policy=POLICY,
        )
    await first.close()
    second = nodes("b")
    await second.open()
    (lease,) = (await claim(second, now_ms=T0 + 100_000)).leases
    assert lease.message.attempts == 3  # the policy's last delivery
    (released,) = await second.release(
        [Release("m-1", lease.token, failure="boom")], now_ms=T0 + 100_000, policy=POLICY
    )
    assert released.dead


async def test_a_node_serves_only_its_share_and_refuses_the_rest(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first, second = nodes("a"), nodes("b")
    await first.open()
    await second.open()
    await eventually(
        lambda: (
            len(first._table.slots) == len(second._table.slots) == SLOTS // 2
            and set(first._table.slots).isdisjoint(second._table.slots)
        ),
        15,
        "both nodes serving half the slots",
    )
    names = [f"n/{i}" for i in range(40)]
    mine = [n for n in names if first.serves(slot_of(RECIPIENT, n, SLOTS))]
    theirs = [n for n in names if n not in mine]
    assert mine
    assert theirs
    # The store's own calls (the cluster store forwards the rest to its owner).
    results = await OwnedStore.append(
        first,
        [new("ok", name=mine[0]), new("no", name=theirs[0])],
        now_ms=T0,
        dedupe_since_ms=0,
    )
    assert results[0].error is None
    assert "not served by this node" in (results[1].error or "")
    with pytest.raises(NotOwnedError):
        await OwnedStore.claim(first, RECIPIENT, theirs[0], limit=1, now_ms=T0, policy=POLICY)
    (stored,) = await append(second, new("there", name=theirs[0]))
    assert (stored.error, stored.block) == (None, 1)


async def test_a_former_owner_that_stopped_renewing_is_fenced_off(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first = nodes("a")
    await first.open()
    await append(first, new("m-1"), new("m-2"))
    keeper = first._keeper
    assert keeper is not None
    assert keeper._task is not None
    # Paused: it neither renews nor notices that its leases ran out.
    keeper._task.cancel()
    await asyncio.gather(keeper._task, return_exceptions=True)
    second = nodes("b")
    await second.open()
    slot = slot_of(RECIPIENT, NAME, SLOTS)
    # Once the former owner's records lapsed.
    await eventually(lambda: second.serves(slot), 15, "the new owner serving the slot")
    assert idems(await claim(second)) == ["m-1", "m-2"]
    # The former owner still believes it serves the slot: JetStream refuses
    # its writes, and it stops serving the slot.
    assert first.serves(slot)
    with pytest.raises(FencedError):
        await first.settle([Settlement("m-1", MessageState.ACKED)], now_ms=T0)
    assert not first.serves(slot)
    # The new owner's state is what counts: m-1 was not settled there.
    settled = await second.get("m-1")
    assert settled is not None
    assert settled.state is MessageState.PENDING
    # And the former owner now hands the partition's calls to it.
    (late,) = await append(first, new("late"))
    assert (late.error, late.block) == (None, 3)


async def test_retention_purges_settled_messages_in_bulk_and_rolls_the_log_up(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first = nodes("a")
    await first.open()
    total = 600
    await append(first, *(new(f"m-{i:04d}") for i in range(total)), new("x", name=OTHER_NAME))
    while claimed := (await claim(first, limit=97)).leases:
        for lease in claimed:
            await first.settle([Settlement(lease.message.idem, MessageState.ACKED)], now_ms=T0)
    before = await stream_messages(first)
    assert before >= 2 * total  # messages, and a record per settlement
    assert await first.prune(T0 + 1) == total
    after = await stream_messages(first)
    # What is left: the other partition's message, a snapshot, fences and leases.
    assert after < 3 * SLOTS + 10
    await first.close()
    second = nodes("b")
    await second.open()
    assert await second.get("m-0000") is None
    assert idems(await claim(second, name=OTHER_NAME)) == ["x"]
    (later,) = await append(second, new("later"))
    assert later.block == total + 1


async def test_retention_stops_at_the_first_message_not_settled_before_the_cutoff(
    nodes: Callable[[str], ClusterStore],
) -> None:
    store = nodes("a")
    await store.open()
    await append(store, *(new(f"m-{i}") for i in range(1, 6)))
    await claim(store)
    await store.settle(
        [Settlement(idem, MessageState.ACKED) for idem in ("m-1", "m-2", "m-4")], now_ms=T0
    )
    await store.settle([Settlement("m-3", MessageState.ACKED)], now_ms=T0 + 100)
    assert await store.prune(T0 + 50) == 2  # m-1, m-2: m-3 was settled later
    assert await store.get("m-2") is None
    assert (await store.get("m-3")) is not None
    assert await store.prune(T0 + 200) == 2  # m-3, m-4: m-5 is pending
    assert (await store.get("m-5")) is not None


async def test_a_replay_finds_an_acknowledged_message_by_its_id(
    nodes: Callable[[str], ClusterStore],
) -> None:
    first = nodes("a")
    await first.open()
    slot = slot_of(RECIPIENT, NAME, SLOTS)
    made = [new_idem(T0 + i, slot=slot) for i in range(3)]
    await append(first, *(new(idem) for idem in made))
    await claim(first)
    await first.settle([Settlement(idem, MessageState.ACKED) for idem in made], now_ms=T0 + 5)
    await first.close()
    second = nodes("b")
    await second.open()
    found = await second.get(made[1])
    assert found is not None
    assert (found.idem, found.sender, found.block) == (made[1], SENDER, 2)
    assert (found.state, found.settled_at_ms) == (MessageState.ACKED, T0 + 5)
    assert await second.get(new_idem(T0, slot=slot)) is None


async def test_an_ack_whose_write_failed_is_never_answered_done_later(
    nodes: Callable[[str], ClusterStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # NATS did not answer a write (a server died, a leader election): the
    # outcome is unknown, so the slot is given up and read again, and an
    # ack retried meanwhile is not answered from what this node believed.
    store = nodes("a")
    await store.open()
    slot = slot_of(RECIPIENT, NAME, SLOTS)
    made = new_idem(T0, slot=slot)
    await append(store, new(made))
    await claim(store)
    api = store.api
    real = api.atomic
    failing = True

    async def flaky(messages: Any) -> int:
        if failing:
            raise StoreError("NATS did not answer in time")
        return await real(messages)

    monkeypatch.setattr(api, "atomic", flaky)
    with pytest.raises(StoreError):
        await store.settle([Settlement(made, MessageState.ACKED)], now_ms=T0 + 1)
    assert not store.serves(slot)  # given up at once
    failing = False
    # A read waits for the slot's next owner (this node again), which reads
    # the log: the message is pending, not acked.
    again = await store.get(made)
    assert again is not None
    assert again.state is MessageState.PENDING
    assert store.serves(slot)
    assert await store.settle([Settlement(made, MessageState.ACKED)], now_ms=T0 + 2) == [True]


async def test_a_read_of_a_message_being_acked_waits_for_the_ack_to_be_stored(
    nodes: Callable[[str], ClusterStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An ack retried while its first try is being written must not be
    # answered done from memory: the write may still fail.
    store = nodes("a")
    await store.open()
    made = new_idem(T0, slot=slot_of(RECIPIENT, NAME, SLOTS))
    await append(store, new(made))
    await claim(store)
    api = store.api
    release = asyncio.Event()

    async def stalled(messages: Any) -> int:
        await release.wait()
        raise StoreError("NATS did not answer in time")

    monkeypatch.setattr(api, "atomic", stalled)
    acking = asyncio.create_task(
        store.settle([Settlement(made, MessageState.ACKED)], now_ms=T0 + 1)
    )
    await asyncio.sleep(0.05)
    reading = asyncio.create_task(store.get(made))
    await asyncio.sleep(0.05)
    assert not reading.done()  # waits for the write
    release.set()
    with pytest.raises(StoreError):
        await acking
    with pytest.raises(StoreError):
        await reading
