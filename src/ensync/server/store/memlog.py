"""Messages held in memory: the whole of :class:`MemoryStore`, and the
``persist: false`` messages of the durable backends.

Every method runs to completion without awaiting. Indexes and their cost
(n = records in the structure touched):

* ``_entries`` (idem -> record): look-ups and updates are O(1).
* ``_pending`` (partition -> sorted ``(block, idem)`` of PENDING messages):
  :meth:`page` is O(log n + k + d), d counting pending messages it skips
  because they are not visible yet.
* ``_due`` (partition -> heap of ``(visible_at, seq, idem)``): the schedule of
  deferred and backed-off messages; stale entries are dropped lazily.
* ``_dead`` (recipient -> sorted dead letters): ``list_dead`` is O(log n + k).
* ``_settled`` (a heap of settle times): ``prune`` pops what it deletes.

Ties (equal blocks, equal times) are broken by insertion order, the same
order the sqlite backend gets from rowids.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from ensync.server.store import lifecycle
from ensync.server.store.backing import Ref
from ensync.server.store.base import DeadRef, MessageState, StoredMessage
from ensync.server.store.lifecycle import Event

__all__ = ["MemoryMessages"]

# (has settle time, settle time, seq, idem): None sorts oldest, as NULL does in SQL.
_DeadKey = tuple[bool, int, int, str]


@dataclass(slots=True)
class _Entry:
    message: StoredMessage
    seq: int


def _ref(message: StoredMessage) -> Ref:
    return Ref(
        message.idem,
        message.block,
        message.attempts,
        message.expires_at_ms,
        message.visible_at_ms,
    )


class MemoryMessages:
    """An in-memory message table with the indexes claims and dead letters need."""

    def __init__(self) -> None:
        self._seq = 0
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._due: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        self._dead: dict[str, list[_DeadKey]] = {}
        self._settled: list[tuple[int, int, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, idem: str) -> bool:
        return idem in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._pending.clear()
        self._due.clear()
        self._dead.clear()
        self._settled.clear()

    # --- writes -------------------------------------------------------------

    def add(self, message: StoredMessage) -> None:
        """Hold a new record (its idem must be new)."""
        self._seq += 1
        self._entries[message.idem] = _Entry(message, self._seq)
        if message.state is MessageState.PENDING:
            bisect.insort(
                self._pending.setdefault(message.partition, []), (message.block, message.idem)
            )
            if message.visible_at_ms > 0:
                self._schedule(message)
        elif message.state is MessageState.DEAD:
            bisect.insort(self._dead.setdefault(message.recipient, []), self._dead_key(message))
        if message.settled_at_ms is not None:
            heapq.heappush(self._settled, (message.settled_at_ms, self._seq, message.idem))

    def remove(self, idem: str) -> StoredMessage | None:
        """Forget a record whatever its state (its owner keeps it elsewhere)."""
        entry = self._entries.pop(idem, None)
        if entry is None:
            return None
        message = entry.message
        if message.state is MessageState.PENDING:
            self._unlist_pending(message)
        elif message.state is MessageState.DEAD:
            dead = self._dead.get(message.recipient, [])
            key = (message.settled_at_ms is not None, message.settled_at_ms or 0, entry.seq, idem)
            index = bisect.bisect_left(dead, key)
            if index < len(dead) and dead[index] == key:
                del dead[index]
        # Heap entries of the schedule and of settle times are dropped lazily.
        return message

    def get(self, idem: str) -> StoredMessage | None:
        entry = self._entries.get(idem)
        return entry.message if entry is not None else None

    def settle(self, idem: str, state: MessageState, at_ms: int, reason: str | None) -> bool:
        entry = self._entries.get(idem)
        if entry is None or not lifecycle.allows(entry.message.state, lifecycle.settling(state)):
            return False
        message = entry.message
        self._unlist_pending(message)
        entry.message = dataclasses.replace(
            message, state=state, settled_at_ms=at_ms, dead_reason=reason
        )
        if state is MessageState.DEAD:
            bisect.insort(
                self._dead.setdefault(message.recipient, []), self._dead_key(entry.message)
            )
        heapq.heappush(self._settled, (at_ms, entry.seq, idem))
        return True

    def reschedule(self, idem: str, visible_at_ms: int, attempts: int | None = None) -> bool:
        """Set when a pending message is claimable (and its attempt count): a
        deferral, or a release that waits out the backoff."""
        entry = self._entries.get(idem)
        if entry is None or not lifecycle.allows(entry.message.state, Event.DEFER):
            return False
        changes: dict[str, int] = {"visible_at_ms": visible_at_ms}
        if attempts is not None:
            changes["attempts"] = attempts
        entry.message = dataclasses.replace(entry.message, **changes)  # type: ignore[arg-type]
        self._schedule(entry.message)
        return True

    def set_attempts(self, updates: Iterable[tuple[str, int]]) -> None:
        for idem, attempts in updates:
            entry = self._entries.get(idem)
            if entry is not None:
                entry.message = dataclasses.replace(entry.message, attempts=attempts)

    def redrive(self, idem: str, now_ms: int) -> StoredMessage | None:
        entry = self._entries.get(idem)
        if entry is None or not lifecycle.allows(entry.message.state, Event.REDRIVE):
            return None
        old = entry.message
        dead = self._dead.get(old.recipient, [])
        index = bisect.bisect_left(dead, self._dead_key(old))
        if index < len(dead) and dead[index][3] == idem:
            del dead[index]
        outcome = lifecycle.redriven(now_ms)
        entry.message = dataclasses.replace(
            old,
            state=MessageState.PENDING,
            attempts=outcome.attempts,
            visible_at_ms=now_ms,
            settled_at_ms=None,
            dead_reason=None,
        )
        bisect.insort(self._pending.setdefault(old.partition, []), (old.block, idem))
        return entry.message

    def prune(self, settled_before_ms: int) -> int:
        removed = 0
        while self._settled and self._settled[0][0] < settled_before_ms:
            at_ms, _, idem = heapq.heappop(self._settled)
            entry = self._entries.get(idem)
            # A redriven message left this heap's entry behind: skip it.
            if entry is None or not lifecycle.allows(entry.message.state, Event.PRUNE):
                continue
            if entry.message.settled_at_ms != at_ms:
                continue
            message = entry.message
            if message.state is MessageState.DEAD:
                dead = self._dead.get(message.recipient, [])
                index = bisect.bisect_left(dead, self._dead_key(message))
                if index < len(dead) and dead[index][3] == idem:
                    del dead[index]
            del self._entries[idem]
            removed += 1
        return removed

    # --- reads --------------------------------------------------------------

    def page(
        self, key: tuple[str, str], after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]:
        """Pending, visible messages with ``after_block < block <= upto_block``."""
        pending = self._pending.get(key)
        if not pending or limit <= 0:
            return []
        out: list[Ref] = []
        start = bisect.bisect_right(pending, (after_block, "\U0010ffff"))
        for block, idem in pending[start:]:
            if block > upto_block:
                break
            message = self._entries[idem].message
            if message.visible_at_ms <= now_ms:
                out.append(_ref(message))
                if len(out) >= limit:
                    break
        return out

    def due(self, key: tuple[str, str], since_ms: int, until_ms: int, max_block: int) -> list[Ref]:
        """Pending messages that became claimable in ``(since_ms, until_ms]``,
        with ``block <= max_block``, soonest first."""
        heap = self._due.get(key)
        out: list[Ref] = []
        while heap and heap[0][0] <= until_ms:
            visible_at, _, idem = heapq.heappop(heap)
            entry = self._entries.get(idem)
            if entry is None:
                continue
            message = entry.message
            if message.state is not MessageState.PENDING or message.visible_at_ms != visible_at:
                continue
            if visible_at > since_ms and message.block <= max_block:
                out.append(_ref(message))
        return out

    def next_due(self, key: tuple[str, str], after_ms: int) -> int | None:
        """The soonest claimable time after ``after_ms`` in the partition.

        Entries at or before ``after_ms`` were handed out already (or are
        found by :meth:`page`), so they are dropped on the way.
        """
        heap = self._due.get(key)
        while heap:
            visible_at, _, idem = heap[0]
            entry = self._entries.get(idem)
            if (
                visible_at > after_ms
                and entry is not None
                and entry.message.state is MessageState.PENDING
                and entry.message.visible_at_ms == visible_at
            ):
                return visible_at
            heapq.heappop(heap)
        return None

    def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        dead = self._dead.get(recipient, [])
        return (
            [self._entries[key[3]].message for key in reversed(dead[-limit:])] if limit > 0 else []
        )

    def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        out = []
        for key in self._dead.get(recipient, []):
            message = self._entries[key[3]].message
            out.append(DeadRef(message.settled_at_ms or 0, message.idem, message.name))
        return out

    def has_pending(self, key: tuple[str, str]) -> bool:
        """Whether the partition has a pending message (claimable now or later)."""
        return bool(self._pending.get(key))

    def backlog(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (recipient, _), pending in self._pending.items():
            if pending:
                counts[recipient] = counts.get(recipient, 0) + len(pending)
        return counts

    # --- helpers ------------------------------------------------------------

    def _schedule(self, message: StoredMessage) -> None:
        entry = self._entries[message.idem]
        heapq.heappush(
            self._due.setdefault(message.partition, []),
            (message.visible_at_ms, entry.seq, message.idem),
        )

    def _unlist_pending(self, message: StoredMessage) -> None:
        pending = self._pending.get(message.partition)
        if not pending:
            return
        index = bisect.bisect_left(pending, (message.block, message.idem))
        if index < len(pending) and pending[index] == (message.block, message.idem):
            del pending[index]
        if not pending:
            del self._pending[message.partition]

    def _dead_key(self, message: StoredMessage) -> _DeadKey:
        seq = self._entries[message.idem].seq
        at = message.settled_at_ms
        return (at is not None, at or 0, seq, message.idem)
