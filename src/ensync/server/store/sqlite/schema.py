"""The sqlite schema, its version and the migrations between versions.

``PRAGMA user_version`` holds the version. A new file gets the current
schema; an older one is migrated in one transaction when it is opened; a
newer one is refused (this ensync would not know what it holds).

History:

1. the first schema.
2. the schedule index covers the partition: ``messages_due (recipient, name,
   state, visible_at_ms)`` replaces ``messages_scheduled (state,
   visible_at_ms)``, so a claim finds the deferred messages of its own
   partition that came due, without loading every deferral at start.
3. the indexes a message moves through are partial: ``messages_ready``
   and ``messages_due`` hold pending messages only, ``messages_dead`` dead
   ones only. An ack then removes two index entries and adds one (it moved
   four entries, each a delete and an insert), and an insert skips the
   dead-letter index. Queries name the state as a literal so that SQLite
   can use them.
4. message bodies (payload, metadata, payload metadata) move to their own
   table, ``bodies``, keyed by the message's ``seq`` (an explicit integer
   key, which ``VACUUM`` keeps). An ack or a deferral then rewrites a short
   row instead of one holding the whole envelope: measured, a settlement
   costs under half the CPU and writes a fraction of the WAL pages.
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
from typing import Final

from ensync.server.store.base import StoreError

__all__ = ["SCHEMA_VERSION", "prepare"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 5


def _messages_table(name: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {name} (
        seq INTEGER PRIMARY KEY,
        idem TEXT NOT NULL UNIQUE,
        recipient TEXT NOT NULL,
        name TEXT NOT NULL,
        block INTEGER NOT NULL,
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
    """


# What a delivery reads and nothing else does; bodies.id is messages.seq.
_BODIES: Final = """
    CREATE TABLE IF NOT EXISTS bodies (
        id INTEGER PRIMARY KEY,
        payload TEXT NOT NULL,
        metadata TEXT NOT NULL,
        payload_metadata TEXT
    )
    """

# seq breaks ties, so every index below also orders by insertion.
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS messages_settled ON messages (settled_at_ms) WHERE state != 0",
    "CREATE INDEX IF NOT EXISTS messages_deduped ON messages (created_at_ms)"
    " WHERE dedupe_key IS NOT NULL",
)

# Dead letters returned to PENDING by another process (``ensync dlq
# redrive`` beside a running engine), until the engine picks them up.
_REDRIVEN: Final = "CREATE TABLE IF NOT EXISTS redriven (idem TEXT PRIMARY KEY) WITHOUT ROWID"

_TABLES: Final = (
    _messages_table("messages"),
    _REDRIVEN,
    _BODIES,
    *_INDEXES,
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

# The partial indexes of version 3 (the literals 0 and 2 are PENDING and DEAD).
_PARTIAL_INDEXES: Final = (
    "CREATE INDEX messages_ready ON messages (recipient, name, block) WHERE state = 0",
    "CREATE INDEX messages_due ON messages (recipient, name, visible_at_ms) WHERE state = 0",
    "CREATE INDEX messages_dead ON messages (recipient, settled_at_ms) WHERE state = 2",
)

# Statements taking a file from version N to N + 1.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        "DROP INDEX IF EXISTS messages_scheduled",
        "CREATE INDEX IF NOT EXISTS messages_due"
        " ON messages (recipient, name, state, visible_at_ms)",
    ),
    2: (
        "DROP INDEX IF EXISTS messages_ready",
        "DROP INDEX IF EXISTS messages_due",
        "DROP INDEX IF EXISTS messages_dead",
        *_PARTIAL_INDEXES,
    ),
    # The table is rebuilt (SQLite's way to change one): the old rowid
    # becomes seq, and the bodies keep it.
    3: (
        _BODIES,
        "INSERT INTO bodies (id, payload, metadata, payload_metadata)"
        " SELECT rowid, payload, metadata, payload_metadata FROM messages",
        _messages_table("messages_v4"),
        "INSERT INTO messages_v4 (seq, idem, recipient, name, block, sender, created_at_ms,"
        " state, attempts, visible_at_ms, expires_at_ms, settled_at_ms, dead_reason, dedupe_key)"
        " SELECT rowid, idem, recipient, name, block, sender, created_at_ms, state, attempts,"
        " visible_at_ms, expires_at_ms, settled_at_ms, dead_reason, dedupe_key FROM messages",
        "DROP TABLE messages",
        "ALTER TABLE messages_v4 RENAME TO messages",
        *_INDEXES,
        *_PARTIAL_INDEXES,
    ),
    4: (_REDRIVEN,),
}


def _version(conn: sqlite3.Connection) -> int:
    (value,) = conn.execute("PRAGMA user_version").fetchone()
    return int(value)


def prepare(conn: sqlite3.Connection, path: pathlib.Path) -> None:
    """Create the schema in a new file, or migrate an older one."""
    if _version(conn) == SCHEMA_VERSION:
        return
    # Another process may be doing the same right now: decide inside the lock.
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _version(conn)
        if found == 0:
            for statement in (*_TABLES, *_PARTIAL_INDEXES):
                conn.execute(statement)
        elif found > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {found}; this ensync supports up to {SCHEMA_VERSION}"
            )
        else:
            logger.info(
                "migrating %s from schema version %d to %d (this may take a while on a big file)",
                path,
                found,
                SCHEMA_VERSION,
            )
            for version in range(found, SCHEMA_VERSION):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
            logger.info("migrated %s from schema version %d to %d", path, found, SCHEMA_VERSION)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
