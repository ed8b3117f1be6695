"""The settled set: a floor and ranges, checked against a plain set of blocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.server.store.settled import SettledSet


def test_in_order_settlements_only_move_the_floor() -> None:
    settled = SettledSet()
    for block in range(1, 1001):
        assert settled.add(block)
    assert settled.floor == 1000
    assert settled.ranges() == []
    assert settled.encode() == "1000"
    assert not settled.add(500)


def test_gaps_stay_as_ranges_until_filled() -> None:
    settled = SettledSet()
    settled.add_range(1, 3)
    settled.add(5)
    settled.add_range(8, 9)
    assert (settled.floor, settled.ranges()) == (3, [(5, 5), (8, 9)])
    assert list(settled.unsettled(10)) == [4, 6, 7, 10]
    assert settled.encode() == "3,2,3+1"
    settled.add_range(6, 7)
    assert settled.ranges() == [(5, 9)]
    settled.add(4)
    assert (settled.floor, settled.ranges()) == (9, [])
    assert 9 in settled
    assert 10 not in settled
    assert 0 not in settled


def test_the_log_form_is_refused_when_it_is_not_one() -> None:
    for text in ("", "x", "3,1", "3,-2", "3,2+-1", "3,2+"):
        with pytest.raises(ValueError, match="not a settled set"):
            SettledSet.decode(text)
    with pytest.raises(ValueError, match="not a range"):
        SettledSet().add_range(5, 4)


@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 20)), max_size=60))
def test_it_holds_exactly_the_blocks_added_in_any_order(spans: list[tuple[int, int]]) -> None:
    settled = SettledSet()
    expected: set[int] = set()
    for first, length in spans:
        settled.add_range(first, first + length)
        expected.update(range(first, first + length + 1))
    assert {block for block in range(400) if block in settled} == expected
    assert len(settled) == len(expected)
    floor = 0
    while floor + 1 in expected:
        floor += 1
    assert settled.floor == floor
    assert set(settled.unsettled(350)) == set(range(floor + 1, 351)) - expected
    assert list(settled.settled_above(floor - 5)) == sorted(b for b in expected if b > floor - 5)
    # Ranges are sorted, apart, and above the floor.
    previous = floor
    for first, last in settled.ranges():
        assert first > previous + 1
        assert last >= first
        previous = last
    assert SettledSet.decode(settled.encode()) == settled


def test_a_discarded_block_is_unsettled_below_or_above_the_floor() -> None:
    settled = SettledSet(10, [(13, 15)])
    assert settled.discard(4)  # a dead letter below the floor, redriven
    assert (settled.floor, settled.ranges()) == (3, [(5, 10), (13, 15)])
    assert settled.discard(14)
    assert settled.ranges() == [(5, 10), (13, 13), (15, 15)]
    assert not settled.discard(14)
    assert not settled.discard(11)
    assert settled.discard(3)  # the floor itself
    assert (settled.floor, settled.ranges()) == (2, [(5, 10), (13, 13), (15, 15)])
    settled.add_range(3, 4)
    assert settled.floor == 10
    assert SettledSet.decode(settled.encode()) == settled


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 120), st.integers(0, 15)),
        max_size=60,
    )
)
def test_adds_and_discards_in_any_order_hold_exactly_the_blocks(
    steps: list[tuple[bool, int, int]],
) -> None:
    settled = SettledSet()
    expected: set[int] = set()
    for add, first, length in steps:
        if add:
            settled.add_range(first, first + length)
            expected.update(range(first, first + length + 1))
        else:
            assert settled.discard(first) == (first in expected)
            expected.discard(first)
    assert {block for block in range(200) if block in settled} == expected
    floor = 0
    while floor + 1 in expected:
        floor += 1
    assert settled.floor == floor
    previous = floor
    for first, last in settled.ranges():
        assert first > previous + 1
        assert last >= first
        previous = last
    assert SettledSet.decode(settled.encode()) == settled
