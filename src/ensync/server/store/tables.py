"""The two tables of the in-process backends, as one: an in-memory table for
``persist: false`` messages and an optional durable one (sqlite) for the
rest. :class:`Tables` is what the lease book reads and writes
(:class:`~ensync.server.store.book.Backing`): each read merges both, each
write goes to the table that holds the message.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Protocol

from ensync.server.store.backing import Ref
from ensync.server.store.base import DeadRef, MessageState, StoredMessage, StoreError
from ensync.server.store.memlog import MemoryMessages
from ensync.server.store.numbering import Sequencer

__all__ = ["DurableTable", "InsertDone", "Tables", "split"]

_Key = tuple[str, str]


class DurableTable(Protocol):
    """The durable half of a local backend (the sqlite file)."""

    async def insert(self, rows: Sequence[StoredMessage]) -> list[str | None]:
        """Store new rows in one transaction; per row ``None`` or why it failed."""
        ...

    def insert_soon(self, rows: Sequence[StoredMessage], done: InsertDone) -> None:
        """:meth:`insert` with the outcome handed to ``done`` on the loop."""
        ...

    def note_volatile(self, key: _Key, blocks: Sequence[int]) -> None:
        """Blocks of ``key`` taken by memory-only rows, in order (best effort):
        the numbering goes on after them."""
        ...

    async def get(self, idem: str) -> StoredMessage | None: ...

    async def page(
        self, key: _Key, after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]: ...

    async def due(
        self, key: _Key, since_ms: int, until_ms: int, max_block: int, limit: int
    ) -> list[Ref]: ...

    async def next_due(self, key: _Key, after_ms: int) -> int | None: ...

    async def load(self, idems: Sequence[str]) -> dict[str, StoredMessage]: ...

    async def settle_many(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]: ...

    async def reschedule_many(self, items: Sequence[tuple[str, int, int | None]]) -> list[bool]: ...

    def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None: ...

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]: ...

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]: ...

    async def redrive(self, idem: str, now_ms: int) -> StoredMessage | None: ...

    async def take_redriven(self, limit: int) -> list[StoredMessage]: ...

    async def backlog(self) -> dict[str, int]: ...

    async def prune(self, settled_before_ms: int) -> int: ...


def split(idems: Sequence[str], memory: MemoryMessages) -> tuple[list[int], list[int]]:
    """Positions of idems held in memory, and of the others."""
    mem: list[int] = []
    rest: list[int] = []
    for index, idem in enumerate(idems):
        (mem if idem in memory else rest).append(index)
    return mem, rest


InsertDone = Callable[[list[str | None] | StoreError], None]
"""Hears how :meth:`DurableTable.insert_soon` went."""


class Tables:
    """The lease book's backing over the memory table and the durable one."""

    def __init__(
        self,
        memory: MemoryMessages,
        durable: DurableTable | None,
        sequencer: Sequencer[StoredMessage],
    ) -> None:
        self._memory = memory
        self._durable = durable
        self._sequencer = sequencer

    def released_upto(self, key: _Key) -> int:
        return self._sequencer.released_upto(key)

    async def page(
        self, key: _Key, after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]:
        refs = self._memory.page(key, after_block, upto_block, now_ms, limit)
        if self._durable is None:
            return refs
        rows = await self._durable.page(key, after_block, upto_block, now_ms, limit)
        return list(heapq.merge(refs, rows, key=lambda r: r.block))[:limit] if refs else rows

    async def due(
        self, key: _Key, since_ms: int, until_ms: int, max_block: int, limit: int
    ) -> list[Ref]:
        refs = self._memory.due(key, since_ms, until_ms, max_block)
        if self._durable is not None:
            refs += await self._durable.due(key, since_ms, until_ms, max_block, limit)
            refs.sort(key=lambda r: r.visible_at_ms)
        return refs

    async def next_due(self, key: _Key, after_ms: int) -> int | None:
        times = [self._memory.next_due(key, after_ms)]
        if self._durable is not None:
            times.append(await self._durable.next_due(key, after_ms))
        found = [t for t in times if t is not None]
        return min(found) if found else None

    async def load(self, idems: Sequence[str]) -> dict[str, StoredMessage]:
        mem, rest = split(idems, self._memory)
        loaded: dict[str, StoredMessage] = {}
        for index in mem:
            message = self._memory.get(idems[index])
            if message is not None:
                loaded[message.idem] = message
        if rest and self._durable is not None:
            loaded.update(await self._durable.load([idems[i] for i in rest]))
        return loaded

    async def settle_many(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        mem, rest = split([item[0] for item in items], self._memory)
        out = [False] * len(items)
        for index in mem:
            idem, state, reason = items[index]
            out[index] = self._memory.settle(idem, state, now_ms, reason)
        if rest and self._durable is not None:
            done = await self._durable.settle_many([items[i] for i in rest], now_ms)
            for index, ok in zip(rest, done, strict=True):
                out[index] = ok
        return out

    async def reschedule_many(self, items: Sequence[tuple[str, int, int | None]]) -> list[bool]:
        mem, rest = split([item[0] for item in items], self._memory)
        out = [False] * len(items)
        for index in mem:
            idem, visible_at, attempts = items[index]
            out[index] = self._memory.reschedule(idem, visible_at, attempts)
        if rest and self._durable is not None:
            done = await self._durable.reschedule_many([items[i] for i in rest])
            for index, ok in zip(rest, done, strict=True):
                out[index] = ok
        return out

    def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        mem, rest = split([idem for idem, _ in updates], self._memory)
        self._memory.set_attempts(updates[i] for i in mem)
        if rest and self._durable is not None:
            self._durable.record_attempts([updates[i] for i in rest])
