"""One engine per data directory, and the directory kept private.

The sqlite store is a plain file, and nothing stops two processes from
serving it at once: both would deliver the same messages. An engine holds an
exclusive lock on ``<database>.lock`` while it serves (``flock``: the kernel
drops it when the process dies, so a crash never leaves it behind); a second
engine is refused, naming the first one's pid. ``ensync app …`` commands do
not take the lock (they may run beside the engine) but can tell whether an
engine holds the file.

The store creates the directory 0700 and the database 0600 (SQLite gives its
WAL and shared-memory files the database's mode); an engine starting on a
looser directory or file says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Self

from ensync.server.store.base import StoreError

__all__ = ["DataDirInUseError", "EngineLock", "engine_holding", "loose_permissions"]

log = logging.getLogger(__name__)


class DataDirInUseError(StoreError):
    """Another engine serves this database."""


def _lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class EngineLock:
    """The serving engine's claim on a database file (a context manager).

    Example::

        with EngineLock(data_dir / "ensync.db"):
            ...  # serve
    """

    def __init__(self, database: Path) -> None:
        self._database = database
        self._fd: int | None = None

    def __enter__(self) -> Self:
        path = _lock_path(self._database)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"another engine (pid {holder})" if holder else "another engine"
            raise DataDirInUseError(
                f"{who} is already serving {self._database}; stop it, or give this one"
                " another --data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def engine_holding(database: Path) -> str | None:
    """The pid (as text, ``""`` if unknown) of the engine serving ``database``,
    or ``None`` if no engine holds it.

    Raises:
        OSError: the lock file is there but cannot be read (permissions).
    """
    try:
        fd = os.open(_lock_path(database), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None  # no lock file, or no directory for one: no engine
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def loose_permissions(database: Path) -> list[str]:
    """What other users may read: the directory and files of the database."""
    found: list[str] = []
    candidates = [database.parent] + [
        database.with_name(database.name + suffix) for suffix in ("", "-wal", "-shm")
    ]
    for path in candidates:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            found.append(f"{path} is mode {mode:04o}")
    return found
