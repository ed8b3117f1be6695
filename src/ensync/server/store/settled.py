"""Which blocks of a partition are settled, compactly: a floor and ranges above it.

A partition's messages are numbered (blocks 1, 2, 3, ...) and mostly settled
in order, so the settled set is kept as Kafka and JetStream keep theirs: an
*ack floor*, every block at or below it settled, and the settled blocks above
it as sorted, disjoint, non-adjacent ranges. A partition's owner writes it to
its log in this form (settlements of a batch as ranges, not one record per
message), and a new owner reads it back to know what to deliver again.

Sans-I/O: values in, values out.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["SettledSet"]


class SettledSet:
    """Settled blocks of one partition.

    For example::

        settled = SettledSet()
        settled.add_range(1, 3)
        settled.add(5)
        settled.floor            # 3: blocks 1..3 settled
        settled.ranges()         # [(5, 5)]
        settled.add(4)
        settled.floor            # 5
    """

    __slots__ = ("_ends", "_floor", "_starts")

    def __init__(self, floor: int = 0, ranges: Iterable[tuple[int, int]] = ()) -> None:
        if floor < 0:
            raise ValueError(f"the floor is a block number, not {floor}")
        self._floor = floor
        # Parallel sorted lists: range i is starts[i]..ends[i], inclusive;
        # starts[i] > floor + 1, and ranges neither overlap nor touch.
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in ranges:
            self.add_range(first, last)

    @property
    def floor(self) -> int:
        """Every block at or below it is settled (0: none is known to be)."""
        return self._floor

    def ranges(self) -> list[tuple[int, int]]:
        """The settled blocks above the floor, as inclusive ranges, in order."""
        return list(zip(self._starts, self._ends, strict=True))

    def all_ranges(self) -> list[tuple[int, int]]:
        """Every settled block as inclusive ranges, the floor's ``1..floor`` first."""
        head = [(1, self._floor)] if self._floor else []
        return head + self.ranges()

    def __contains__(self, block: object) -> bool:
        if not isinstance(block, int) or block < 1:
            return False
        if block <= self._floor:
            return True
        index = bisect.bisect_right(self._starts, block) - 1
        return index >= 0 and block <= self._ends[index]

    def __len__(self) -> int:
        return self._floor + sum(
            last - first + 1 for first, last in zip(self._starts, self._ends, strict=True)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SettledSet):
            return NotImplemented
        return self._floor == other._floor and self.ranges() == other.ranges()

    def __hash__(self) -> int:  # mutable
        raise TypeError("SettledSet is mutable")

    def __repr__(self) -> str:
        return f"SettledSet(floor={self._floor}, ranges={self.ranges()})"

    def add(self, block: int) -> bool:
        """Settle one block; False if it was settled already."""
        if block in self:
            return False
        self.add_range(block, block)
        return True

    def add_range(self, first: int, last: int) -> None:
        """Settle blocks ``first`` to ``last`` (inclusive)."""
        if first < 1 or last < first:
            raise ValueError(f"not a range of blocks: {first}..{last}")
        if last <= self._floor:
            return
        first = max(first, self._floor + 1)
        # Merge with every range that overlaps or touches first..last.
        low = bisect.bisect_left(self._ends, first - 1)
        high = bisect.bisect_right(self._starts, last + 1)
        if low < high:
            first = min(first, self._starts[low])
            last = max(last, self._ends[high - 1])
        self._starts[low:high] = [first]
        self._ends[low:high] = [last]
        if self._starts[0] == self._floor + 1:
            self._floor = self._ends[0]
            del self._starts[0]
            del self._ends[0]

    def discard(self, block: int) -> bool:
        """Unsettle one block (a dead letter redriven); False if it was not settled."""
        if block not in self:
            return False
        if block <= self._floor:
            if block < self._floor:
                self._starts.insert(0, block + 1)
                self._ends.insert(0, self._floor)
            self._floor = block - 1
            return True
        index = bisect.bisect_right(self._starts, block) - 1
        first, last = self._starts[index], self._ends[index]
        pieces = [(a, b) for a, b in ((first, block - 1), (block + 1, last)) if a <= b]
        self._starts[index : index + 1] = [a for a, _ in pieces]
        self._ends[index : index + 1] = [b for _, b in pieces]
        return True

    def settled_above(self, block: int) -> Iterator[int]:
        """The settled blocks greater than ``block``, in order (floor included)."""
        block = max(block, 0)
        yield from range(block + 1, self._floor + 1)
        for first, last in zip(self._starts, self._ends, strict=True):
            yield from range(max(first, block + 1), last + 1)

    def unsettled(self, up_to: int) -> Iterator[int]:
        """Blocks above the floor, up to ``up_to``, that are not settled: what to deliver again."""
        block = self._floor + 1
        for first, last in zip(self._starts, self._ends, strict=True):
            if first > up_to:
                break
            yield from range(block, first)
            block = last + 1
        yield from range(block, up_to + 1)

    # ------------------------------------------------------------------ log form

    def encode(self) -> str:
        """A compact text for the log: ``floor`` then ``first-last`` deltas, comma-separated.

        Each range is written relative to the end of the one before (or the
        floor), so a settled set of long-lived partitions stays short.
        """
        parts = [str(self._floor)]
        previous = self._floor
        for first, last in zip(self._starts, self._ends, strict=True):
            gap, length = first - previous, last - first
            parts.append(f"{gap}+{length}" if length else str(gap))
            previous = last
        return ",".join(parts)

    @classmethod
    def decode(cls, text: str) -> SettledSet:
        """The set `encode` wrote; ValueError if ``text`` is not one."""
        try:
            head, *rest = text.split(",")
            floor = int(head)
            ranges: list[tuple[int, int]] = []
            previous = floor
            for part in rest:
                gap_text, plus, length_text = part.partition("+")
                gap, length = int(gap_text), int(length_text) if plus else 0
                if gap < 2 or length < 0:
                    raise ValueError(part)
                first = previous + gap
                ranges.append((first, first + length))
                previous = first + length
        except ValueError:
            raise ValueError(f"not a settled set: {text[:80]!r}") from None
        return cls(floor, ranges)
