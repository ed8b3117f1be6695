"""One write operation of the sqlite backend's writer thread, and how its
outcome reaches its caller (a future, or a callback run on the loop)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ensync.server.store.base import StoreError
from ensync.server.store.sqlite.rows import roll_back_to

__all__ = ["Done", "Op", "Outcome", "Target", "resolve", "rollback", "run_in_savepoint"]

logger = logging.getLogger(__name__)

Done = Callable[[object, BaseException | None], None]
"""Hears a write's outcome on the loop: its result, or why it failed."""

# Who waits for a write: a future, or a callback run on the loop (no task).
Target = asyncio.Future[Any] | Done


@dataclass(slots=True)
class Op:
    """A write: the function the writer runs, and who waits for its outcome."""

    fn: Callable[[sqlite3.Connection], object]
    target: Target
    dispatched: bool = False


Outcome = tuple[Target, object, BaseException | None]


def resolve(outcomes: list[Outcome]) -> None:
    for target, result, error in outcomes:
        if not isinstance(target, asyncio.Future):
            try:
                target(result, error)
            except Exception:  # isolation boundary: one caller's bug spares the others
                logger.exception("a write's outcome could not be handed over")
            continue
        if target.done():  # the caller was cancelled
            continue
        if error is None:
            target.set_result(result)
        else:
            target.set_exception(error)


def run_in_savepoint(conn: sqlite3.Connection, op: Op) -> Outcome:
    conn.execute("SAVEPOINT op")
    try:
        result = op.fn(conn)
    except sqlite3.Error as exc:
        roll_back_to("op", exc, conn)
        conn.execute("RELEASE op")
        error = StoreError(f"sqlite write failed: {exc}")
        error.__cause__ = exc
        return (op.target, None, error)
    except Exception as exc:  # noqa: BLE001
        # Isolation boundary: one operation's error is its caller's, not the
        # writer's. Not swallowed: it goes to the caller of this one operation
        # (AppExistsError, LookupError, an int too large for SQLite, ...).
        roll_back_to("op", exc, conn)
        conn.execute("RELEASE op")
        return (op.target, None, exc)
    conn.execute("RELEASE op")
    return (op.target, result, None)


def rollback(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        # SQLite may already have rolled back on its own (e.g. after an I/O error).
        logger.warning("rollback failed", exc_info=True)
