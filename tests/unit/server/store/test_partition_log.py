"""A partition's state, rebuilt from its log by a new owner, is the state its owner had."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.server.store.base import MessageState
from ensync.server.store.partition_log import (
    Deferred,
    Delivered,
    Ended,
    PartitionState,
    Record,
    Redelivered,
    Redriven,
    Settled,
    Snapshot,
    decode,
    encode,
)


def _same(left: PartitionState, right: PartitionState) -> None:
    assert left.settled == right.settled
    assert (left.cursor, left.attempts, left.deferred, left.ended) == (
        right.cursor,
        right.attempts,
        right.deferred,
        right.ended,
    )


def test_a_new_owner_delivers_again_what_was_in_flight_and_counts_the_attempt() -> None:
    owner = PartitionState()
    log: list[Record] = [
        Delivered(1, 6),
        Settled(((1, 2), (4, 4))),
        Redelivered(3, 2),
        Deferred(5, 10_000),
    ]
    for record in log:
        owner.apply(record)
    rebuilt = PartitionState()
    for record in log:
        rebuilt.apply(decode(encode(record)))
    _same(owner, rebuilt)
    # 3 (twice delivered), 6 (in flight) are due now; 5 waits for its time.
    assert rebuilt.to_deliver_again(now_ms=5_000) == [3, 6]
    assert rebuilt.to_deliver_again(now_ms=10_000) == [3, 5, 6]
    assert [rebuilt.attempt_of(b) for b in (3, 5, 6, 7)] == [2, 1, 1, 0]


def test_a_dead_letter_stays_apart_through_a_takeover_and_comes_back_when_redriven() -> None:
    owner = PartitionState()
    log: list[Record] = [
        Delivered(1, 4),
        Settled(((1, 1),)),
        Ended(2, MessageState.DEAD, 1_000, "bad payload\nline two"),
        Ended(3, MessageState.EXPIRED, 1_100),
    ]
    for record in log:
        owner.apply(record)
    from_snapshot = PartitionState()
    from_snapshot.apply(decode(encode(owner.snapshot())))
    _same(from_snapshot, owner)
    assert from_snapshot.ended[2].reason == "bad payload\nline two"
    assert from_snapshot.ended[3].state is MessageState.EXPIRED
    assert from_snapshot.to_deliver_again(now_ms=5_000) == [4]  # not the dead ones

    for state in (owner, from_snapshot):
        state.apply(decode(encode(Redriven(2, 6_000))))
        assert 2 not in state.ended
        assert state.attempt_of(2) == 0
        assert state.to_deliver_again(now_ms=5_000) == [4]
        assert state.to_deliver_again(now_ms=6_000) == [2, 4]
    _same(from_snapshot, owner)
    # A redrive of what is not a dead letter changes nothing.
    owner.apply(Redriven(4, 7_000))
    _same(from_snapshot, owner)


def test_records_that_are_not_records_are_refused() -> None:
    with pytest.raises(ValueError, match="DEAD or EXPIRED"):
        Ended(1, MessageState.ACKED, 0)
    for data in (
        b"",
        b"[]",
        b'["x",1]',
        b'["d",1]',
        b'["s","3,1"]',
        b"{}",
        b'["S","0",1]',
        b'["e",1,1,5,null]',  # ACKED is no ending
        b'["e",1,9,5,null]',
        b'["e",1,2,5,7]',
        b'["R",1]',
        b'["S","0",0,[],[],[],[]]',
    ):
        with pytest.raises(ValueError, match="not a partition log record"):
            decode(data)


_operations = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.integers(1, 8)),
        st.tuples(st.just("settle"), st.integers(1, 60), st.integers(0, 5)),
        st.tuples(st.just("redeliver"), st.integers(1, 60)),
        st.tuples(st.just("defer"), st.integers(1, 60), st.integers(0, 10**12)),
        st.tuples(st.just("end"), st.integers(1, 60), st.booleans(), st.text(max_size=5)),
        st.tuples(st.just("redrive"), st.integers(1, 60), st.integers(0, 10**12)),
        st.tuples(st.just("snapshot")),
    ),
    max_size=80,
)


@given(_operations)
def test_any_log_replays_to_the_owners_state_from_the_start_or_a_snapshot(
    operations: list[tuple[Any, ...]],
) -> None:
    owner = PartitionState()
    log: list[bytes] = []

    def write(record: Record) -> None:
        owner.apply(record)
        log.append(encode(record))

    for operation in operations:
        kind = operation[0]
        if kind == "deliver":
            count = int(operation[1])
            write(Delivered(owner.cursor + 1, owner.cursor + count))
        elif kind == "settle":
            first, extra = int(operation[1]), int(operation[2])
            write(Settled(((first, first + extra),)))
        elif kind == "redeliver":
            block = int(operation[1])
            write(Redelivered(block, owner.attempt_of(block) + 1))
        elif kind == "defer":
            write(Deferred(int(operation[1]), int(operation[2])))
        elif kind == "end":
            block, dead, reason = int(operation[1]), bool(operation[2]), str(operation[3])
            state = MessageState.DEAD if dead else MessageState.EXPIRED
            write(Ended(block, state, 10**12, reason if dead else None))
        elif kind == "redrive":
            write(Redriven(int(operation[1]), int(operation[2])))
        else:
            write(owner.snapshot())
    from_start = PartitionState()
    for data in log:
        from_start.apply(decode(data))
    _same(from_start, owner)
    snapshots = [i for i, data in enumerate(log) if isinstance(decode(data), Snapshot)]
    if snapshots:
        from_snapshot = PartitionState()
        for data in log[snapshots[-1] :]:
            from_snapshot.apply(decode(data))
        _same(from_snapshot, owner)
    # Nothing settled is ever delivered again, nor waits.
    for block in owner.to_deliver_again(now_ms=10**13):
        assert block not in owner.settled
        assert block <= owner.cursor
    assert not set(owner.attempts) & set(owner.settled.settled_above(0))
    # Every dead letter or expiry is settled, and only those redriven come back.
    assert all(block in owner.settled for block in owner.ended)
    assert dataclasses.replace(owner.snapshot()) == owner.snapshot()


def test_settlement_times_survive_the_log_form_and_snapshots() -> None:
    owner = PartitionState()
    for record in (Settled(((1, 3),), 1_000), Ended(4, MessageState.DEAD, 2_000, "x")):
        owner.apply(decode(encode(record)))
    assert owner.settled_ms == 2_000
    assert decode(encode(Settled(((1, 3),), 1_000))) == Settled(((1, 3),), 1_000)
    rebuilt = PartitionState()
    rebuilt.apply(decode(encode(owner.snapshot())))
    assert (rebuilt.settled_ms, rebuilt.settled.floor) == (2_000, 4)
