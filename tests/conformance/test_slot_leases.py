"""Slot leases on a real nats-server: one owner at a time, lapsing, fenced takeovers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ensync.server.store.jetstream.api import ConflictError, JetStreamApi, Out
from ensync.server.store.jetstream.slots import SlotLeases
from tests.support.nats import owned_stream
from tests.support.timing import seconds


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[SlotLeases, SlotLeases, JetStreamApi]]:
    """Two nodes' leases on one stream of their own, and the API they share."""
    async with owned_stream("SLOTS") as stream:
        api, name, prefix = stream.api, stream.name, stream.prefix
        yield (
            SlotLeases(api, name, prefix, "node-a", ttl_s=1),
            SlotLeases(api, name, prefix, "node-b", ttl_s=1),
            api,
        )


async def test_one_owner_at_a_time_and_a_lapsed_lease_is_taken_over_fenced(
    nodes: tuple[SlotLeases, SlotLeases, JetStreamApi],
) -> None:
    a, b, api = nodes
    first = await a.acquire(3)
    assert first is not None
    assert first.epoch == 1
    assert await b.acquire(3) is None  # held
    assert await a.owners(64) == {3: ("node-a", 1)}
    renewed = await a.renew(first)
    assert renewed is not None

    # a stops renewing (cut off, paused): the server lets the lease lapse.
    taken = None
    deadline = asyncio.get_running_loop().time() + seconds(15)
    while taken is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        taken = await b.acquire(3)
    assert taken is not None
    assert taken.epoch == 2
    assert await b.owners(64) == {3: ("node-b", 2)}

    # a comes back: its renewal is refused, and so is any write fenced at its epoch.
    assert await a.renew(renewed) is None
    partition = f"{a.fence_subject(3).rsplit('.fence.', 1)[0]}.p.3.app.orders"
    with pytest.raises(ConflictError):
        await api.atomic(
            [Out(partition, b"late", expect=renewed.fence_seq, expect_filter=a.fence_subject(3))]
        )
    await api.atomic(
        [Out(partition, b"on time", expect=taken.fence_seq, expect_filter=b.fence_subject(3))]
    )

    # b lets go at once; a takes the slot again, one epoch later.
    await b.release(taken)
    assert await a.owners(64) == {}
    again = await a.acquire(3)
    assert again is not None
    assert again.epoch == 3


async def test_two_nodes_racing_for_free_slots_never_share_one(
    nodes: tuple[SlotLeases, SlotLeases, JetStreamApi],
) -> None:
    a, b, _ = nodes
    results = await asyncio.gather(*(node.acquire(slot) for slot in range(16) for node in (a, b)))
    won = [lease for lease in results if lease is not None]
    assert sorted(lease.slot for lease in won) == list(range(16))
    owners = await a.owners(64)
    assert sorted(owners) == list(range(16))
    assert all(epoch == 1 for _, epoch in owners.values())
