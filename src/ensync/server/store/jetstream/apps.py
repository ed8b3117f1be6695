"""Apps in JetStream: one record per app (``ns.app.a.<name>``) and a version
subject every write expects, so concurrent writes from several nodes or
``ensync app`` commands are serialized (a write that conflicts is retried
after a random pause); reads are cached per version.

Client sessions every node may take over live beside them
(``ns.app.s.<client id>``, expiring unless renewed)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import orjson

from ensync.server.store.base import AppExistsError, AppRecord, SessionRecord, StoreError
from ensync.server.store.jetstream.api import MAX_BATCH, Batch, ConflictError, JetStreamApi, Out
from ensync.server.store.jetstream.records import Names, app_from_json, app_to_json, is_gone

__all__ = ["Apps", "conflict_pause_s"]

# An app write that conflicts (another node or command wrote an app
# meanwhile) is retried this many times, each after a pause drawn from a
# window that doubles from the first to the cap.
RETRIES = 32
CONFLICT_PAUSE_FIRST_S = 0.002
CONFLICT_PAUSE_CAP_S = 0.1
# Messages per read of a stream.
_PAGE = 1000


def conflict_pause_s(attempt: int) -> float:
    """How long to wait before retrying a write that conflicted for the
    ``attempt``-th time (0 for the first): anything up to a window that
    doubles each time, capped. Random, so that two writers that collided do
    not retry in step; growing, so that a write another server is still
    replicating (JetStream's 10163) has landed when this one comes back."""
    window = min(CONFLICT_PAUSE_CAP_S, CONFLICT_PAUSE_FIRST_S * 2 ** max(attempt, 0))
    return random.uniform(0, window)


class Apps:
    """The :class:`~ensync.server.store.base.AppStore` half of the backend
    (and the client sessions every node may take over)."""

    names: Names
    _apps: dict[str, AppRecord]
    _apps_version: int

    def _check_open(self) -> JetStreamApi:  # the store's
        raise NotImplementedError

    async def _read_all(self, stream: str, subject: str) -> Batch:
        api = self._check_open()
        out = Batch()
        seq = 1
        while True:
            page = await api.get_after(stream, subject, seq, _PAGE)
            out += page
            if len(page) < _PAGE:
                out.upto = page.upto
                return out
            seq = page[-1].seq + 1

    async def _read_apps(self, *, force: bool = False) -> dict[str, AppRecord]:
        api = self._check_open()
        version = await api.get_one(self.names.apps, {"last_by_subj": self.names.apps_version})
        seq = version.seq if version is not None else 0
        if force or seq != self._apps_version:
            records = await self._read_all(self.names.apps, self.names.apps_all)
            self._apps = {app.name: app for app in (app_from_json(got.json()) for got in records)}
            self._apps_version = seq
        return self._apps

    async def _write_app(self, app: AppRecord, *, create: bool) -> None:
        api = self._check_open()
        for attempt in range(RETRIES):
            await self._read_apps(force=True)
            old = self._apps.get(app.name)
            if create and old is not None:
                raise AppExistsError(f"an app named {app.name!r} already exists")
            if not create and old is None:
                raise LookupError(f"no app named {app.name!r}")
            for other in self._apps.values():
                if other.name == app.name:
                    continue
                if other.app_id == app.app_id:
                    raise AppExistsError(
                        f"app id {app.app_id!r} is already registered to {other.name!r}"
                    )
                if other.key_hash == app.key_hash:
                    raise AppExistsError(f"that key hash is already registered to {other.name!r}")
            current = await api.get_one(self.names.apps, {"last_by_subj": self.names.app(app.name)})
            try:
                await api.atomic(
                    [
                        Out(
                            self.names.app(app.name),
                            app_to_json(app),
                            current.seq if current else 0,
                        ),
                        Out(self.names.apps_version, b"", max(self._apps_version, 0)),
                    ]
                )
            except ConflictError:
                await asyncio.sleep(conflict_pause_s(attempt))
                continue
            self._apps[app.name] = app
            return
        raise StoreError("apps kept changing while writing; try again")

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; :class:`AppExistsError` on a duplicate name, id or key hash."""
        await self._write_app(app, create=True)

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name`` (``LookupError`` if none)."""
        await self._write_app(app, create=False)

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        apps = await self._read_apps()
        return next((a for a in apps.values() if a.key_hash == key_hash), None)

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        apps = await self._read_apps()
        return next((a for a in apps.values() if a.app_id == app_id), None)

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        return (await self._read_apps()).get(name)

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        apps = await self._read_apps()
        return [apps[name] for name in sorted(apps)]

    async def register_sessions(
        self, sessions: Sequence[tuple[str, SessionRecord]], ttl_ms: int
    ) -> None:
        """Remember sessions for ``ttl_ms`` so that any node can take them over
        (one atomic batch per thousand)."""
        api = self._check_open()
        ttl_s = max(1, -(-ttl_ms // 1000))
        outs = [
            Out(
                self.names.session(client_id),
                orjson.dumps(
                    {
                        "app_id": record.app_id,
                        "key_hash": record.key_hash.hex(),
                        "client_hash": record.client_hash,
                        "at": record.connected_at_ms,
                    }
                ),
                ttl_s=ttl_s,
            )
            for client_id, record in sessions
        ]
        for start in range(0, len(outs), MAX_BATCH):
            await api.atomic(outs[start : start + MAX_BATCH])

    async def find_session(self, client_id: str) -> SessionRecord | None:
        """The session registered with this client id, if any node made it."""
        api = self._check_open()
        got = await api.get_one(self.names.apps, {"last_by_subj": self.names.session(client_id)})
        if got is None:
            return None
        record = got.json()
        if is_gone(record):
            return None
        return SessionRecord(
            record["app_id"], bytes.fromhex(record["key_hash"]), record["client_hash"], record["at"]
        )
