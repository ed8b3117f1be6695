"""The dispatcher's one heap of deadlines: lease deadlines, partition
wake-ups (a deferral or backoff ends) and the periodic session sweep.

Entries are never removed early: one that no longer holds (the lease was
settled or extended, the partition woke earlier or left) is *stale*, and is
skipped when it comes up — the owner says which are live. Sans-I/O: the
time is an argument.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Due", "LeaseDue", "Ref", "Timeline"]

Key = tuple[str, str]


class Due(enum.IntEnum):
    """What an entry is for (ties at one instant: leases first)."""

    LEASE = 0
    WAKE = 1
    SWEEP = 2


@dataclass(frozen=True, slots=True)
class LeaseDue:
    """A lease's deadline, as it was when pushed."""

    idem: str
    token: int
    deadline_ms: int


# A lease's deadline, a partition's wake-up (its key), or the sweep (None).
Ref = LeaseDue | Key | None


class Timeline:
    """Deadlines in time order; stale ones are skipped lazily."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Due, Ref]] = []
        self._seq = itertools.count()

    def push(self, when_ms: int, kind: Due, ref: Ref) -> None:
        heapq.heappush(self._heap, (when_ms, next(self._seq), kind, ref))

    def pop_due(self, now_ms: int) -> Iterator[tuple[int, Due, Ref]]:
        """Every entry due at ``now_ms``, soonest first, stale ones included."""
        while self._heap and self._heap[0][0] <= now_ms:
            when, _, kind, ref = heapq.heappop(self._heap)
            yield when, kind, ref

    def first(self, live: Callable[[int, Ref], bool]) -> int | None:
        """The soonest live deadline (``live(when, ref)``), dropping stale ones."""
        while self._heap:
            when, _, _, ref = self._heap[0]
            if live(when, ref):
                return when
            heapq.heappop(self._heap)
        return None
