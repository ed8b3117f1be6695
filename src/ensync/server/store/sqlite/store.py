"""The embedded, durable :class:`~ensync.server.store.base.Store`: one SQLite file.

Persisted messages and apps live in the file (WAL mode, group commit, see
:mod:`.runner`); ``persist: false`` messages, leases and claim windows live
in memory (:class:`~ensync.server.store.local.LocalMessages`). What the
module promises beyond the contract:

* a publish's ``append`` returns after the commit holding it (``FULL``
  synchronous: after fsync);
* reads skip payloads except for the messages a claim returns, and the
  payloads of messages just appended are kept (up to ``payload_cache_bytes``)
  so that delivering them needs no read;
* at open, the numbering of every partition and the newest idempotency keys
  are read, nothing else: deferred and pending messages stay on disk until
  a claim reaches them.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType
from typing import Final, Literal, Self, cast

from ensync.server.store.backing import Ref
from ensync.server.store.base import AppRecord, DeadRef, MessageState, StoredMessage, StoreError
from ensync.server.store.local import InsertDone, LocalMessages
from ensync.server.store.sqlite import rows
from ensync.server.store.sqlite.runner import SqliteRunner, SqliteStoreStatistics
from ensync.server.store.sqlite.schema import prepare

__all__ = ["SqliteStore"]

# Deleting millions of settled rows in one transaction would stall publishes;
# prune deletes in chunks so appends can commit in between.
_PRUNE_CHUNK: Final = 5_000
_Key = tuple[str, str]


class _PayloadCache:
    """Recently appended messages, newest last, within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, StoredMessage] = OrderedDict()

    def put(self, message: StoredMessage) -> None:
        size = len(message.payload) + len(message.metadata)
        if size > self._max:
            return
        self._items[message.idem] = message
        self._bytes += size
        while self._bytes > self._max:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old.payload) + len(old.metadata)

    def pop(self, idem: str) -> StoredMessage | None:
        message = self._items.pop(idem, None)
        if message is not None:
            self._bytes -= len(message.payload) + len(message.metadata)
        return message


class _Table:
    """The durable table of :class:`SqliteStore` (its ``DurableTable``)."""

    def __init__(self, runner: SqliteRunner, cache: _PayloadCache) -> None:
        self._runner = runner
        self._cache = cache

    async def insert(self, batch: Sequence[StoredMessage]) -> list[str | None]:
        errors = await self._runner.write(functools.partial(rows.insert_rows, tuple(batch)))
        self._cache_stored(batch, errors)
        return errors

    def insert_soon(self, batch: Sequence[StoredMessage], done: InsertDone) -> None:
        def written(result: object, error: BaseException | None) -> None:
            if error is not None:
                if not isinstance(error, StoreError):
                    failure = StoreError(f"storing a batch failed: {error}")
                    failure.__cause__ = error
                    error = failure
                done(error)
                return
            errors = cast(list[str | None], result)
            self._cache_stored(batch, errors)
            done(errors)

        self._runner.write_soon(functools.partial(rows.insert_rows, tuple(batch)), written)

    def _cache_stored(self, batch: Sequence[StoredMessage], errors: list[str | None]) -> None:
        for message, error in zip(batch, errors, strict=True):
            if error is None:
                self._cache.put(message)

    def note_volatile(self, key: _Key, blocks: Sequence[int]) -> None:
        self._runner.write_nowait(
            functools.partial(rows.note_last_blocks, {key: blocks[-1]}), "recording block numbers"
        )

    async def get(self, idem: str) -> StoredMessage | None:
        return await self._runner.read(functools.partial(rows.get, idem))

    async def page(
        self, key: _Key, after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]:
        return await self._runner.read(
            functools.partial(rows.page, *key, after_block, upto_block, now_ms, limit)
        )

    async def due(
        self, key: _Key, since_ms: int, until_ms: int, max_block: int, limit: int
    ) -> list[Ref]:
        return await self._runner.read(
            functools.partial(rows.due, *key, since_ms, until_ms, max_block, limit)
        )

    async def next_due(self, key: _Key, after_ms: int) -> int | None:
        return await self._runner.read(functools.partial(rows.next_due, *key, after_ms))

    async def load(self, idems: Sequence[str]) -> dict[str, StoredMessage]:
        found: dict[str, StoredMessage] = {}
        missing: list[str] = []
        for idem in idems:
            cached = self._cache.pop(idem)  # delivered once: the cache has done its job
            if cached is not None:
                found[idem] = cached
            else:
                missing.append(idem)
        if missing:
            found.update(await self._runner.read(functools.partial(rows.load, missing)))
        return found

    async def settle_many(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        for idem, _, _ in items:
            self._cache.pop(idem)
        return await self._runner.write(functools.partial(rows.settle_many, tuple(items), now_ms))

    async def reschedule_many(self, items: Sequence[tuple[str, int, int | None]]) -> list[bool]:
        return await self._runner.write(functools.partial(rows.reschedule_many, tuple(items)))

    def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        self._runner.write_nowait(
            functools.partial(rows.record_attempts, tuple(updates)), "recording attempt counts"
        )

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        if limit <= 0:
            return []
        return await self._runner.read(functools.partial(rows.list_dead, recipient, limit))

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        return await self._runner.read(functools.partial(rows.list_dead_refs, recipient))

    async def redrive(self, idem: str, now_ms: int) -> StoredMessage | None:
        return await self._runner.write(functools.partial(rows.redrive, idem, now_ms))

    async def take_redriven(self, limit: int) -> list[StoredMessage]:
        # Asked a few times a second and nearly always empty: a read looks
        # first, so an idle engine opens no write transaction for it.
        if not await self._runner.read(rows.any_redriven):
            return []
        return await self._runner.write(functools.partial(rows.take_redriven, limit))

    async def backlog(self) -> dict[str, int]:
        # Counts every pending row (an index scan): for metrics scrapes only.
        return await self._runner.read(rows.backlog)

    async def prune(self, settled_before_ms: int) -> int:
        removed = 0
        while True:
            chunk = await self._runner.write(
                functools.partial(rows.prune_chunk, settled_before_ms, _PRUNE_CHUNK)
            )
            removed += chunk
            if chunk < _PRUNE_CHUNK:
                return removed


class SqliteStore(LocalMessages):
    """A durable store in one SQLite file (WAL mode, group commit).

    Args:
        path: the database file; its directory is created by :meth:`open`.
        synchronous: ``"FULL"`` fsyncs every commit (survives power loss);
            ``"NORMAL"`` survives a crash of the process only.
        max_batch: most write operations committed in one transaction.
        busy_timeout_ms: how long to wait for another process's lock before
            a call fails with :class:`~ensync.server.store.base.StoreError`.
        readers: threads (and read connections) serving reads.
        payload_cache_bytes: budget for payloads kept between append and claim.
        dedupe_max_keys: most idempotency keys remembered.

    Call :meth:`open` first (or use ``async with``), :meth:`close` last. A
    store belongs to the event loop that opened it.
    """

    def __init__(
        self,
        path: pathlib.Path,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        max_batch: int = 1024,
        busy_timeout_ms: int = 5_000,
        readers: int = 4,
        payload_cache_bytes: int = 32 * 1024 * 1024,
        dedupe_max_keys: int = 100_000,
    ) -> None:
        self._path = pathlib.Path(path)
        self._runner = SqliteRunner(
            self._path,
            functools.partial(prepare, path=self._path),
            synchronous=synchronous,
            max_batch=max_batch,
            busy_timeout_ms=busy_timeout_ms,
            readers=readers,
        )
        self._dedupe_max_keys = dedupe_max_keys
        super().__init__(
            _Table(self._runner, _PayloadCache(payload_cache_bytes)),
            dedupe_max_keys=dedupe_max_keys,
        )

    @property
    def path(self) -> pathlib.Path:
        """The database file."""
        return self._path

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Create the directory, the file and the schema (or migrate it); start
        the writer; read block numbering and recent idempotency keys.

        Raises:
            StoreError: the file cannot be opened or has a newer schema, or
                the store was opened before.
        """
        await self._runner.open()
        for recipient, name, block in await self._runner.read(rows.last_blocks):
            self._sequencer.seed((recipient, name), block)
        recent = await self._runner.read(
            functools.partial(rows.recent_dedupe_keys, self._dedupe_max_keys)
        )
        self._seed_dedupe(recent)

    async def close(self) -> None:
        """Record the attempt counts of leased messages, commit what is
        queued, stop the writer and close every connection. Idempotent."""
        with contextlib.suppress(StoreError):  # not open (or broken): nothing to keep
            self._check_open()
            held = self._book.held_attempts()
            if held:
                self._tables.record_attempts(held)
        await self._runner.close()

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

    def statistics(self) -> SqliteStoreStatistics:
        """Counters for tests and metrics; never raises."""
        return self._runner.statistics()

    def _check_open(self) -> None:
        self._runner.check_usable()

    # --- apps ----------------------------------------------------------------

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; ``AppExistsError`` on a duplicate name, id or key hash."""
        await self._runner.write(functools.partial(rows.create_app, app))

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        return await self._runner.read(functools.partial(rows.one_app, "key_hash", key_hash))

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        return await self._runner.read(functools.partial(rows.one_app, "app_id", app_id))

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        return await self._runner.read(functools.partial(rows.one_app, "name", name))

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        return await self._runner.read(rows.list_apps)

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name``.

        Raises:
            LookupError: no app has that name.
            AppExistsError: the new app id or key hash belongs to another app.
        """
        await self._runner.write(functools.partial(rows.update_app, app))
