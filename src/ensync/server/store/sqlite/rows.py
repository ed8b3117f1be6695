"""SQL of the sqlite backend: functions that run on a connection.

They run on the writer thread (writes, inside the writer's transaction) or
on a reader thread; none of them commits. ``fetchall()`` everywhere: it
steps each statement to the end, so a read connection never keeps an old
snapshot open between calls.

Writes that move a message between stored states (settle, reschedule,
redrive, prune) take their guard on ``state`` from the lifecycle table.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from ensync.server.store import lifecycle
from ensync.server.store.backing import Ref
from ensync.server.store.base import AppExistsError, AppRecord, DeadRef, MessageState, StoredMessage
from ensync.server.store.lifecycle import Event

__all__ = [
    "any_redriven",
    "app_row",
    "backlog",
    "create_app",
    "due",
    "fetch",
    "get",
    "insert_rows",
    "last_blocks",
    "list_apps",
    "list_dead",
    "list_dead_refs",
    "load",
    "message",
    "next_due",
    "note_last_blocks",
    "one_app",
    "page",
    "prune_chunk",
    "recent_dedupe_keys",
    "record_attempts",
    "redrive",
    "reschedule_many",
    "roll_back_to",
    "settle_many",
    "state_guard",
    "take_redriven",
    "update_app",
]

# Whole messages, in the order message() reads them: the row and its body.
_SELECT_MESSAGES: Final = (
    "SELECT idem, recipient, name, block, payload, metadata, payload_metadata, sender,"
    " created_at_ms, state, attempts, visible_at_ms, expires_at_ms, settled_at_ms, dead_reason,"
    " dedupe_key FROM messages JOIN bodies ON bodies.id = messages.seq"
)
_APP_COLUMNS: Final = (
    "name, app_id, key_hash, created_at_ms, revoked, publish_rules, subscribe_rules"
)
_REF_COLUMNS: Final = "idem, block, attempts, expires_at_ms, visible_at_ms"


def state_guard(event: Event) -> str:
    """``event``'s condition on ``state``, from the lifecycle table, as a literal
    (SQLite matches partial indexes only on literals): ``state != N`` when it
    moves every state but N (the form of the index ``messages_settled``)."""
    states = sorted(lifecycle.stored_sources(event))
    others = sorted(set(MessageState).difference(states))
    if len(others) == 1:
        return f"state != {int(others[0])}"
    return f"state IN ({', '.join(str(int(state)) for state in states)})"


_SETTLE_GUARD: Final = {
    int(state): state_guard(lifecycle.settling(state))
    for state in MessageState
    if state is not MessageState.PENDING
}
_RESCHEDULE_GUARD: Final = state_guard(Event.DEFER)
_REDRIVE_GUARD: Final = state_guard(Event.REDRIVE)
_PRUNE_GUARD: Final = state_guard(Event.PRUNE)
# SQLite allows 32766 host parameters; stay far below.
_IN_CHUNK: Final = 500


def message(row: Sequence[Any]) -> StoredMessage:
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


def _ref(row: Sequence[Any]) -> Ref:
    return Ref(row[0], row[1], row[2], row[3], row[4])


# --- apps ----------------------------------------------------------------------


def app_row(row: Sequence[Any]) -> AppRecord:
    return AppRecord(
        name=row[0],
        app_id=row[1],
        key_hash=bytes(row[2]),
        created_at_ms=row[3],
        revoked=bool(row[4]),
        publish_rules=tuple(json.loads(row[5])),
        subscribe_rules=tuple(json.loads(row[6])),
    )


def one_app(column: str, value: object, conn: sqlite3.Connection) -> AppRecord | None:
    # column is one of our own literals, never caller input.
    rows = conn.execute(f"SELECT {_APP_COLUMNS} FROM apps WHERE {column} = ?", (value,)).fetchall()
    return app_row(rows[0]) if rows else None


def list_apps(conn: sqlite3.Connection) -> list[AppRecord]:
    rows = conn.execute(f"SELECT {_APP_COLUMNS} FROM apps ORDER BY name").fetchall()
    return [app_row(row) for row in rows]


def _check_app_conflicts(conn: sqlite3.Connection, app: AppRecord, own_name: str | None) -> None:
    for column, value, what in (
        ("app_id", app.app_id, f"app id {app.app_id!r}"),
        ("key_hash", app.key_hash, "that key hash"),
    ):
        rows = conn.execute(f"SELECT name FROM apps WHERE {column} = ?", (value,)).fetchall()
        if rows and rows[0][0] != own_name:
            raise AppExistsError(f"{what} is already registered to {rows[0][0]!r}")


def create_app(app: AppRecord, conn: sqlite3.Connection) -> None:
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


def update_app(app: AppRecord, conn: sqlite3.Connection) -> None:
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


# --- messages ------------------------------------------------------------------


def fetch(sql: str, params: tuple[object, ...], conn: sqlite3.Connection) -> list[StoredMessage]:
    return [message(row) for row in conn.execute(sql, params).fetchall()]


def get(idem: str, conn: sqlite3.Connection) -> StoredMessage | None:
    rows = conn.execute(f"{_SELECT_MESSAGES} WHERE idem = ?", (idem,)).fetchall()
    return message(rows[0]) if rows else None


def load(idems: Sequence[str], conn: sqlite3.Connection) -> dict[str, StoredMessage]:
    out: dict[str, StoredMessage] = {}
    for start in range(0, len(idems), _IN_CHUNK):
        chunk = idems[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for row in conn.execute(
            f"{_SELECT_MESSAGES} WHERE idem IN ({marks})", tuple(chunk)
        ).fetchall():
            found = message(row)
            out[found.idem] = found
    return out


def page(
    recipient: str,
    name: str,
    after_block: int,
    upto_block: int,
    now_ms: int,
    limit: int,
    conn: sqlite3.Connection,
) -> list[Ref]:
    rows = conn.execute(
        f"SELECT {_REF_COLUMNS} FROM messages"
        " WHERE recipient = ? AND name = ? AND state = 0 AND block > ? AND block <= ?"
        " AND visible_at_ms <= ? ORDER BY block, seq LIMIT ?",
        (recipient, name, after_block, upto_block, now_ms, limit),
    ).fetchall()
    return [_ref(row) for row in rows]


def due(
    recipient: str,
    name: str,
    since_ms: int,
    until_ms: int,
    max_block: int,
    limit: int,
    conn: sqlite3.Connection,
) -> list[Ref]:
    rows = conn.execute(
        f"SELECT {_REF_COLUMNS} FROM messages"
        " WHERE recipient = ? AND name = ? AND state = 0 AND visible_at_ms > ?"
        " AND visible_at_ms <= ? AND block <= ? ORDER BY visible_at_ms, seq LIMIT ?",
        (recipient, name, since_ms, until_ms, max_block, limit),
    ).fetchall()
    return [_ref(row) for row in rows]


def next_due(recipient: str, name: str, after_ms: int, conn: sqlite3.Connection) -> int | None:
    (row,) = conn.execute(
        "SELECT min(visible_at_ms) FROM messages"
        " WHERE recipient = ? AND name = ? AND state = 0 AND visible_at_ms > ?",
        (recipient, name, after_ms),
    ).fetchall()
    return int(row[0]) if row[0] is not None else None


def list_dead(recipient: str, limit: int, conn: sqlite3.Connection) -> list[StoredMessage]:
    """The app's dead letters, newest first."""
    return fetch(
        f"{_SELECT_MESSAGES} WHERE recipient = ? AND state = 2"
        " ORDER BY settled_at_ms DESC, seq DESC LIMIT ?",
        (recipient, limit),
        conn,
    )


def list_dead_refs(recipient: str, conn: sqlite3.Connection) -> list[DeadRef]:
    """The app's dead letters without bodies, oldest first (the dead index)."""
    return [
        DeadRef(*row)
        for row in conn.execute(
            "SELECT settled_at_ms, idem, name FROM messages WHERE recipient = ? AND state = 2"
            " ORDER BY settled_at_ms, seq",
            (recipient,),
        )
    ]


def backlog(conn: sqlite3.Connection) -> dict[str, int]:
    """Pending messages per recipient (a scan of the ready index)."""
    counted = conn.execute(
        "SELECT recipient, count(*) FROM messages WHERE state = 0 GROUP BY recipient"
    ).fetchall()
    return {str(recipient): int(count) for recipient, count in counted}


def last_blocks(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    rows = conn.execute("SELECT recipient, name, last_block FROM partitions").fetchall()
    return [(str(r), str(n), int(b)) for r, n, b in rows]


def recent_dedupe_keys(
    limit: int, conn: sqlite3.Connection
) -> list[tuple[str, str, str, str, int, int]]:
    """``(sender, recipient, key, idem, block, created_at)`` of the newest
    ``limit`` keyed messages, oldest first (the partial index keeps it cheap)."""
    rows = conn.execute(
        "SELECT sender, recipient, dedupe_key, idem, block, created_at_ms FROM messages"
        " WHERE dedupe_key IS NOT NULL ORDER BY created_at_ms DESC, seq DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [(str(a), str(b), str(c), str(d), int(e), int(f)) for a, b, c, d, e, f in reversed(rows)]


_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (seq, idem, recipient, name, block, sender, created_at_ms, state,"
    " attempts, visible_at_ms, expires_at_ms, settled_at_ms, dead_reason, dedupe_key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_BODY: Final = (
    "INSERT INTO bodies (id, payload, metadata, payload_metadata) VALUES (?, ?, ?, ?)"
)


def _row(seq: int, m: StoredMessage) -> tuple[object, ...]:
    return (
        seq,
        m.idem,
        m.recipient,
        m.name,
        m.block,
        m.sender,
        m.created_at_ms,
        int(m.state),
        m.attempts,
        m.visible_at_ms,
        m.expires_at_ms,
        m.settled_at_ms,
        m.dead_reason,
        m.dedupe_key,
    )


def _body(seq: int, m: StoredMessage) -> tuple[object, ...]:
    return (seq, m.payload, m.metadata, m.payload_metadata)


def _insert_one(conn: sqlite3.Connection, seq: int, m: StoredMessage) -> None:
    conn.execute(_INSERT_MESSAGE, _row(seq, m))
    conn.execute(_INSERT_BODY, _body(seq, m))


def _row_error(m: StoredMessage, exc: Exception) -> str:
    if isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorname == (
        "SQLITE_CONSTRAINT_UNIQUE"
    ):
        return f"message idem {m.idem!r} is already stored"
    return f"message {m.idem!r} cannot be stored: {exc}"


def insert_rows(rows: Sequence[StoredMessage], conn: sqlite3.Connection) -> list[str | None]:
    """Insert ``rows``; per row ``None`` or why it was not stored.

    The batch goes in at once; if any row fails, each is tried alone in its
    own savepoint so the others still land.
    """
    errors: list[str | None] = [None] * len(rows)
    # The writer's transaction holds the write lock: nobody else takes a seq.
    (top,) = conn.execute("SELECT max(seq) FROM messages").fetchone()
    first = (top or 0) + 1
    conn.execute("SAVEPOINT batch")
    try:
        # One call per table for the whole batch: the writer thread gives up
        # and takes back the GIL once, not once per row.
        conn.executemany(_INSERT_MESSAGE, [_row(first + i, m) for i, m in enumerate(rows)])
        conn.executemany(_INSERT_BODY, [_body(first + i, m) for i, m in enumerate(rows)])
    except (sqlite3.Error, OverflowError) as exc:
        roll_back_to("batch", exc, conn)
        for index, m in enumerate(rows):
            conn.execute("SAVEPOINT one")
            try:
                _insert_one(conn, first + index, m)
            except (sqlite3.Error, OverflowError) as exc:
                roll_back_to("one", exc, conn)
                errors[index] = _row_error(m, exc)
            conn.execute("RELEASE one")
    conn.execute("RELEASE batch")
    stored: dict[tuple[str, str], int] = {}
    for m, error in zip(rows, errors, strict=True):
        if error is None:
            stored[m.partition] = max(m.block, stored.get(m.partition, m.block))
    # Same transaction as the rows: last_block can never lag what is stored.
    note_last_blocks(stored, conn)
    return errors


def roll_back_to(savepoint: str, exc: BaseException, conn: sqlite3.Connection) -> None:
    """Undo the work since ``savepoint`` after ``exc``; raises ``exc`` itself
    when SQLite already rolled the whole transaction back (a full disk, an
    I/O error): then the batch is lost, and ``exc`` says why."""
    if not conn.in_transaction:
        raise exc
    conn.execute(f"ROLLBACK TO {savepoint}")


def note_last_blocks(blocks: dict[tuple[str, str], int], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "INSERT INTO partitions (recipient, name, last_block) VALUES (?, ?, ?)"
        " ON CONFLICT (recipient, name) DO UPDATE"
        " SET last_block = max(last_block, excluded.last_block)",
        [(recipient, name, block) for (recipient, name), block in blocks.items()],
    )


def settle_many(
    items: Sequence[tuple[str, MessageState, str | None]], now_ms: int, conn: sqlite3.Connection
) -> list[bool]:
    """Settle pending messages; per item whether it was pending (an idem
    listed twice counts once). Items sharing a state and reason (a batch of
    acks) go in one statement per chunk, which names what it changed."""
    groups: dict[tuple[int, str | None], list[str]] = {}
    for idem, state, reason in items:
        groups.setdefault((int(state), reason), []).append(idem)
    changed: set[str] = set()
    for (code, reason), idems in groups.items():
        for start in range(0, len(idems), _IN_CHUNK):
            chunk = idems[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            changed.update(
                row[0]
                for row in conn.execute(
                    "UPDATE messages SET state = ?, settled_at_ms = ?, dead_reason = ?"
                    f" WHERE {_SETTLE_GUARD[code]} AND idem IN ({marks}) RETURNING idem",
                    (code, now_ms, reason, *chunk),
                )
            )
    outcomes: list[bool] = []
    for idem, _, _ in items:
        outcomes.append(idem in changed)
        changed.discard(idem)
    return outcomes


def reschedule_many(
    items: Sequence[tuple[str, int, int | None]], conn: sqlite3.Connection
) -> list[bool]:
    return [
        conn.execute(
            "UPDATE messages SET visible_at_ms = ?, attempts = coalesce(?, attempts)"
            f" WHERE idem = ? AND {_RESCHEDULE_GUARD}",
            (visible_at, attempts, idem),
        ).rowcount
        == 1
        for idem, visible_at, attempts in items
    ]


def record_attempts(updates: Sequence[tuple[str, int]], conn: sqlite3.Connection) -> None:
    conn.executemany(
        "UPDATE messages SET attempts = ? WHERE idem = ?",
        [(attempts, idem) for idem, attempts in updates],
    )


def redrive(idem: str, now_ms: int, conn: sqlite3.Connection) -> StoredMessage | None:
    outcome = lifecycle.redriven(now_ms)
    changed = conn.execute(
        "UPDATE messages SET state = ?, attempts = ?, visible_at_ms = ?,"
        f" settled_at_ms = NULL, dead_reason = NULL WHERE idem = ? AND {_REDRIVE_GUARD}",
        (int(MessageState.PENDING), outcome.attempts, now_ms, idem),
    ).rowcount
    if changed != 1:
        return None
    # For an engine in another process, which cannot see this change otherwise.
    conn.execute("INSERT OR IGNORE INTO redriven (idem) VALUES (?)", (idem,))
    return get(idem, conn)


def any_redriven(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM redriven LIMIT 1").fetchone() is not None


def take_redriven(limit: int, conn: sqlite3.Connection) -> list[StoredMessage]:
    """Up to ``limit`` redriven messages still pending, forgotten as redriven."""
    idems = [idem for (idem,) in conn.execute("SELECT idem FROM redriven LIMIT ?", (limit,))]
    conn.executemany("DELETE FROM redriven WHERE idem = ?", [(idem,) for idem in idems])
    found = load(idems, conn)
    pending = MessageState.PENDING
    return [m for idem in idems if (m := found.get(idem)) is not None and m.state is pending]


def prune_chunk(settled_before_ms: int, limit: int, conn: sqlite3.Connection) -> int:
    # A literal guard ("state != 0"): a parameter would not match the
    # partial index messages_settled.
    removed = conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages"
        f" WHERE {_PRUNE_GUARD} AND settled_at_ms < ? LIMIT ?) RETURNING seq",
        (settled_before_ms, limit),
    ).fetchall()
    conn.executemany("DELETE FROM bodies WHERE id = ?", removed)
    return len(removed)
