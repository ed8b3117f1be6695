"""What the in-process backends share: numbering, deduplication, claims.

:class:`LocalMessages` implements :class:`~ensync.server.store.base.MessageLog`
and :class:`~ensync.server.store.base.DeliveryState` over two tables: an
in-memory one (:class:`~ensync.server.store.memlog.MemoryMessages`) for
``persist: false`` messages, and an optional :class:`DurableTable` (sqlite)
for the rest. Without a durable table every message lives in memory (the
memory backend). One block numbering spans both tables.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ensync.server.store import lifecycle
from ensync.server.store.base import (
    AppendDone,
    Appended,
    Claim,
    DeadRef,
    DeliveryPolicy,
    NewMessage,
    ReadyListener,
    Release,
    Released,
    Settlement,
    StoredMessage,
    StoreError,
)
from ensync.server.store.book import LeaseBook, Ref
from ensync.server.store.memlog import MemoryMessages
from ensync.server.store.numbering import DedupeWindow, Sequencer, dedupe_digest
from ensync.server.store.tables import DurableTable, InsertDone, Tables

__all__ = ["DurableTable", "InsertDone", "LocalMessages"]

_Key = tuple[str, str]
# Messages redriven elsewhere taken from the durable table per read.
_ADOPT_BATCH = 1000


@dataclass(slots=True)
class _Appending:
    """A batch between numbering and its durable write."""

    results: list[Appended | None]
    rows: list[tuple[int, StoredMessage]] = field(default_factory=list)
    durable: list[tuple[int, StoredMessage]] = field(default_factory=list)
    reserved: dict[int, bytes] = field(default_factory=dict)
    # Records whose idempotency key is being stored by an earlier batch.
    waiting: list[tuple[int, asyncio.Future[Appended]]] = field(default_factory=list)


def _as_duplicate(original: Appended) -> Appended:
    if original.error is not None:
        return original
    return Appended(original.idem, original.block, duplicate=True)


def _when_answered(pending: _Appending, done: AppendDone) -> None:
    """Call ``done`` with the results once every waited-for key is settled."""
    left = len(pending.waiting)

    def finish() -> None:
        done([r for r in pending.results if r is not None])

    if not left:
        finish()
        return

    def settled(index: int, future: asyncio.Future[Appended]) -> None:
        nonlocal left
        pending.results[index] = _as_duplicate(future.result())
        left -= 1
        if not left:
            finish()

    for index, future in pending.waiting:
        future.add_done_callback(functools.partial(settled, index))


class LocalMessages:
    """Messages and deliveries over a memory table and an optional durable one.

    Call :meth:`check` before each operation (the subclass says whether the
    store is open) — it is the subclass's ``_check_open``.
    """

    def __init__(self, durable: DurableTable | None, *, dedupe_max_keys: int = 100_000) -> None:
        self._durable = durable
        self._memory = MemoryMessages()
        self._sequencer: Sequencer[StoredMessage] = Sequencer()
        self._dedupe = DedupeWindow(dedupe_max_keys)
        self._tables = Tables(self._memory, durable, self._sequencer)
        self._book = LeaseBook(self._tables)
        self._listeners_stop: list[Callable[[], None]] = []

    def _check_open(self) -> object:  # overridden
        raise NotImplementedError

    # --- MessageLog ---------------------------------------------------------

    async def append(
        self, batch: Sequence[NewMessage], *, now_ms: int, dedupe_since_ms: int
    ) -> list[Appended]:
        self._check_open()
        pending = self._begin_append(batch, dedupe_since_ms)
        outcome: list[str | None] | StoreError = []
        if pending.durable:
            assert self._durable is not None
            try:
                outcome = await self._durable.insert([m for _, m in pending.durable])
            except StoreError as exc:
                outcome = exc
        self._end_append(pending, outcome)
        for index, future in pending.waiting:
            pending.results[index] = _as_duplicate(await future)
        return [r for r in pending.results if r is not None]

    def append_soon(
        self,
        batch: Sequence[NewMessage],
        *,
        now_ms: int,
        dedupe_since_ms: int,
        done: AppendDone,
    ) -> None:
        """:meth:`append` without a coroutine: ``done`` hears the results on the
        loop once the batch is durable (the engine's hot path: no task, and
        no loop turn between the commit and the answers).

        Raises:
            StoreError: the store is not open (``done`` is not called).
        """
        self._check_open()
        pending = self._begin_append(batch, dedupe_since_ms)

        def inserted(outcome: list[str | None] | StoreError) -> None:
            self._end_append(pending, outcome)
            _when_answered(pending, done)

        if not pending.durable:
            inserted([])
            return
        assert self._durable is not None
        try:
            self._durable.insert_soon([m for _, m in pending.durable], inserted)
        except StoreError as exc:
            inserted(exc)

    def _begin_append(self, batch: Sequence[NewMessage], dedupe_since_ms: int) -> _Appending:
        """Number the batch and take its idempotency keys: what is decided
        before the write."""
        pending = _Appending(results=[None] * len(batch))
        seen_idems: set[str] = set()
        for index, new in enumerate(batch):
            refusal = self._refuse(new)
            if refusal is not None:
                pending.results[index] = Appended(new.idem, 0, error=refusal)
                continue
            if new.idem in seen_idems or new.idem in self._memory:
                pending.results[index] = Appended(
                    new.idem, 0, error=f"idem {new.idem!r} is already stored"
                )
                continue
            seen_idems.add(new.idem)
            if new.dedupe_key is not None:
                digest = dedupe_digest(new.sender, new.recipient, new.dedupe_key)
                earlier = self._dedupe.lookup(digest, dedupe_since_ms)
                if isinstance(earlier, Appended):
                    pending.results[index] = Appended(earlier.idem, earlier.block, duplicate=True)
                    continue
                if earlier is not None:
                    pending.waiting.append((index, earlier))
                    continue
                self._dedupe.reserve(digest, new.created_at_ms)
                pending.reserved[index] = digest
            pending.rows.append((index, self._number(new)))
        durable = self._durable is not None
        pending.durable = [(i, m) for i, m in pending.rows if m.persist and durable]
        return pending

    def _end_append(self, pending: _Appending, outcome: list[str | None] | StoreError) -> None:
        """The durable write is over (``outcome``: per row None or why it
        failed, or why the whole write failed): settle keys, let messages out."""
        if isinstance(outcome, StoreError):
            outcome = [str(outcome)] * len(pending.durable)
        errors = {i: error for (i, _), error in zip(pending.durable, outcome, strict=True)}
        for index, message in pending.rows:
            error = errors.get(index)
            result = Appended(message.idem, message.block, error=error)
            pending.results[index] = result
            if index in pending.reserved:
                self._dedupe.settle_reservation(pending.reserved[index], result)
            self._let_out(message, stored=error is None)

    def _refuse(self, new: NewMessage) -> str | None:
        """Why this store does not take ``new`` here (``None``: it does)."""
        return None

    def _number(self, new: NewMessage) -> StoredMessage:
        return new.numbered(
            self._sequencer.number(new.partition),
            persist=new.persist and self._durable is not None,
        )

    def _let_out(self, message: StoredMessage, *, stored: bool) -> None:
        key = message.partition
        released = self._sequencer.resolve(key, message.block, message, ok=stored)
        if not released and stored:
            return  # waits behind an earlier block still committing
        volatile_blocks: list[int] = []
        refs: list[Ref] = []
        for item in released:
            if not item.persist:
                self._memory.add(item)
                volatile_blocks.append(item.block)
            refs.append(Ref(item.idem, item.block, 0, item.expires_at_ms, 0))
        if volatile_blocks and self._durable is not None:
            self._durable.note_volatile(key, volatile_blocks)
        self._book.released(key, refs)

    async def get(self, idem: str) -> StoredMessage | None:
        self._check_open()
        message = self._memory.get(idem)
        if message is None and self._durable is not None:
            message = await self._durable.get(idem)
        return message

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        self._check_open()
        dead = self._memory.list_dead(recipient, limit)
        if self._durable is not None:
            dead += await self._durable.list_dead(recipient, limit)
            dead.sort(key=lambda m: m.settled_at_ms or 0, reverse=True)
        return dead[: max(limit, 0)]

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        self._check_open()
        refs = self._memory.list_dead_refs(recipient)
        if self._durable is not None:
            durable = await self._durable.list_dead_refs(recipient)
            refs = list(heapq.merge(refs, durable)) if refs else durable
        return refs

    async def redrive(self, idem: str, now_ms: int) -> bool:
        self._check_open()
        message = self._memory.redrive(idem, now_ms)
        if message is None and self._durable is not None:
            message = await self._durable.redrive(idem, now_ms)
        if message is None:
            return False
        self._book.returned(message)
        return True

    async def adopt_redriven(self) -> int:
        self._check_open()
        if self._durable is None:
            return 0
        adopted = 0
        while batch := await self._durable.take_redriven(_ADOPT_BATCH):
            for message in batch:
                if not self._book.holds(message.idem):
                    self._book.returned(message)
                    adopted += 1
            if len(batch) < _ADOPT_BATCH:
                break
        return adopted

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        counts = self._memory.backlog()
        if self._durable is not None:
            for app_id, count in (await self._durable.backlog()).items():
                counts[app_id] = counts.get(app_id, 0) + count
        return counts

    async def prune(self, settled_before_ms: int) -> int:
        self._check_open()
        removed = self._memory.prune(settled_before_ms)
        if self._durable is not None:
            removed += await self._durable.prune(settled_before_ms)
        return removed

    # --- DeliveryState ------------------------------------------------------

    def watch(self, listener: ReadyListener) -> Callable[[], None]:
        return self._book.watch(listener)

    async def claim(
        self, recipient: str, name: str, *, limit: int, now_ms: int, policy: DeliveryPolicy
    ) -> Claim:
        self._check_open()
        if limit <= 0:
            return Claim()
        claim, _ = await self._book.claim(
            (recipient, name), limit=limit, now_ms=now_ms, policy=policy
        )
        return claim

    async def extend(self, idem: str, token: int, deadline_ms: int) -> bool:
        self._check_open()
        return self._book.extend(idem, token, deadline_ms)

    async def release(
        self, releases: Sequence[Release], *, now_ms: int, policy: DeliveryPolicy
    ) -> list[Released]:
        self._check_open()
        return await self._book.release(releases, now_ms=now_ms, policy=policy)

    async def defer(self, idem: str, visible_at_ms: int, now_ms: int) -> bool:
        self._check_open()
        return await self._book.defer(idem, visible_at_ms, now_ms)

    async def settle(self, settlements: Sequence[Settlement], *, now_ms: int) -> list[bool]:
        self._check_open()
        for item in settlements:
            lifecycle.settling(item.state)  # ValueError for PENDING
        for item in settlements:
            self._book.forget(item.idem)
        return await self._tables.settle_many(
            [(s.idem, s.state, s.reason) for s in settlements], now_ms
        )

    # --- for the subclasses ---------------------------------------------------

    def _seed_dedupe(self, recent: Sequence[tuple[str, str, str, str, int, int]]) -> None:
        """``(sender, recipient, key, idem, block, created_at)``, oldest first."""
        for sender, recipient, key, idem, block, created_at in recent:
            self._dedupe.remember(
                dedupe_digest(sender, recipient, key), created_at, Appended(idem, block)
            )

    def delivery_statistics(self) -> tuple[int, int]:
        """(messages leased now, message references read ahead into windows)."""
        return self._book.statistics()
