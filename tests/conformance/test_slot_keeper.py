"""Nodes keeping their share of the slots on a real nats-server
(server/store/jetstream/slot_keeper.py): balanced shares, joins that move only a
joiner's share, a dead node's slots owned again within the lease's time to
live, and never two nodes serving one slot at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from ensync.server.store.jetstream import slots as store_slots
from ensync.server.store.jetstream.api import JetStreamApi
from ensync.server.store.jetstream.nodes import NodeRegistry
from ensync.server.store.jetstream.slot_keeper import SlotKeeper, monotonic_ms
from ensync.server.store.jetstream.slots import SlotLeases
from ensync.server.store.ownership import LeaseTiming
from tests.support.nats import owned_stream
from tests.support.timing import seconds

SLOTS = 16
# Short leases for a quick test, with room for a loaded machine's slow turns.
TIMING = LeaseTiming(ttl_ms=3000, renew_every_ms=300, margin_ms=1200)


class Node:
    """A keeper and what it heard: slots gained and lost, with times."""

    def __init__(self, api: JetStreamApi, stream: str, prefix: str, node: str) -> None:
        self.gained: list[tuple[int, int]] = []
        self.lost: list[tuple[int, int]] = []
        self.keeper = SlotKeeper(
            SlotLeases(api, stream, prefix, node, ttl_s=TIMING.ttl_ms // 1000),
            NodeRegistry(api, stream, prefix, node, ttl_s=TIMING.ttl_ms // 1000),
            SLOTS,
            TIMING,
            self._gained,
            self._lost,
            info={"grpc": f"{node}:50051"},
        )

    def _gained(self, lease: store_slots.SlotLease) -> None:
        self.gained.append((lease.slot, monotonic_ms()))

    def _lost(self, slot: int) -> None:
        self.lost.append((slot, monotonic_ms()))

    @property
    def serving(self) -> set[int]:
        return {slot for slot in range(SLOTS) if self.keeper.serving(slot)}


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[[str], Node]]:
    """Nodes over one ownership stream of their own; every keeper stopped at the end."""
    async with owned_stream("KEEP") as stream:
        made: list[Node] = []

        def node(node_id: str) -> Node:
            made.append(Node(stream.api, stream.name, stream.prefix, node_id))
            return made[-1]

        try:
            yield node
        finally:
            for each in made:
                await each.keeper.stop()


async def settle(nodes: list[Node], shares: list[int], within_s: float = 15) -> None:
    """Wait until the nodes serve ``shares`` slots each, all of them, none twice."""
    deadline = asyncio.get_running_loop().time() + seconds(within_s)
    while True:
        serving = [node.serving for node in nodes]
        if sorted(len(s) for s in serving) == sorted(shares) and len(set().union(*serving)) == sum(
            shares
        ):
            return
        assert asyncio.get_running_loop().time() < deadline, f"serving {serving}"
        await asyncio.sleep(0.05)


async def watch_disjoint(nodes: list[Node], stop: asyncio.Event) -> None:
    """Fail if two nodes ever serve one slot at once."""
    while not stop.is_set():
        seen: dict[int, str] = {}
        for node in nodes:
            for slot in node.serving:
                assert slot not in seen, f"slot {slot}: {seen[slot]} and {node.keeper.node}"
                seen[slot] = node.keeper.node
        await asyncio.sleep(0.01)


async def test_nodes_share_the_slots_and_a_joiner_takes_only_its_share(
    cluster: Callable[[str], Node],
) -> None:
    a, b = cluster("node-a"), cluster("node-b")
    stop = asyncio.Event()
    await a.keeper.start()
    await settle([a], [SLOTS])
    await b.keeper.start()
    watching = asyncio.create_task(watch_disjoint([a, b], stop))
    await settle([a, b], [8, 8])

    c = cluster("node-c")
    watching.cancel()
    watching = asyncio.create_task(watch_disjoint([a, b, c], stop))
    before = a.serving | b.serving
    lost_before = len(a.lost) + len(b.lost)
    await c.keeper.start()
    await settle([a, b, c], [6, 5, 5])
    stop.set()
    await watching
    # Only the joiner's share moved: a and b let go of exactly what c took.
    moved = len(a.lost) + len(b.lost) - lost_before
    assert moved == len(c.serving)
    assert c.serving <= before
    assert len(a.serving | b.serving | c.serving) == SLOTS


async def test_a_dead_nodes_slots_are_owned_again_within_the_lease(
    cluster: Callable[[str], Node],
) -> None:
    a, b = cluster("node-a"), cluster("node-b")
    await a.keeper.start()
    await b.keeper.start()
    await settle([a, b], [8, 8])
    orphans = set(b.serving)

    # b dies: no release, no goodbye; its leases lapse on the server.
    died_at = monotonic_ms()
    await b.keeper.stop(release=False)
    await settle([a], [SLOTS], within_s=TIMING.ttl_ms / 1000 + 8)
    taken = {slot: at for slot, at in a.gained if slot in orphans and at > died_at}
    assert set(taken) == orphans
    assert max(taken.values()) - died_at < 10_000  # the bound


async def test_a_paused_owner_stops_serving_before_another_takes_over(
    cluster: Callable[[str], Node],
) -> None:
    a, b = cluster("node-a"), cluster("node-b")
    await a.keeper.start()
    await b.keeper.start()
    await settle([a, b], [8, 8])
    held = set(b.serving)
    valid_until = {slot: b.keeper.owned[slot].lease.valid_until_ms for slot in held}

    # b stalls (a GC pause, SIGSTOP, a cut network): no renewal leaves it.
    assert b.keeper._task is not None
    b.keeper._task.cancel()
    await asyncio.gather(b.keeper._task, return_exceptions=True)
    await settle([a], [SLOTS], within_s=TIMING.ttl_ms / 1000 + 8)
    taken = {slot: at for slot, at in a.gained if slot in held}
    for slot in held:
        # b's own deadline for the slot passed before a took it (one clock here).
        assert valid_until[slot] <= taken[slot], slot
    assert b.serving == set()  # and b knows it without hearing from anyone

    # b comes back: its first turn drops what it held, and its renewals are refused.
    await b.keeper.step()
    assert {slot for slot, _ in b.lost} >= held
    assert b.keeper.owned == {}
