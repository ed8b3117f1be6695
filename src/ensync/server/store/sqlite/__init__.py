"""The embedded, durable backend: one SQLite file. See :mod:`.store`."""

from __future__ import annotations

from ensync.server.store.sqlite.runner import SqliteStoreStatistics
from ensync.server.store.sqlite.schema import SCHEMA_VERSION
from ensync.server.store.sqlite.store import SqliteStore

__all__ = ["SCHEMA_VERSION", "SqliteStore", "SqliteStoreStatistics"]
