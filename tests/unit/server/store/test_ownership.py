"""Slots, their assignment to nodes and an owner's lease, on an integer clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ensync.server.store.ownership import (
    DEFAULT_SLOTS,
    LeaseTiming,
    SlotLease,
    assign,
    fair_shares,
    plan,
    slot_of,
)

NODES = ["node-a", "node-b", "node-c"]


def test_a_partition_has_one_slot_everywhere_and_slots_fill_evenly() -> None:
    # Pinned: a node of another version must find partitions where this one put them.
    assert slot_of("AAAA", "x", DEFAULT_SLOTS) == 22
    counts = Counter(slot_of(f"app-{n % 97}", f"name/{n}", 64) for n in range(20_000))
    assert set(counts) == set(range(64))
    mean = 20_000 / 64
    assert all(0.7 * mean < count < 1.3 * mean for count in counts.values())
    with pytest.raises(ValueError, match="at least 1"):
        slot_of("app", "x", 0)


def test_fair_shares_differ_by_one_at_most_and_add_up() -> None:
    for count in range(1, 9):
        shares = fair_shares(64, [f"n{i}" for i in range(count)])
        assert sum(shares.values()) == 64
        assert max(shares.values()) - min(shares.values()) <= 1
    assert fair_shares(64, []) == {}


def _balanced(target: dict[int, str], nodes: list[str]) -> None:
    assert sorted(target) == list(range(64))
    assert Counter(target.values()) == Counter(fair_shares(64, nodes))


def test_every_node_computes_the_same_balanced_assignment() -> None:
    owners = {slot: NODES[slot % 2] for slot in range(0, 64, 3)}
    target = assign(64, NODES, owners)
    _balanced(target, NODES)
    assert assign(64, list(reversed(NODES)), owners) == target
    # Balanced already: nothing moves.
    assert assign(64, NODES, target) == target


def test_a_joining_node_takes_only_its_share_and_a_leaving_one_gives_only_its_own() -> None:
    two = assign(64, NODES[:2], {})
    three = assign(64, NODES, two)
    _balanced(three, NODES)
    moved = [slot for slot in range(64) if three[slot] != two[slot]]
    assert len(moved) == fair_shares(64, NODES)["node-c"]
    assert all(three[slot] == "node-c" for slot in moved)

    back = assign(64, NODES[:2], three)
    _balanced(back, NODES[:2])
    moved = [slot for slot in range(64) if back[slot] != three[slot]]
    assert sorted(moved) == sorted(slot for slot, node in three.items() if node == "node-c")


def test_nodes_following_their_plans_converge_with_no_slot_owned_twice() -> None:
    rng = random.Random(7)
    owners: dict[int, str] = {}
    live = ["node-a"]
    for joined in (None, "node-b", "node-c"):
        if joined is not None:
            live.append(joined)
        for _ in range(10):  # rounds: each node acts on what it read, in some order
            for node in rng.sample(live, len(live)):
                moves = plan(64, node, live, owners)
                for slot in moves.release:
                    assert owners[slot] == node
                    del owners[slot]
                for slot in moves.acquire:
                    # Acquiring is a compare-and-set on a free lease.
                    if slot not in owners:
                        owners[slot] = node
        assert plan(64, live[0], live, owners) == plan(64, live[0], live, owners)
        _balanced(owners, live)
        assert all(not plan(64, node, live, owners).acquire for node in live)


def test_the_slots_of_a_node_gone_are_acquired_by_the_others() -> None:
    owners = assign(64, NODES, {})
    survivors = NODES[:2]
    gained = {node: set(plan(64, node, survivors, owners).acquire) for node in survivors}
    orphaned = {slot for slot, node in owners.items() if node == "node-c"}
    assert gained["node-a"] | gained["node-b"] == orphaned
    assert not gained["node-a"] & gained["node-b"]
    assert not plan(64, "node-a", survivors, owners).release


def test_an_owner_serves_until_its_lease_could_lapse_counted_from_the_send() -> None:
    timing = LeaseTiming(ttl_ms=6_000, renew_every_ms=1_500, margin_ms=1_500)
    lease = SlotLease(slot=5, epoch=2, timing=timing, acquired_sent_at_ms=1_000)
    assert lease.valid_until_ms == 5_500
    assert lease.serving(5_499)
    assert not lease.serving(5_500)
    assert not lease.renewal_due(2_499)
    assert lease.renewal_due(2_500)
    sent = lease.renewal_sent(2_500)
    assert not lease.renewal_due(4_500)  # one in flight
    # Confirmed late: the lease still counts from when the renewal was sent.
    lease.renewed(sent)
    assert lease.valid_until_ms == 2_500 + 4_500
    assert lease.renewal_due(4_000)


def test_an_owner_cut_off_stops_serving_before_the_store_lets_its_lease_lapse() -> None:
    timing = LeaseTiming()
    lease = SlotLease(slot=1, epoch=1, timing=timing, acquired_sent_at_ms=0)
    sent = lease.renewal_sent(1_500)
    lease.renewal_failed(sent)  # the store did not answer: partitioned
    # The store stored the last good renewal (the acquisition) at some time
    # after 0 on its own clock, so it lets the lease lapse after ttl_ms of
    # its time at the earliest; the owner stopped margin_ms before that.
    assert not lease.serving(timing.ttl_ms - timing.margin_ms)
    assert not lease.renewal_due(10_000)  # nothing to renew past the deadline
    # A renewal answered after the deadline (a pause, SIGSTOP) still counts
    # from its send: if the store took it, the lease is ours again.
    late = lease.renewal_sent(4_000)
    lease.renewed(late)
    assert lease.serving(4_000 + timing.ttl_ms - timing.margin_ms - 1)


def test_lease_timings_that_could_lapse_between_renewals_are_refused() -> None:
    with pytest.raises(ValueError, match="must be below ttl_ms"):
        LeaseTiming(ttl_ms=3_000, renew_every_ms=2_000, margin_ms=1_000)
    with pytest.raises(ValueError, match="positive"):
        LeaseTiming(ttl_ms=6_000, renew_every_ms=0)
