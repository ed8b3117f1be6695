"""The embedded, durable backend: one SQLite file. See :mod:`.store`."""

from __future__ import annotations

from .runner import SqliteStoreStatistics
from .schema import SCHEMA_VERSION
from .store import SqliteStore

__all__ = ["SCHEMA_VERSION", "SqliteStore", "SqliteStoreStatistics"]
