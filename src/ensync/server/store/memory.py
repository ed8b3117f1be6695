"""A :class:`~ensync.server.store.base.Store` held in dicts and sorted lists.

Used for ``persist: false`` messages (lost on restart by design) and by tests.
Every method runs to completion without awaiting, so each call is atomic with
respect to other coroutines on the loop.

Indexes and their cost (n = records in the structure touched):

* ``_entries`` (idem -> record): ``get``, ``settle``, ``reschedule``,
  ``record_attempts`` look-ups are O(1).
* ``_ready`` (partition -> list of ``(block, seq, idem)`` of PENDING messages,
  sorted): ``fetch_ready`` is O(log n + k + d) where d counts pending messages
  it skips because they are not visible yet. Blocks normally arrive in
  increasing order, so inserting is an append; removing on settle is a bisect
  plus a ``del`` (a memmove, cheap even for long lists).
* ``_dead`` (recipient -> sorted list of dead letters): ``list_dead`` is
  O(log n + k); redrive removes by bisect.
* ``_settled`` (a heap of settle times): ``prune`` pops only what it deletes
  plus stale entries left by redrives, O((k + s) log n).
* ``fetch_scheduled`` scans every pending message: O(P log limit). It runs
  when timers are rebuilt, which for a volatile store is rare.

Ties (equal blocks, equal times) are broken by insertion order (``seq``), the
same order the sqlite backend gets from rowids.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

from .base import AppExistsError, AppRecord, MessageState, StoredMessage, StoreError

__all__ = ["MemoryStore", "MemoryStoreStatistics"]

# (block, seq, idem): position of a pending message in its partition.
_ReadyKey = tuple[int, int, str]
# (has settle time, settle time, seq, idem): None sorts oldest, as NULL does in SQL.
_DeadKey = tuple[bool, int, int, str]
_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T", _ReadyKey, _DeadKey)


@dataclass(frozen=True, slots=True)
class MemoryStoreStatistics:
    """Counters of a :class:`MemoryStore`.

    Attributes:
        writes: write calls applied.
        commits: atomic changes applied; equal to ``writes`` (no batching).
        messages: messages held, whatever their state.
        apps: registered apps.
    """

    writes: int
    commits: int
    messages: int
    apps: int


@dataclass(slots=True)
class _Entry:
    message: StoredMessage
    seq: int


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class MemoryStore:
    """A volatile store: everything lives in this process and dies with it.

    Call :meth:`open` before use and :meth:`close` when done (or use
    ``async with``). Calls before ``open`` or after ``close`` raise
    :class:`StoreError`.
    """

    def __init__(self) -> None:
        self._state = _State.NEW
        self._seq = 0
        self._writes = 0
        self._entries: dict[str, _Entry] = {}
        self._last_blocks: dict[tuple[str, str], int] = {}
        self._ready: dict[tuple[str, str], list[_ReadyKey]] = {}
        self._dead: dict[str, list[_DeadKey]] = {}
        self._settled: list[tuple[int, int, str]] = []
        self._apps: dict[str, AppRecord] = {}
        self._app_names_by_id: dict[str, str] = {}
        self._app_names_by_key: dict[bytes, str] = {}

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Make the store usable. Raises :class:`StoreError` if already opened."""
        if self._state is not _State.NEW:
            raise StoreError(f"memory store cannot be opened twice (it is {self._state.value})")
        self._state = _State.OPEN

    async def close(self) -> None:
        """Drop everything held. Idempotent."""
        self._state = _State.CLOSED
        self._entries.clear()
        self._last_blocks.clear()
        self._ready.clear()
        self._dead.clear()
        self._settled.clear()
        self._apps.clear()
        self._app_names_by_id.clear()
        self._app_names_by_key.clear()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def statistics(self) -> MemoryStoreStatistics:
        """Counters for tests and metrics; never raises."""
        return MemoryStoreStatistics(
            writes=self._writes,
            commits=self._writes,
            messages=len(self._entries),
            apps=len(self._apps),
        )

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise StoreError(f"memory store is {self._state.value}, not open")

    def _begin_write(self) -> None:
        self._check_open()
        self._writes += 1

    # --- apps ----------------------------------------------------------------

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; :class:`AppExistsError` on a duplicate name, id or key hash."""
        self._begin_write()
        if app.name in self._apps:
            raise AppExistsError(f"an app named {app.name!r} already exists")
        self._check_unique_id_and_key(app, replacing=None)
        self._index_app(app)

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        self._check_open()
        name = self._app_names_by_key.get(key_hash)
        return None if name is None else self._apps[name]

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        self._check_open()
        name = self._app_names_by_id.get(app_id)
        return None if name is None else self._apps[name]

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        self._check_open()
        return self._apps.get(name)

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        self._check_open()
        return [self._apps[name] for name in sorted(self._apps)]

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name``.

        Raises:
            LookupError: no app has that name.
            AppExistsError: the new app id or key hash belongs to another app.
        """
        self._begin_write()
        old = self._apps.get(app.name)
        if old is None:
            raise LookupError(f"no app named {app.name!r}")
        self._check_unique_id_and_key(app, replacing=old)
        del self._app_names_by_id[old.app_id]
        del self._app_names_by_key[old.key_hash]
        self._index_app(app)

    def _check_unique_id_and_key(self, app: AppRecord, replacing: AppRecord | None) -> None:
        owner = self._app_names_by_id.get(app.app_id)
        if owner is not None and (replacing is None or owner != replacing.name):
            raise AppExistsError(f"app id {app.app_id!r} is already registered to {owner!r}")
        owner = self._app_names_by_key.get(app.key_hash)
        if owner is not None and (replacing is None or owner != replacing.name):
            raise AppExistsError(f"that key hash is already registered to {owner!r}")

    def _index_app(self, app: AppRecord) -> None:
        self._apps[app.name] = app
        self._app_names_by_id[app.app_id] = app.name
        self._app_names_by_key[app.key_hash] = app.name

    # --- messages ------------------------------------------------------------

    async def append(self, messages: Sequence[StoredMessage]) -> None:
        """Store new messages, all or none. Raises :class:`StoreError` on a known idem."""
        self._begin_write()
        seen: set[str] = set()
        for message in messages:
            if message.idem in self._entries:
                raise StoreError(f"message idem {message.idem!r} is already stored")
            if message.idem in seen:
                raise StoreError(f"message idem {message.idem!r} appears twice in one append")
            seen.add(message.idem)
        for message in messages:
            self._seq += 1
            entry = _Entry(message, self._seq)
            self._entries[message.idem] = entry
            key = message.partition
            last = self._last_blocks.get(key)
            if last is None or message.block > last:
                self._last_blocks[key] = message.block
            self._index(entry)

    async def last_block(self, recipient: str, name: str) -> int:
        """The highest block ever stored for the partition, 0 if none."""
        self._check_open()
        return self._last_blocks.get((recipient, name), 0)

    async def get(self, idem: str) -> StoredMessage | None:
        """The message with this idem, whatever its state, or ``None``."""
        self._check_open()
        entry = self._entries.get(idem)
        return None if entry is None else entry.message

    async def fetch_ready(
        self, recipient: str, name: str, after_block: int, now_ms: int, limit: int
    ) -> list[StoredMessage]:
        """Visible pending messages of a partition after ``after_block``, in block order."""
        self._check_open()
        ready = self._ready.get((recipient, name))
        result: list[StoredMessage] = []
        if ready is None or limit <= 0:
            return result
        for position in range(bisect.bisect_left(ready, (after_block + 1,)), len(ready)):
            message = self._entries[ready[position][2]].message
            if message.visible_at_ms <= now_ms:
                result.append(message)
                if len(result) >= limit:
                    break
        return result

    async def fetch_scheduled(self, after_ms: int, limit: int) -> list[StoredMessage]:
        """Pending messages visible after ``after_ms``, soonest first (a full scan)."""
        self._check_open()
        if limit <= 0:
            return []
        candidates = (
            entry
            for ready in self._ready.values()
            for _block, _seq, idem in ready
            if (entry := self._entries[idem]).message.visible_at_ms > after_ms
        )
        chosen = heapq.nsmallest(limit, candidates, key=lambda e: (e.message.visible_at_ms, e.seq))
        return [entry.message for entry in chosen]

    async def settle(
        self, idem: str, state: MessageState, at_ms: int, reason: str | None = None
    ) -> bool:
        """Move a pending message to ``state``; ``False`` if unknown or not pending.

        Raises:
            ValueError: ``state`` is PENDING.
        """
        _check_settled_state(state)
        self._begin_write()
        entry = self._entries.get(idem)
        if entry is None or entry.message.state is not MessageState.PENDING:
            return False
        self._unindex(entry)
        entry.message = dataclasses.replace(
            entry.message, state=state, settled_at_ms=at_ms, dead_reason=reason
        )
        self._index(entry)
        return True

    async def reschedule(self, idem: str, visible_at_ms: int, attempts: int) -> bool:
        """Set visibility and attempt count of a pending message."""
        self._begin_write()
        entry = self._entries.get(idem)
        if entry is None or entry.message.state is not MessageState.PENDING:
            return False
        # Visibility is not part of any sorted key, so no re-indexing.
        entry.message = dataclasses.replace(
            entry.message, visible_at_ms=visible_at_ms, attempts=attempts
        )
        return True

    async def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        """Set attempt counts of known messages, whatever their state; unknown idems are skipped."""
        self._begin_write()
        for idem, attempts in updates:
            entry = self._entries.get(idem)
            if entry is not None:
                entry.message = dataclasses.replace(entry.message, attempts=attempts)

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        """Dead letters of an app, most recently settled first."""
        self._check_open()
        dead = self._dead.get(recipient)
        if dead is None or limit <= 0:
            return []
        return [self._entries[key[3]].message for key in reversed(dead[-limit:])]

    async def redrive(self, idem: str, now_ms: int) -> bool:
        """Return a dead letter to PENDING, attempts reset, visible at ``now_ms``."""
        self._begin_write()
        entry = self._entries.get(idem)
        if entry is None or entry.message.state is not MessageState.DEAD:
            return False
        self._unindex(entry)
        entry.message = dataclasses.replace(
            entry.message,
            state=MessageState.PENDING,
            attempts=0,
            visible_at_ms=now_ms,
            settled_at_ms=None,
            dead_reason=None,
        )
        self._index(entry)
        return True

    async def recent_dedupe_keys(
        self, since_ms: int, limit: int
    ) -> list[tuple[str, str, str, str]]:
        """Scans every message: O(n). Used once, when an engine starts."""
        self._check_open()
        found = [
            (entry.seq, entry.message)
            for entry in self._entries.values()
            if entry.message.dedupe_key is not None and entry.message.created_at_ms >= since_ms
        ]
        found.sort(key=lambda item: (item[1].created_at_ms, item[0]))
        newest = found[-limit:] if limit > 0 else []
        return [(m.sender, m.recipient, m.dedupe_key or "", m.idem) for _, m in newest]

    async def backlog(self) -> dict[str, int]:
        """Pending messages per recipient: O(partitions)."""
        self._check_open()
        counts: dict[str, int] = {}
        for (recipient, _), keys in self._ready.items():
            if keys:
                counts[recipient] = counts.get(recipient, 0) + len(keys)
        return counts

    async def prune(self, settled_before_ms: int) -> int:
        """Delete messages settled before ``settled_before_ms``; returns how many."""
        self._begin_write()
        removed = 0
        while self._settled and self._settled[0][0] < settled_before_ms:
            settled_at, seq, idem = heapq.heappop(self._settled)
            entry = self._entries.get(idem)
            # Redrives leave stale heap entries behind; skip what no longer matches.
            if (
                entry is None
                or entry.seq != seq
                or entry.message.state is MessageState.PENDING
                or entry.message.settled_at_ms != settled_at
            ):
                continue
            self._unindex(entry)
            del self._entries[idem]
            removed += 1
        return removed

    # --- indexes -------------------------------------------------------------

    def _index(self, entry: _Entry) -> None:
        message = entry.message
        if message.state is MessageState.PENDING:
            bisect.insort(
                self._ready.setdefault(message.partition, []),
                (message.block, entry.seq, message.idem),
            )
            return
        if message.settled_at_ms is not None:
            heapq.heappush(self._settled, (message.settled_at_ms, entry.seq, message.idem))
        if message.state is MessageState.DEAD:
            bisect.insort(self._dead.setdefault(message.recipient, []), _dead_key(entry))

    def _unindex(self, entry: _Entry) -> None:
        # The settle-time heap is cleaned lazily by prune.
        message = entry.message
        if message.state is MessageState.PENDING:
            _remove_sorted(self._ready, message.partition, (message.block, entry.seq, message.idem))
        elif message.state is MessageState.DEAD:
            _remove_sorted(self._dead, message.recipient, _dead_key(entry))


def _dead_key(entry: _Entry) -> _DeadKey:
    settled = entry.message.settled_at_ms
    return (settled is not None, settled or 0, entry.seq, entry.message.idem)


def _remove_sorted(index: dict[_K, list[_T]], key: _K, item: _T) -> None:
    items = index[key]
    position = bisect.bisect_left(items, item)
    del items[position]
    if not items:
        # Drop empty lists so short-lived partitions do not accumulate.
        del index[key]


def _check_settled_state(state: MessageState) -> None:
    if state is MessageState.PENDING:
        raise ValueError("settle() moves a message out of PENDING; use redrive() to return it")
