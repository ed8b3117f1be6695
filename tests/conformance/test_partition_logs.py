"""Partition logs on a real nats-server: what an owner writes, a new owner reads back.

The owner of a slot writes its partitions' messages and state records
(store/jetstream/partition_logs.py) fenced by its epoch; a new owner reads
every partition's messages and state in one walk. Checked here: the
round trip, snapshots, group commit in order, and fencing (a former owner's
batch is refused whole and its writer stops).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from ensync.server.store.base import StoredMessage, StoreError
from ensync.server.store.jetstream.api import Batch, Got, JetStreamApi
from ensync.server.store.jetstream.partition_logs import (
    FencedError,
    SlotLog,
    _message_record,
    messages_subject,
    recover_slot,
)
from ensync.server.store.jetstream.slots import (
    SlotLease,
    SlotLeases,
    fence_subject,
)
from ensync.server.store.partition_log import (
    Deferred,
    Delivered,
    PartitionState,
    Redelivered,
    Settled,
)
from ensync.server.store.settled import SettledSet
from tests.support.nats import owned_stream

ORDERS = ("app-b", "orders/created")
REFUNDS = ("app-b", "refunds.v2/issued")  # a dot and a slash in the name


@dataclasses.dataclass
class Cluster:
    api: JetStreamApi
    stream: str
    prefix: str
    a: SlotLeases
    b: SlotLeases

    def log(self, lease: SlotLease, on_failed: Callable[[], None] | None = None) -> SlotLog:
        """The slot's log as the holder of ``lease`` writes it."""
        return SlotLog(self.api, self.stream, self.prefix, lease, on_failed)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """Two nodes' leases on an ownership stream of its own."""
    async with owned_stream("OWNED") as stream:
        api, name, prefix = stream.api, stream.name, stream.prefix
        yield Cluster(
            api,
            name,
            prefix,
            SlotLeases(api, name, prefix, "node-a", ttl_s=30),
            SlotLeases(api, name, prefix, "node-b", ttl_s=30),
        )


def message(key: tuple[str, str], block: int, *, persist: bool = True) -> StoredMessage:
    return StoredMessage(
        idem=f"IDEM{block:04d}{key[1][:3]}",
        recipient=key[0],
        name=key[1],
        block=block,
        payload=f"sealed-{block}",
        metadata='{"persist":true,"headers":{}}',
        sender="app-a",
        created_at_ms=1_700_000_000_000 + block,
        payload_metadata='{"n":1}' if block % 2 else None,
        expires_at_ms=None,
        dedupe_key="order-7" if block == 1 else None,
        persist=persist,
    )


async def take_over(
    cluster: Cluster, leases: SlotLeases, held: SlotLease | None, slot: int
) -> SlotLease:
    """``leases``' node takes ``slot`` (the holder's lease gone, as if it lapsed)."""
    if held is not None:
        await cluster.api.delete(cluster.stream, held.lease_seq)
    lease = await leases.acquire(slot)
    assert lease is not None
    return lease


async def test_a_new_owner_reads_back_every_partitions_messages_and_state(
    cluster: Cluster,
) -> None:
    lease = await take_over(cluster, cluster.a, None, 5)
    log = cluster.log(lease)
    orders = [message(ORDERS, block) for block in range(1, 6)]
    await log.write(ORDERS, messages=orders[:3])
    await log.write(REFUNDS, messages=[message(REFUNDS, 1)])
    await log.write(ORDERS, messages=orders[3:], records=[Delivered(1, 4)])
    await log.write(ORDERS, records=[Settled(((1, 2),)), Redelivered(3, 2), Deferred(4, 99)])
    await log.write(REFUNDS, records=[Delivered(1, 1), Settled(((1, 1),))])
    await log.close()

    taken = await take_over(cluster, cluster.b, lease, 5)
    assert taken.epoch == 2
    found = await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)

    assert sorted(found) == sorted([ORDERS, REFUNDS])
    assert found[ORDERS].messages == orders  # every field, in block order
    state = found[ORDERS].state
    assert (state.cursor, state.settled.floor, state.attempts, state.deferred) == (
        4,
        2,
        {3: 2},
        {4: 99},
    )
    assert state.to_deliver_again(now_ms=100) == [3, 4]
    assert found[ORDERS].next_block == 6
    assert found[REFUNDS].messages == [message(REFUNDS, 1)]
    assert found[REFUNDS].state.to_deliver_again(now_ms=100) == []
    assert found[REFUNDS].next_block == 2


async def test_a_snapshot_replaces_the_records_before_it(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 2)
    log = cluster.log(lease)
    await log.write(ORDERS, messages=[message(ORDERS, b) for b in (1, 2, 3)])
    await log.write(ORDERS, records=[Delivered(1, 3), Deferred(2, 500), Redelivered(3, 4)])
    # The owner's state moved on (block 2 delivered again and settled, 3 too):
    # the snapshot says so, and the earlier records must not count again.
    await log.snapshot(ORDERS, PartitionState(settled=SettledSet(0, [(2, 3)]), cursor=3))
    await log.write(ORDERS, records=[Settled(((1, 1),))])
    await log.close()

    taken = await take_over(cluster, cluster.b, lease, 2)
    found = await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)
    state = found[ORDERS].state
    assert (state.settled.floor, state.cursor, state.attempts, state.deferred) == (3, 3, {}, {})
    assert state.to_deliver_again(now_ms=1000) == []
    assert found[ORDERS].next_block == 4


async def test_writes_made_together_share_batches_and_keep_their_order(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 9)
    log = cluster.log(lease)
    writes = [log.write(ORDERS, messages=[message(ORDERS, block)]) for block in range(1, 201)]
    await asyncio.gather(*writes)
    assert log.batches < 50  # one in flight, the rest gathered behind it
    got = await cluster.api.get_after(
        cluster.stream, messages_subject(cluster.prefix, 9, ORDERS), 1, 1000
    )
    assert [record.json()["b"] for record in got] == list(range(1, 201))


async def test_persist_false_messages_stay_off_the_log(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 1)
    log = cluster.log(lease)
    await log.write(ORDERS, messages=[message(ORDERS, 1), message(ORDERS, 2, persist=False)])
    taken = await take_over(cluster, cluster.b, lease, 1)
    found = await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)
    assert [m.block for m in found[ORDERS].messages] == [1]
    assert found[ORDERS].next_block == 2  # block 2 was lost with its owner, as documented


async def test_a_former_owners_writes_are_refused_whole_and_its_log_stops(
    cluster: Cluster,
) -> None:
    lease = await take_over(cluster, cluster.a, None, 7)
    fenced: list[int] = []
    log = cluster.log(lease, on_failed=lambda: fenced.append(1))
    await log.write(ORDERS, messages=[message(ORDERS, 1)], records=[Delivered(1, 1)])

    # b takes the slot over while a (paused, cut off) does not know it yet.
    taken = await take_over(cluster, cluster.b, lease, 7)
    late = log.write(ORDERS, messages=[message(ORDERS, 2)], records=[Settled(((1, 1),))])
    with pytest.raises(FencedError, match="another owner"):
        await late
    assert fenced == [1]
    assert log.fenced
    with pytest.raises(FencedError):  # refused at once from now on
        await log.write(ORDERS, records=[Delivered(2, 2)])
    with pytest.raises(FencedError):
        await log.purge(ORDERS, messages_below=10)

    # Nothing of the late batch was stored: the new owner sees a's first write only.
    found = await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)
    assert [m.block for m in found[ORDERS].messages] == [1]
    assert found[ORDERS].state.to_deliver_again(now_ms=0) == [1]

    # The new owner writes, and a later owner reads both owners' writes.
    new_log = cluster.log(taken)
    await new_log.write(ORDERS, messages=[message(ORDERS, 2)], records=[Settled(((1, 1),))])
    third = await take_over(cluster, cluster.a, taken, 7)
    again = await recover_slot(cluster.api, cluster.stream, cluster.prefix, third)
    assert [m.block for m in again[ORDERS].messages] == [1, 2]
    assert again[ORDERS].state.settled.floor == 1


async def test_a_recovery_overtaken_by_another_owner_is_refused(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 4)
    await cluster.log(lease).write(ORDERS, messages=[message(ORDERS, 1)])
    taken = await take_over(cluster, cluster.b, lease, 4)
    await take_over(cluster, cluster.a, taken, 4)  # before b has read anything
    with pytest.raises(FencedError, match="taken over"):
        await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)


async def test_a_write_larger_than_a_batch_is_refused(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 3)
    log = cluster.log(lease)
    with pytest.raises(ValueError, match="at most 999"):
        await log.write(ORDERS, records=[Delivered(b, b) for b in range(1, 1001)])
    await log.write(ORDERS, records=[Delivered(1, 1)])  # and the log goes on


class LaggingReplicas:
    """Direct gets answered by replicas that have the log only up to a point,
    which moves on with each read (as followers catch up)."""

    def __init__(self, log: list[Got], visible: int, step: int) -> None:
        self.log = log
        self.visible = visible
        self.step = step
        self.reads = 0

    async def get_after(self, stream: str, subject: str, seq: int, count: int) -> Batch:
        self.reads += 1
        out = [
            got
            for got in self.log
            if seq <= got.seq <= self.visible and matches(subject, got.subject)
        ]
        self.visible += self.step
        return Batch(out[:count])


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


def replica_log(prefix: str, slot: int, blocks: int) -> tuple[list[Got], SlotLease]:
    """A slot's log as a former owner left it, then a new owner's fence record."""
    subject = messages_subject(prefix, slot, ORDERS)
    log = [
        Got(subject, block, _message_record(message(ORDERS, block)), {})
        for block in range(1, blocks + 1)
    ]
    fence = Got(fence_subject(prefix, slot), blocks + 1, b'{"node":"b","epoch":2}', {})
    lease = SlotLease(slot=slot, epoch=2, lease_seq=0, fence_seq=fence.seq)
    return [*log, fence], lease


async def test_a_lagging_replicas_short_answer_is_read_on_until_the_owners_fence() -> None:
    log, lease = replica_log("ns.o", 6, blocks=5)
    replicas = LaggingReplicas(log, visible=2, step=1)
    found = await recover_slot(replicas, "S", "ns.o", lease)  # type: ignore[arg-type]
    assert [m.block for m in found[ORDERS].messages] == [1, 2, 3, 4, 5]
    assert replicas.reads > 1


async def test_replicas_that_never_catch_up_fail_the_recovery() -> None:
    log, lease = replica_log("ns.o", 6, blocks=5)
    replicas = LaggingReplicas(log, visible=3, step=0)
    with pytest.raises(StoreError, match="did not catch up"):
        await recover_slot(replicas, "S", "ns.o", lease, within_s=0.3)  # type: ignore[arg-type]


async def test_writes_report_their_sequences_in_order(cluster: Cluster) -> None:
    lease = await take_over(cluster, cluster.a, None, 8)
    log = cluster.log(lease)
    first, second = await asyncio.gather(
        log.write(ORDERS, messages=[message(ORDERS, 1), message(ORDERS, 2)]),
        log.write(REFUNDS, messages=[message(REFUNDS, 1)], records=[Delivered(1, 1)]),
    )
    assert len(first) == 2
    assert len(second) == 2
    for seq, block in zip(first, (1, 2), strict=True):
        got = await cluster.api.get_one(cluster.stream, {"seq": seq})
        assert got is not None
        assert got.json()["b"] == block
    stored = await cluster.api.get_one(cluster.stream, {"seq": second[1]})
    assert stored is not None
    assert stored.data == b'["d",1,1]'


async def test_retention_purges_a_partitions_settled_messages_and_covered_records_in_bulk(
    cluster: Cluster,
) -> None:
    lease = await take_over(cluster, cluster.a, None, 11)
    log = cluster.log(lease)
    seqs = await log.write(ORDERS, messages=[message(ORDERS, b) for b in range(1, 11)])
    await log.write(ORDERS, records=[Delivered(1, 8), Settled(((1, 6),)), Deferred(8, 10**13)])
    state = PartitionState(settled=SettledSet(6), cursor=8, deferred={8: 10**13})
    (snapshot_seq,) = await log.snapshot(ORDERS, state)
    await log.write(REFUNDS, messages=[message(REFUNDS, 1)])  # another partition: untouched

    removed = await log.purge(ORDERS, messages_below=seqs[6], records_below=snapshot_seq)
    assert removed == 6 + 3  # blocks 1-6, and the three records the snapshot covers
    info = await cluster.api.request(
        f"$JS.API.STREAM.INFO.{cluster.stream}", {"subjects_filter": f"{cluster.prefix}.*.11.>"}
    )
    # Blocks 7-10, the snapshot, the other partition's message and the fence.
    assert sum(info["state"]["subjects"].values()) == 4 + 1 + 1 + 1

    taken = await take_over(cluster, cluster.b, lease, 11)
    found = await recover_slot(cluster.api, cluster.stream, cluster.prefix, taken)
    assert [m.block for m in found[ORDERS].messages] == [7, 8, 9, 10]
    recovered = found[ORDERS].state
    assert (recovered.settled.floor, recovered.cursor, recovered.deferred) == (6, 8, {8: 10**13})
    assert recovered.to_deliver_again(now_ms=0) == [7]
    assert found[ORDERS].next_block == 11
    assert [m.block for m in found[REFUNDS].messages] == [1]
