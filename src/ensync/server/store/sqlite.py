"""The embedded, durable :class:`~ensync.server.store.base.Store`: one SQLite file.

How it works:

* **One writer thread** owns the only writing connection. Write calls enqueue
  an operation and await a future; the writer takes everything queued (up to
  ``max_batch``), runs it in one transaction (each operation inside its own
  savepoint, so one failing operation does not sink the others), commits once
  and then resolves all the futures. A persisted publish therefore returns
  only after its commit, and under concurrency one fsync covers many appends
  (group commit).
* **Reads** run on a small thread pool, each on its own read connection. In
  WAL mode readers never wait for the writer, and nothing is cached in memory:
  payloads are read only by the calls that return messages.
* ``busy_timeout`` lets another process (``ensync app create`` while the
  engine serves) write to the same file.
* sqlite3 exceptions stop here: they surface as :class:`StoreError` (or
  :class:`AppExistsError`), chained to the original.
* If the writer thread ever dies, every pending and later call fails with
  :class:`StoreError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import json
import logging
import pathlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast

from .base import AppExistsError, AppRecord, MessageState, StoredMessage, StoreError

__all__ = ["SCHEMA_VERSION", "SqliteStore", "SqliteStoreStatistics"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
"""Stored in ``PRAGMA user_version``; bump it with a migration."""

_T = TypeVar("_T")

# Deleting millions of settled rows in one transaction would stall publishes;
# prune deletes in chunks so appends can commit in between.
_PRUNE_CHUNK: Final = 5_000

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS messages (
        idem TEXT NOT NULL PRIMARY KEY,
        recipient TEXT NOT NULL,
        name TEXT NOT NULL,
        block INTEGER NOT NULL,
        payload TEXT NOT NULL,
        metadata TEXT NOT NULL,
        payload_metadata TEXT,
        sender TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        visible_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        settled_at_ms INTEGER,
        dead_reason TEXT,
        dedupe_key TEXT
    )
    """,
    # Rowids break ties, so every index below also orders by insertion.
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (recipient, name, state, block)",
    "CREATE INDEX IF NOT EXISTS messages_scheduled ON messages (state, visible_at_ms)",
    "CREATE INDEX IF NOT EXISTS messages_dead ON messages (recipient, state, settled_at_ms)",
    "CREATE INDEX IF NOT EXISTS messages_settled ON messages (settled_at_ms) WHERE state != 0",
    "CREATE INDEX IF NOT EXISTS messages_deduped ON messages (created_at_ms)"
    " WHERE dedupe_key IS NOT NULL",
    # Separate from messages so numbering survives pruning.
    """
    CREATE TABLE IF NOT EXISTS partitions (
        recipient TEXT NOT NULL,
        name TEXT NOT NULL,
        last_block INTEGER NOT NULL,
        PRIMARY KEY (recipient, name)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS apps (
        name TEXT NOT NULL PRIMARY KEY,
        app_id TEXT NOT NULL UNIQUE,
        key_hash BLOB NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        revoked INTEGER NOT NULL,
        publish_rules TEXT NOT NULL,
        subscribe_rules TEXT NOT NULL
    )
    """,
)

_MESSAGE_COLUMNS: Final = (
    "idem, recipient, name, block, payload, metadata, payload_metadata, sender, created_at_ms,"
    " state, attempts, visible_at_ms, expires_at_ms, settled_at_ms, dead_reason, dedupe_key"
)
_APP_COLUMNS: Final = (
    "name, app_id, key_hash, created_at_ms, revoked, publish_rules, subscribe_rules"
)
_PENDING: Final = int(MessageState.PENDING)
_DEAD: Final = int(MessageState.DEAD)


@dataclass(frozen=True, slots=True)
class SqliteStoreStatistics:
    """Counters of a :class:`SqliteStore`.

    Attributes:
        writes: write operations the writer has run (one per write call;
            ``prune`` runs one per chunk).
        commits: transactions committed; far fewer than ``writes`` under load.
        largest_batch: most operations ever committed together.
        queued: operations waiting for the writer right now.
        read_connections: read connections opened so far.
    """

    writes: int
    commits: int
    largest_batch: int
    queued: int
    read_connections: int


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], object]
    future: asyncio.Future[object]
    dispatched: bool = False


_Outcome = tuple[asyncio.Future[Any], object, BaseException | None]


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SqliteStore:
    """A durable store in one SQLite file (WAL mode, group commit).

    Args:
        path: the database file; its directory is created by :meth:`open`.
        synchronous: ``"FULL"`` fsyncs every commit (survives power loss);
            ``"NORMAL"`` survives a crash of the process only.
        max_batch: most write operations committed in one transaction.
        busy_timeout_ms: how long to wait for another process's lock before
            a call fails with :class:`StoreError`.
        readers: threads (and read connections) serving reads.

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
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must not be negative, not {busy_timeout_ms}")
        if readers < 1:
            raise ValueError(f"readers must be at least 1, not {readers}")
        self._path = pathlib.Path(path)
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._busy_timeout_s = busy_timeout_ms / 1000
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        # Guards _failure and the queue against the writer's dying drain.
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._stop_requested = False
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="ensync-sqlite-read"
        )
        self._idle_read_connections: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_connections: list[sqlite3.Connection] = []
        self._writes = 0
        self._commits = 0
        self._largest_batch = 0

    @property
    def path(self) -> pathlib.Path:
        """The database file."""
        return self._path

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Create the directory, the file and the schema; start the writer.

        Raises:
            StoreError: the file cannot be opened or has a newer schema, or
                the store was opened before.
        """
        if self._state is not _State.NEW or self._thread is not None:
            raise StoreError(f"sqlite store {self._path} cannot be opened twice")
        loop = asyncio.get_running_loop()
        self._loop = loop
        ready: asyncio.Future[object] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._writer_main,
            args=(ready,),
            name="ensync-sqlite-writer",
            # A forgotten close() must not hang interpreter exit; committed
            # data is safe either way.
            daemon=True,
        )
        self._thread.start()
        try:
            await ready
        except StoreError:
            self._state = _State.CLOSED
            self._stop_requested = True  # the writer has already stopped
            await asyncio.shield(self._stopped)
            self._thread.join()
            raise
        self._state = _State.OPEN

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close every connection. Idempotent."""
        self._state = _State.CLOSED
        if self._thread is None:
            self._readers.shutdown(wait=False)
            return
        assert self._stopped is not None  # set together with _thread
        with self._lock:
            if self._failure is None and not self._stop_requested:
                self._stop_requested = True
                self._queue.put(None)  # runs after everything queued before it
        await asyncio.shield(self._stopped)
        self._thread.join()

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
        return SqliteStoreStatistics(
            writes=self._writes,
            commits=self._commits,
            largest_batch=self._largest_batch,
            queued=self._queue.qsize(),
            read_connections=len(self._read_connections),
        )

    # --- apps ----------------------------------------------------------------

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; :class:`AppExistsError` on a duplicate name, id or key hash."""
        await self._write(functools.partial(_create_app, app))

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        return await self._read(functools.partial(_one_app, "key_hash", key_hash))

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        return await self._read(functools.partial(_one_app, "app_id", app_id))

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        return await self._read(functools.partial(_one_app, "name", name))

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        return await self._read(_list_apps)

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name``.

        Raises:
            LookupError: no app has that name.
            AppExistsError: the new app id or key hash belongs to another app.
        """
        await self._write(functools.partial(_update_app, app))

    # --- messages ------------------------------------------------------------

    async def append(self, messages: Sequence[StoredMessage]) -> None:
        """Store new messages, all or none; returns once they are committed.

        Raises:
            StoreError: an idem is already stored, or the write failed.
        """
        batch = tuple(messages)  # the caller may reuse its list while we wait
        if not batch:
            self._check_usable()
            return
        await self._write(functools.partial(_append, batch))

    async def last_block(self, recipient: str, name: str) -> int:
        """The highest block ever stored for the partition, 0 if none."""
        return await self._read(functools.partial(_last_block, recipient, name))

    async def get(self, idem: str) -> StoredMessage | None:
        """The message with this idem, whatever its state, or ``None``."""
        return await self._read(functools.partial(_get, idem))

    async def fetch_ready(
        self, recipient: str, name: str, after_block: int, now_ms: int, limit: int
    ) -> list[StoredMessage]:
        """Visible pending messages of a partition after ``after_block``, in block order."""
        if limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            self._check_usable()
            return []
        return await self._read(
            functools.partial(
                _fetch,
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE recipient = ? AND name = ? AND state = ? AND block > ?"
                " AND visible_at_ms <= ? ORDER BY block, rowid LIMIT ?",
                (recipient, name, _PENDING, after_block, now_ms, limit),
            )
        )

    async def fetch_scheduled(self, after_ms: int, limit: int) -> list[StoredMessage]:
        """Pending messages visible after ``after_ms``, soonest first."""
        if limit <= 0:
            self._check_usable()
            return []
        return await self._read(
            functools.partial(
                _fetch,
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE state = ? AND visible_at_ms > ?"
                " ORDER BY visible_at_ms, rowid LIMIT ?",
                (_PENDING, after_ms, limit),
            )
        )

    async def settle(
        self, idem: str, state: MessageState, at_ms: int, reason: str | None = None
    ) -> bool:
        """Move a pending message to ``state``; ``False`` if unknown or not pending.

        Raises:
            ValueError: ``state`` is PENDING.
        """
        if state is MessageState.PENDING:
            raise ValueError("settle() moves a message out of PENDING; use redrive() to return it")
        return await self._write(
            functools.partial(
                _update_one,
                "UPDATE messages SET state = ?, settled_at_ms = ?, dead_reason = ?"
                " WHERE idem = ? AND state = ?",
                (int(state), at_ms, reason, idem, _PENDING),
            )
        )

    async def reschedule(self, idem: str, visible_at_ms: int, attempts: int) -> bool:
        """Set visibility and attempt count of a pending message."""
        return await self._write(
            functools.partial(
                _update_one,
                "UPDATE messages SET visible_at_ms = ?, attempts = ? WHERE idem = ? AND state = ?",
                (visible_at_ms, attempts, idem, _PENDING),
            )
        )

    async def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        """Set attempt counts of known messages, whatever their state; unknown idems are skipped."""
        rows = [(attempts, idem) for idem, attempts in updates]
        if not rows:
            self._check_usable()
            return
        await self._write(functools.partial(_record_attempts, rows))

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        """Dead letters of an app, most recently settled first."""
        if limit <= 0:
            self._check_usable()
            return []
        return await self._read(
            functools.partial(
                _fetch,
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE recipient = ? AND state = ?"
                " ORDER BY settled_at_ms DESC, rowid DESC LIMIT ?",
                (recipient, _DEAD, limit),
            )
        )

    async def recent_dedupe_keys(
        self, since_ms: int, limit: int
    ) -> list[tuple[str, str, str, str]]:
        """Uses the partial index on ``created_at_ms`` of keyed messages; reads at
        most ``limit`` rows, however many messages the window holds."""
        if limit <= 0:
            return []
        rows = await self._read(
            functools.partial(
                _fetch_rows,
                "SELECT sender, recipient, dedupe_key, idem FROM messages"
                " WHERE dedupe_key IS NOT NULL AND created_at_ms >= ?"
                " ORDER BY created_at_ms DESC, rowid DESC LIMIT ?",
                (since_ms, limit),
            )
        )
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in reversed(rows)]

    async def backlog(self) -> dict[str, int]:
        """Pending messages per recipient. Counts every pending row (an index
        scan): meant for metrics scrapes, not for hot paths."""
        rows = await self._read(
            functools.partial(
                _fetch_rows,
                "SELECT recipient, count(*) FROM messages WHERE state = ? GROUP BY recipient",
                (_PENDING,),
            )
        )
        return {str(recipient): int(count) for recipient, count in rows}

    async def redrive(self, idem: str, now_ms: int) -> bool:
        """Return a dead letter to PENDING, attempts reset, visible at ``now_ms``."""
        return await self._write(
            functools.partial(
                _update_one,
                "UPDATE messages SET state = ?, attempts = 0, visible_at_ms = ?,"
                " settled_at_ms = NULL, dead_reason = NULL WHERE idem = ? AND state = ?",
                (_PENDING, now_ms, idem, _DEAD),
            )
        )

    async def prune(self, settled_before_ms: int) -> int:
        """Delete messages settled before ``settled_before_ms``; returns how many.

        Deletes in chunks of a few thousand rows, each its own commit.
        """
        removed = 0
        while True:
            chunk = await self._write(
                functools.partial(_prune_chunk, settled_before_ms, _PRUNE_CHUNK)
            )
            removed += chunk
            if chunk < _PRUNE_CHUNK:
                return removed

    # --- plumbing: the loop side ---------------------------------------------

    def _check_usable(self) -> asyncio.AbstractEventLoop:
        if self._failure is not None:
            raise StoreError(f"sqlite store {self._path} is broken: its writer stopped") from (
                self._failure
            )
        if self._state is not _State.OPEN or self._loop is None:
            raise StoreError(f"sqlite store {self._path} is {self._state.value}, not open")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("a SqliteStore can only be used from the loop that opened it")
        return self._loop

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = self._check_usable()
        future: asyncio.Future[object] = loop.create_future()
        with self._lock:
            if self._failure is not None:
                raise StoreError(f"sqlite store {self._path} is broken: its writer stopped") from (
                    self._failure
                )
            self._queue.put(_Op(fn, future))
        # Cancelling the caller does not withdraw the operation: it may still commit.
        return cast(_T, await future)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = self._check_usable()
        try:
            future = loop.run_in_executor(self._readers, self._run_read, fn)
        except RuntimeError as exc:  # the pool was shut down by a dying writer
            raise StoreError(f"sqlite store {self._path} is closed") from exc
        return await future

    # --- plumbing: the reader threads ----------------------------------------

    def _run_read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            try:
                conn = self._idle_read_connections.get_nowait()
            except queue.Empty:
                conn = self._connect()
                with self._lock:
                    self._read_connections.append(conn)
                conn.execute("PRAGMA query_only = ON")
            try:
                return fn(conn)
            finally:
                self._idle_read_connections.put(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self._path} failed: {exc}") from exc

    # --- plumbing: the writer thread -----------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in
        # the writer; reads run in autocommit). timeout= is busy_timeout.
        return sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )

    def _connect_writer(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreError(f"{self._path} cannot use WAL journal mode (it is in {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            _create_schema(conn, self._path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer_main(self, ready: asyncio.Future[object]) -> None:
        conn: sqlite3.Connection | None = None
        batch: list[_Op] = []
        failure: BaseException | None = None
        open_error: StoreError | None = None
        try:
            try:
                conn = self._connect_writer()
            except (OSError, sqlite3.Error) as exc:
                open_error = StoreError(f"cannot open sqlite store {self._path}: {exc}")
                open_error.__cause__ = exc
                return
            except StoreError as exc:
                open_error = exc
                return
            self._dispatch([(ready, None, None)])
            while self._run_next_batch(conn, batch):
                batch = []
        except Exception as exc:
            # Isolation boundary: a bug here must not leave callers awaiting
            # futures nobody will resolve. Log it and fail them all instead.
            logger.exception("sqlite writer for %s crashed; the store is now broken", self._path)
            failure = exc
        finally:
            if conn is None:
                if open_error is None:
                    open_error = StoreError(f"cannot open sqlite store {self._path}")
                    open_error.__cause__ = failure
                self._dispatch([(ready, None, open_error)])
            self._finish_writer(conn, batch, failure)

    def _run_next_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> bool:
        """Wait for work, run one batch into ``batch``; ``False`` once told to stop."""
        first = self._queue.get()
        if first is None:
            return False
        batch.append(first)
        while len(batch) < self._max_batch:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if op is None:
                self._run_batch(conn, batch)
                return False
            batch.append(op)
        self._run_batch(conn, batch)
        return True

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        outcomes: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                outcomes.append(_run_in_savepoint(conn, op))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # BEGIN, a savepoint or COMMIT failed (busy, disk full, I/O): the
            # whole batch is lost, so every caller hears about it.
            _rollback(conn)
            outcomes = []
            for op in batch:
                error = StoreError(f"writing {self._path} failed: {exc}")
                error.__cause__ = exc
                outcomes.append((op.future, None, error))
        else:
            self._commits += 1
            self._largest_batch = max(self._largest_batch, len(batch))
        self._writes += len(batch)
        for op in batch:
            op.dispatched = True
        self._dispatch(outcomes)

    def _finish_writer(
        self, conn: sqlite3.Connection | None, batch: list[_Op], failure: BaseException | None
    ) -> None:
        with self._lock:
            if failure is not None:
                self._failure = failure
            leftovers = [op for op in batch if not op.dispatched]
            while True:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is not None:
                    leftovers.append(op)
        outcomes: list[_Outcome] = []
        for op in leftovers:
            error = StoreError(f"sqlite store {self._path} stopped before this write ran")
            error.__cause__ = failure
            outcomes.append((op.future, None, error))
        self._dispatch(outcomes)
        # Waits for reads still running, so no connection closes under one.
        self._readers.shutdown(wait=True)
        with self._lock:
            connections = [*self._read_connections, *([conn] if conn is not None else [])]
        for connection in connections:
            try:
                connection.close()
            except sqlite3.Error:
                logger.warning("closing a connection to %s failed", self._path, exc_info=True)
        if self._stopped is not None:
            self._dispatch([(self._stopped, None, None)])

    def _dispatch(self, outcomes: list[_Outcome]) -> None:
        if not outcomes:
            return
        assert self._loop is not None  # set before the writer starts
        try:
            self._loop.call_soon_threadsafe(_resolve, outcomes)
        except RuntimeError:
            # The loop is closed: nobody is left awaiting these futures.
            logger.debug("event loop closed; %d results of %s dropped", len(outcomes), self._path)


# --- operations (run on the writer or a reader thread) ----------------------


def _resolve(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the caller was cancelled
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _run_in_savepoint(conn: sqlite3.Connection, op: _Op) -> _Outcome:
    conn.execute("SAVEPOINT op")
    try:
        result = op.fn(conn)
    except sqlite3.Error as exc:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        error = StoreError(f"sqlite write failed: {exc}")
        error.__cause__ = exc
        return (op.future, None, error)
    except Exception as exc:
        # Not swallowed: the error goes to the caller of this one operation
        # (AppExistsError, LookupError, an int too large for SQLite, ...).
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return (op.future, None, exc)
    conn.execute("RELEASE op")
    return (op.future, result, None)


def _rollback(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        # SQLite may already have rolled back on its own (e.g. after an I/O error).
        logger.warning("rollback failed", exc_info=True)


def _create_schema(conn: sqlite3.Connection, path: pathlib.Path) -> None:
    def version() -> int:
        (value,) = conn.execute("PRAGMA user_version").fetchone()
        return int(value)

    if version() == SCHEMA_VERSION:
        return
    # Another process may be creating the schema right now: decide inside the lock.
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = version()
        if found == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif found != SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {found}; this ensync supports {SCHEMA_VERSION}"
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        idem=row[0],
        recipient=row[1],
        name=row[2],
        block=row[3],
        payload=row[4],
        metadata=row[5],
        payload_metadata=row[6],
        sender=row[7],
        created_at_ms=row[8],
        state=MessageState(row[9]),
        attempts=row[10],
        visible_at_ms=row[11],
        expires_at_ms=row[12],
        settled_at_ms=row[13],
        dead_reason=row[14],
        dedupe_key=row[15],
    )


def _app(row: Sequence[Any]) -> AppRecord:
    return AppRecord(
        name=row[0],
        app_id=row[1],
        key_hash=bytes(row[2]),
        created_at_ms=row[3],
        revoked=bool(row[4]),
        publish_rules=tuple(json.loads(row[5])),
        subscribe_rules=tuple(json.loads(row[6])),
    )


# fetchall() everywhere: it steps each statement to the end, so a read
# connection never keeps an old snapshot open between calls.


def _fetch(sql: str, params: tuple[object, ...], conn: sqlite3.Connection) -> list[StoredMessage]:
    return [_message(row) for row in conn.execute(sql, params).fetchall()]


def _get(idem: str, conn: sqlite3.Connection) -> StoredMessage | None:
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE idem = ?", (idem,)
    ).fetchall()
    return _message(rows[0]) if rows else None


def _last_block(recipient: str, name: str, conn: sqlite3.Connection) -> int:
    rows = conn.execute(
        "SELECT last_block FROM partitions WHERE recipient = ? AND name = ?", (recipient, name)
    ).fetchall()
    return int(rows[0][0]) if rows else 0


def _one_app(column: str, value: object, conn: sqlite3.Connection) -> AppRecord | None:
    # column is one of our own literals, never caller input.
    rows = conn.execute(f"SELECT {_APP_COLUMNS} FROM apps WHERE {column} = ?", (value,)).fetchall()
    return _app(rows[0]) if rows else None


def _list_apps(conn: sqlite3.Connection) -> list[AppRecord]:
    rows = conn.execute(f"SELECT {_APP_COLUMNS} FROM apps ORDER BY name").fetchall()
    return [_app(row) for row in rows]


def _check_app_conflicts(conn: sqlite3.Connection, app: AppRecord, own_name: str | None) -> None:
    for column, value, what in (
        ("app_id", app.app_id, f"app id {app.app_id!r}"),
        ("key_hash", app.key_hash, "that key hash"),
    ):
        rows = conn.execute(f"SELECT name FROM apps WHERE {column} = ?", (value,)).fetchall()
        if rows and rows[0][0] != own_name:
            raise AppExistsError(f"{what} is already registered to {rows[0][0]!r}")


def _create_app(app: AppRecord, conn: sqlite3.Connection) -> None:
    if conn.execute("SELECT 1 FROM apps WHERE name = ?", (app.name,)).fetchall():
        raise AppExistsError(f"an app named {app.name!r} already exists")
    _check_app_conflicts(conn, app, own_name=None)
    try:
        conn.execute(
            f"INSERT INTO apps ({_APP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                app.name,
                app.app_id,
                app.key_hash,
                app.created_at_ms,
                int(app.revoked),
                json.dumps(list(app.publish_rules)),
                json.dumps(list(app.subscribe_rules)),
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise AppExistsError(f"app {app.name!r} conflicts with a registered app: {exc}") from exc


def _update_app(app: AppRecord, conn: sqlite3.Connection) -> None:
    _check_app_conflicts(conn, app, own_name=app.name)
    try:
        cursor = conn.execute(
            "UPDATE apps SET app_id = ?, key_hash = ?, created_at_ms = ?, revoked = ?,"
            " publish_rules = ?, subscribe_rules = ? WHERE name = ?",
            (
                app.app_id,
                app.key_hash,
                app.created_at_ms,
                int(app.revoked),
                json.dumps(list(app.publish_rules)),
                json.dumps(list(app.subscribe_rules)),
                app.name,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise AppExistsError(f"app {app.name!r} conflicts with a registered app: {exc}") from exc
    if cursor.rowcount == 0:
        raise LookupError(f"no app named {app.name!r}")


def _append(messages: tuple[StoredMessage, ...], conn: sqlite3.Connection) -> None:
    last_blocks: dict[tuple[str, str], int] = {}
    for m in messages:
        try:
            conn.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m.idem,
                    m.recipient,
                    m.name,
                    m.block,
                    m.payload,
                    m.metadata,
                    m.payload_metadata,
                    m.sender,
                    m.created_at_ms,
                    int(m.state),
                    m.attempts,
                    m.visible_at_ms,
                    m.expires_at_ms,
                    m.settled_at_ms,
                    m.dead_reason,
                    m.dedupe_key,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise StoreError(f"message idem {m.idem!r} is already stored") from exc
            raise StoreError(f"message {m.idem!r} cannot be stored: {exc}") from exc
        key = m.partition
        last_blocks[key] = max(m.block, last_blocks.get(key, m.block))
    # Same transaction as the rows: last_block can never lag what is stored.
    conn.executemany(
        "INSERT INTO partitions (recipient, name, last_block) VALUES (?, ?, ?)"
        " ON CONFLICT (recipient, name) DO UPDATE"
        " SET last_block = max(last_block, excluded.last_block)",
        [(recipient, name, block) for (recipient, name), block in last_blocks.items()],
    )


def _fetch_rows(
    sql: str, params: tuple[object, ...], conn: sqlite3.Connection
) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(sql, params).fetchall()]


def _update_one(sql: str, params: tuple[object, ...], conn: sqlite3.Connection) -> bool:
    return conn.execute(sql, params).rowcount == 1


def _record_attempts(rows: list[tuple[int, str]], conn: sqlite3.Connection) -> None:
    conn.executemany("UPDATE messages SET attempts = ? WHERE idem = ?", rows)


def _prune_chunk(settled_before_ms: int, limit: int, conn: sqlite3.Connection) -> int:
    # "state != ?" would not match the partial index's "state != 0".
    cursor = conn.execute(
        "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages"
        " WHERE state != 0 AND settled_at_ms < ? LIMIT ?)",
        (settled_before_ms, limit),
    )
    return cursor.rowcount
