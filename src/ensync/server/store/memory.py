"""A :class:`~ensync.server.store.base.Store` held in this process's memory.

Used for tests and for trying ensync without a disk: everything dies with
the process. Messages, claims and numbering are
:class:`~ensync.server.store.local.LocalMessages` without a durable table;
apps are three dicts. Every call runs without awaiting anything but its own
bookkeeping, so each is atomic with respect to other coroutines.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ensync.server.store.base import AppExistsError, AppRecord, StoreError
from ensync.server.store.local import LocalMessages

__all__ = ["MemoryStore", "MemoryStoreStatistics"]


@dataclass(frozen=True, slots=True)
class MemoryStoreStatistics:
    """Counters of a :class:`MemoryStore`.

    Attributes:
        writes: app writes applied.
        messages: messages held, whatever their state.
        apps: registered apps.
        leases: messages leased to a claimer right now.
        windowed: message references read ahead of delivery.
    """

    writes: int
    messages: int
    apps: int
    leases: int
    windowed: int


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class MemoryStore(LocalMessages):
    """A volatile store: everything lives in this process and dies with it.

    Call :meth:`open` before use and :meth:`close` when done (or use
    ``async with``). Calls before ``open`` or after ``close`` raise
    :class:`StoreError`.
    """

    def __init__(self, *, dedupe_max_keys: int = 100_000) -> None:
        super().__init__(None, dedupe_max_keys=dedupe_max_keys)
        self._state = _State.NEW
        self._writes = 0
        self._apps: dict[str, AppRecord] = {}
        self._app_names_by_id: dict[str, str] = {}
        self._app_names_by_key: dict[bytes, str] = {}

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Make the store usable. Raises :class:`StoreError` if already opened."""
        if self._state is not _State.NEW:
            raise StoreError(f"memory store cannot be opened twice (it is {self._state.value})")
        self._state = _State.OPEN

    async def close(self) -> None:
        """Drop everything held. Idempotent."""
        self._state = _State.CLOSED
        self._memory.clear()
        self._apps.clear()
        self._app_names_by_id.clear()
        self._app_names_by_key.clear()

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

    def statistics(self) -> MemoryStoreStatistics:
        """Counters for tests and metrics; never raises."""
        leases, windowed = self.delivery_statistics()
        return MemoryStoreStatistics(
            writes=self._writes,
            messages=len(self._memory),
            apps=len(self._apps),
            leases=leases,
            windowed=windowed,
        )

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise StoreError(f"memory store is {self._state.value}, not open")

    # --- apps ----------------------------------------------------------------

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; :class:`AppExistsError` on a duplicate name, id or key hash."""
        self._check_open()
        self._writes += 1
        if app.name in self._apps:
            raise AppExistsError(f"an app named {app.name!r} already exists")
        self._check_unique_id_and_key(app, replacing=None)
        self._index_app(app)

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        self._check_open()
        name = self._app_names_by_key.get(key_hash)
        return None if name is None else self._apps[name]

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        self._check_open()
        name = self._app_names_by_id.get(app_id)
        return None if name is None else self._apps[name]

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        self._check_open()
        return self._apps.get(name)

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        self._check_open()
        return [self._apps[name] for name in sorted(self._apps)]

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name``.

        Raises:
            LookupError: no app has that name.
            AppExistsError: the new app id or key hash belongs to another app.
        """
        self._check_open()
        self._writes += 1
        old = self._apps.get(app.name)
        if old is None:
            raise LookupError(f"no app named {app.name!r}")
        self._check_unique_id_and_key(app, replacing=old)
        del self._app_names_by_id[old.app_id]
        del self._app_names_by_key[old.key_hash]
        self._index_app(app)

    def _check_unique_id_and_key(self, app: AppRecord, replacing: AppRecord | None) -> None:
        owner = self._app_names_by_id.get(app.app_id)
        if owner is not None and (replacing is None or owner != replacing.name):
            raise AppExistsError(f"app id {app.app_id!r} is already registered to {owner!r}")
        owner = self._app_names_by_key.get(app.key_hash)
        if owner is not None and (replacing is None or owner != replacing.name):
            raise AppExistsError(f"that key hash is already registered to {owner!r}")

    def _index_app(self, app: AppRecord) -> None:
        self._apps[app.name] = app
        self._app_names_by_id[app.app_id] = app.name
        self._app_names_by_key[app.key_hash] = app.name
