"""The app registry: authentication, recipient lookup, and app administration."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ensync.crypto import generate_keypair
from ensync.protocol.names import validate_pattern
from ensync.server.core.errors import ServiceError
from ensync.server.core.ids import hash_app_key, new_app_key
from ensync.server.store.base import AppRecord, AppStore

__all__ = ["AppRegistry", "NewApp", "validate_app_name"]

_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def validate_app_name(name: str) -> str:
    """App names: 1-64 of ``[A-Za-z0-9_.-]``, starting with a letter or digit."""
    if _APP_NAME.fullmatch(name) is None:
        raise ValueError(
            f"invalid app name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class NewApp:
    """A freshly registered app. ``app_key`` and ``secret_key`` exist only here."""

    name: str
    app_key: str
    app_id: str
    secret_key: str


class AppRegistry:
    """Looks apps up in the store, with a short cache for the publish hot path.

    Only positive answers are cached, and briefly (``cache_ms``): an app
    created by ``ensync app create`` while the engine runs is found at once,
    and a revoked one stops receiving within the cache time.
    """

    def __init__(
        self,
        store: AppStore,
        now_ms: Callable[[], int],
        cache_ms: int,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._now_ms = now_ms
        self._cache_ms = cache_ms
        self._by_id: dict[str, tuple[AppRecord, int]] = {}
        # Called after this registry changed an app (the engine re-reads apps
        # at once instead of at its next refresh).
        self._on_change = on_change

    async def authenticate(self, app_key: str) -> AppRecord:
        """The active app owning ``app_key``; raises UNAUTHENTICATED otherwise."""
        if not app_key:
            raise ServiceError.unauthenticated("app key is empty")
        digest = hash_app_key(app_key)
        app = await self._store.get_app_by_key_hash(digest)
        # The lookup is by digest; comparing again in constant time keeps the
        # check honest even if a backend matched loosely.
        if app is None or not hmac.compare_digest(app.key_hash, digest) or app.revoked:
            raise ServiceError.unauthenticated("app key is not valid (unknown or revoked)")
        self._by_id[app.app_id] = (app, self._now_ms() + self._cache_ms)
        return app

    async def active_app(self, app_id: str) -> AppRecord | None:
        """The registered, unrevoked app with this id, or ``None``."""
        cached = self._by_id.get(app_id)
        if cached is not None and cached[1] > self._now_ms():
            return cached[0]
        app = await self._store.get_app(app_id)
        if app is None or app.revoked:
            self._by_id.pop(app_id, None)
            return None
        self._by_id[app_id] = (app, self._now_ms() + self._cache_ms)
        return app

    async def create(self, name: str) -> NewApp:
        """Register an app with a fresh key pair and app key."""
        validate_app_name(name)
        keys = generate_keypair()
        app_key = new_app_key()
        await self._store.create_app(
            AppRecord(
                name=name,
                app_id=keys.app_id,
                key_hash=hash_app_key(app_key),
                created_at_ms=self._now_ms(),
            )
        )
        return NewApp(name=name, app_key=app_key, app_id=keys.app_id, secret_key=keys.secret_key)

    async def revoke(self, name: str) -> AppRecord:
        """Revoke an app's key; raises ``LookupError`` if there is no such app."""
        return await self._change(name, revoked=True)

    async def rotate_key(self, name: str) -> str:
        """Give an app a new app key (returned, shown once); the old one stops working."""
        app_key = new_app_key()
        await self._change(name, key_hash=hash_app_key(app_key), revoked=False)
        return app_key

    async def allow(
        self,
        name: str,
        *,
        publish: tuple[str, ...] | None = None,
        subscribe: tuple[str, ...] | None = None,
    ) -> AppRecord:
        """Set which names an app may publish and subscribe to (patterns, see
        :func:`ensync.protocol.names.validate_pattern`); ``None`` keeps a list."""
        changes: dict[str, tuple[str, ...]] = {}
        for field_name, patterns in (("publish_rules", publish), ("subscribe_rules", subscribe)):
            if patterns is not None:
                changes[field_name] = tuple(validate_pattern(p) for p in patterns)
        return await self._change(name, **changes)

    async def _change(self, name: str, **changes: Any) -> AppRecord:
        app = await self._store.get_app_by_name(name)
        if app is None:
            raise LookupError(f"no app named {name!r}")
        changed = replace(app, **changes)
        await self._store.update_app(changed)
        self._by_id.pop(app.app_id, None)
        if self._on_change is not None:
            self._on_change()
        return changed
