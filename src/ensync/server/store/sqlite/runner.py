"""The plumbing of the sqlite backend: one writer thread, a pool of readers.

* **One writer thread** owns the only writing connection. Write calls enqueue
  an operation and await a future; the writer takes everything queued (up to
  ``max_batch``), runs it in one transaction (each operation inside its own
  savepoint, so one failing operation does not sink the others), commits once
  and then resolves all the futures. A write therefore returns only after its
  commit, and under concurrency one fsync covers many writes (group commit).
* **Reads** run on a small thread pool, each on its own read connection. In
  WAL mode readers never wait for the writer.
* **Checkpoints run on a thread of their own**, not after a commit on the
  writer: every ``checkpoint_every_s`` with new commits, a passive
  checkpoint copies the WAL into the database file while the writer goes
  on committing. SQLite's own checkpoint after a commit stays as a fallback,
  at a much larger WAL, so the file stays bounded if this thread falls
  behind.
* ``busy_timeout`` lets another process (``ensync app create`` while the
  engine serves) write to the same file.
* sqlite3 exceptions stop here: they surface as :class:`StoreError`, chained
  to the original.
* If the writer thread ever dies, every pending and later call fails with
  :class:`StoreError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import pathlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from ensync.server.store.base import StoreError
from ensync.server.store.sqlite.ops import (
    Done,
    Op,
    Outcome,
    resolve,
    rollback,
    run_in_savepoint,
)

__all__ = ["MIN_SQLITE", "Done", "SqliteRunner", "SqliteStoreStatistics"]

logger = logging.getLogger(__name__)

MIN_SQLITE = (3, 35, 0)

# The writer checkpoints by itself only past this many WAL pages (SQLite's
# default is 1000); the checkpointer thread normally keeps the WAL far smaller.
_FALLBACK_CHECKPOINT_PAGES = 16_384
# A WAL that grew past this is truncated back to it once checkpointed.
_WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

_T = TypeVar("_T")


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
        checkpoints: passive checkpoints run by the checkpointer thread.
    """

    writes: int
    commits: int
    largest_batch: int
    queued: int
    read_connections: int
    checkpoints: int


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SqliteRunner:
    """Runs operations on one SQLite file: writes on the writer thread in
    group commits, reads on a thread pool.

    Args:
        path: the database file; its directory is created by :meth:`open`.
        prepare: run on the writer's connection once, before any operation
            (schema creation and migrations).
        synchronous: ``"FULL"`` fsyncs every commit (survives power loss);
            ``"NORMAL"`` survives a crash of the process only.
        max_batch: most write operations committed in one transaction.
        busy_timeout_ms: how long to wait for another process's lock.
        readers: threads (and read connections) serving reads.
        checkpoint_every_s: how often the checkpointer thread copies newly
            committed pages from the WAL into the database file.
    """

    def __init__(
        self,
        path: pathlib.Path,
        prepare: Callable[[sqlite3.Connection], None],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        max_batch: int = 1024,
        busy_timeout_ms: int = 5_000,
        readers: int = 4,
        checkpoint_every_s: float = 0.1,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must not be negative, not {busy_timeout_ms}")
        if readers < 1:
            raise ValueError(f"readers must be at least 1, not {readers}")
        if checkpoint_every_s <= 0:
            raise ValueError(f"checkpoint_every_s must be positive, not {checkpoint_every_s}")
        self._path = pathlib.Path(path)
        self._prepare = prepare
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
        self._queue: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="ensync-sqlite-read"
        )
        self._idle_read_connections: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_connections: list[sqlite3.Connection] = []
        self._writes = 0
        self._commits = 0
        self._largest_batch = 0
        self._checkpoint_every_s = checkpoint_every_s
        self._checkpoints = 0
        self._checkpoints_stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    @property
    def path(self) -> pathlib.Path:
        return self._path

    async def open(self) -> None:
        """Create the directory, the file and the schema; start the writer.

        Raises:
            StoreError: the file cannot be opened or has a newer schema, or
                the store was opened before.
        """
        if self._state is not _State.NEW or self._thread is not None:
            raise StoreError(f"sqlite store {self._path} cannot be opened twice")
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            # UPDATE ... RETURNING (settlements) arrived in 3.35.
            raise StoreError(
                f"ensync needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later;"
                f" this Python has {sqlite3.sqlite_version}"
            )
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

    def statistics(self) -> SqliteStoreStatistics:
        """Counters for tests and metrics; never raises."""
        return SqliteStoreStatistics(
            writes=self._writes,
            commits=self._commits,
            largest_batch=self._largest_batch,
            queued=self._queue.qsize(),
            read_connections=len(self._read_connections),
            checkpoints=self._checkpoints,
        )

    def check_usable(self) -> None:
        """Raise :class:`StoreError` unless open and healthy."""
        self._check_usable()

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in the next group commit; its result once committed."""
        return await self._write(fn)

    def write_soon(self, fn: Callable[[sqlite3.Connection], object], done: Done) -> None:
        """Run ``fn`` in the next group commit and call ``done(result, error)``
        on the loop once committed (or failed): :meth:`write` without a
        coroutine, for the hot path.

        Raises:
            StoreError: the store is not open, or broken (``done`` is not called).
        """
        self._check_usable()
        self._enqueue(Op(fn, done))

    def write_nowait(self, fn: Callable[[sqlite3.Connection], object], what: str) -> None:
        """Queue ``fn`` for the next group commit without waiting for it
        (best-effort bookkeeping); a failure is logged, not raised."""
        if self._failure is not None or self._state is not _State.OPEN or self._loop is None:
            return
        future: asyncio.Future[object] = self._loop.create_future()
        future.add_done_callback(lambda done: _log_failure(done, what))
        with self._lock:
            if self._failure is None and not self._stop_requested:
                self._queue.put(Op(fn, future))

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` on a read connection."""
        return await self._read(fn)

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
        self._enqueue(Op(fn, future))
        # Cancelling the caller does not withdraw the operation: it may still commit.
        return cast(_T, await future)

    def _enqueue(self, op: Op) -> None:
        with self._lock:
            if self._failure is not None:
                raise StoreError(f"sqlite store {self._path} is broken: its writer stopped") from (
                    self._failure
                )
            self._queue.put(op)

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
        # Private from the start: the file holds message headers in clear.
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._path.exists():
            # SQLite gives the WAL and shared-memory files the database's mode.
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = self._connect()
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreError(f"{self._path} cannot use WAL journal mode (it is in {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_FALLBACK_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT_BYTES}")
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer_main(self, ready: asyncio.Future[object]) -> None:
        conn: sqlite3.Connection | None = None
        batch: list[Op] = []
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
            self._checkpointer = threading.Thread(
                target=self._checkpointer_main, name="ensync-sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()
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

    def _checkpointer_main(self) -> None:
        seen = self._commits
        try:
            conn = self._connect()
        except sqlite3.Error:
            logger.warning("no checkpointer for %s; the writer checkpoints", self._path)
            return
        try:
            while not self._checkpoints_stop.wait(self._checkpoint_every_s):
                if self._commits == seen:
                    continue
                seen = self._commits
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # Harmless: the next round or the writer's fallback retries.
                    logger.debug("checkpoint of %s failed: %s", self._path, exc)
                else:
                    self._checkpoints += 1
        finally:
            conn.close()

    def _run_next_batch(self, conn: sqlite3.Connection, batch: list[Op]) -> bool:
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

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Op]) -> None:
        outcomes: list[Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                outcomes.append(run_in_savepoint(conn, op))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # BEGIN, a savepoint or COMMIT failed (busy, disk full, I/O): the
            # whole batch is lost, so every caller hears about it.
            rollback(conn)
            outcomes = []
            for op in batch:
                error = StoreError(f"writing {self._path} failed: {exc}")
                error.__cause__ = exc
                outcomes.append((op.target, None, error))
        else:
            self._commits += 1
            self._largest_batch = max(self._largest_batch, len(batch))
        self._writes += len(batch)
        for op in batch:
            op.dispatched = True
        self._dispatch(outcomes)

    def _finish_writer(
        self, conn: sqlite3.Connection | None, batch: list[Op], failure: BaseException | None
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
        outcomes: list[Outcome] = []
        for op in leftovers:
            error = StoreError(f"sqlite store {self._path} stopped before this write ran")
            error.__cause__ = failure
            outcomes.append((op.target, None, error))
        self._dispatch(outcomes)
        self._checkpoints_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
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

    def _dispatch(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        assert self._loop is not None  # set before the writer starts
        try:
            self._loop.call_soon_threadsafe(resolve, outcomes)
        except RuntimeError:
            # The loop is closed: nobody is left awaiting these futures.
            logger.debug("event loop closed; %d results of %s dropped", len(outcomes), self._path)


def _log_failure(future: asyncio.Future[object], what: str) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        logger.warning("%s failed: %s", what, error)
