"""Who is connected, and may be: sessions opened, taken over, kept alive and
ended, within each app's client limit and request rate.

Clock-free like the rest of the core: the time comes from the
:class:`~ensync.server.core.model.Clock` it is handed. A session lives in
the :class:`~ensync.server.core.dispatch.Dispatcher`; on a store several
nodes share (a :class:`~ensync.server.store.base.SessionRegistry`) it is
registered too, so that another node can take it over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.names import allowed
from ensync.server.config import EngineConfig
from ensync.server.core.apps import AppRegistry
from ensync.server.core.dispatch import Dispatcher
from ensync.server.core.errors import ServiceError
from ensync.server.core.health import StoreHealth
from ensync.server.core.ids import client_tag, new_client_hash, new_client_id
from ensync.server.core.limits import RateLimiter
from ensync.server.core.model import Clock, EngineStats, SessionInfo, SessionRouter
from ensync.server.core.refusals import Refusals
from ensync.server.core.sessions import Session
from ensync.server.store.base import (
    AppRecord,
    SessionRecord,
    SessionRegistry,
    Store,
    StoreError,
)

__all__ = ["Admission"]

log = logging.getLogger(__name__)

# A client id no node registered is not looked up again for this long.
_UNKNOWN_ID_MS = 5_000
_UNKNOWN_IDS_KEPT = 10_000


class Admission:
    """The engine's sessions.

    Args:
        store: where apps (and, shared by nodes, sessions) live.
        config: tunables (client limit, request rate, session timeout).
        clock: the time (epoch ms).
        dispatcher: the delivery state machine that holds the sessions.
        stats: counters shared with ``/metrics``.
        refusals: counts and logs refusals.
        store_health: where store failures are noted.
    """

    def __init__(
        self,
        store: Store,
        config: EngineConfig,
        clock: Clock,
        dispatcher: Dispatcher,
        stats: EngineStats,
        refusals: Refusals,
        store_health: StoreHealth,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.dispatcher = dispatcher
        self.stats = stats
        self._refusals = refusals
        self.store_health = store_health
        # Told when this process changed an app, so the runtime applies it
        # at once instead of at its next periodic read.
        self.on_apps_changed: Callable[[], None] | None = None
        self.apps = AppRegistry(
            store, clock.now_ms, config.app_cache_ms, on_change=self._apps_changed_here
        )
        self._limiter = RateLimiter(config.rate_limit_per_app)
        # Client ids found in no registry lately, with when to ask again.
        self._unknown_ids: dict[str, int] = {}

    def configure(self, config: EngineConfig) -> None:
        """Use new tunables from the next operation on."""
        self.config = config
        self._limiter = RateLimiter(config.rate_limit_per_app)

    async def connect(self, app_key: str, router: SessionRouter) -> SessionInfo:
        """Authenticate an app key and open a session routed through ``router``."""
        try:
            app = await self.apps.authenticate(app_key)
        except ServiceError as exc:
            self.stats.rejected += 1
            self._refusals.note("app key", f"connect: {exc.message}")
            raise
        except StoreError as exc:
            raise self.store_health.failed("connect", exc) from exc
        now = self.clock.now_ms()
        session = self._admit(app, new_client_id(), new_client_hash(), router, now)
        log.info("client %s of app %s connected", client_tag(session.client_id), app.name)
        await self.register_sessions([session])
        return SessionInfo(session.client_id, session.client_hash, app.app_id, app.name)

    def _admit(
        self,
        app: AppRecord,
        client_id: str,
        client_hash: str,
        router: SessionRouter,
        connected_at_ms: int,
    ) -> Session:
        """A new session of ``app``, within the app's client limit."""
        clients = sum(1 for s in self.dispatcher.sessions.values() if s.app.name == app.name)
        if clients >= self.config.max_clients_per_app:
            raise self._refusals.over(
                "clients_per_app",
                f"app {app.name!r} already has {clients} connected clients, "
                f"the limit is {self.config.max_clients_per_app}",
            )
        now = self.clock.now_ms()
        session = Session(
            client_id=client_id,
            client_hash=client_hash,
            app=app,
            router=router,
            connected_at_ms=connected_at_ms,
            last_seen_ms=now,
        )
        self.dispatcher.add_session(session, now)
        self.stats.connects += 1
        return session

    def registry_ttl_ms(self) -> int:
        """How long a registered session stays valid on other nodes unless renewed."""
        return max(60_000, 2 * self.config.session_timeout_ms)

    async def register_sessions(self, sessions: Sequence[Session]) -> None:
        """Let every node take these sessions over (a store shared by several
        nodes); the runtime renews the active ones well within the TTL."""
        if not isinstance(self.store, SessionRegistry):
            return
        records = [
            (
                session.client_id,
                SessionRecord(
                    session.app.app_id,
                    session.app.key_hash,
                    session.client_hash,
                    session.connected_at_ms,
                ),
            )
            for session in sessions
        ]
        if not records:
            return
        try:
            await self.store.register_sessions(records, self.registry_ttl_ms())
        except StoreError as exc:
            # They work here; only another node could not take them over.
            log.warning("could not register %d sessions for other nodes: %s", len(records), exc)

    async def adopt(self, client_id: str, router: SessionRouter) -> bool:
        """Take over a session another engine node opened (the client was moved
        here by a load balancer): ``True`` if ``client_id`` is now a session of
        this engine, routed through ``router``.

        Only with a store shared by several nodes (a `SessionRegistry`), for
        an app that is still registered under the same key.
        """
        if client_id in self.dispatcher.sessions:
            return True
        if not isinstance(self.store, SessionRegistry) or not client_id:
            return False
        now = self.clock.now_ms()
        if self._unknown_ids.get(client_id, 0) > now:
            return False  # asked lately: a bogus id must not cost a lookup per call
        try:
            record = await self.store.find_session(client_id)
            app = await self.apps.active_app(record.app_id) if record is not None else None
        except StoreError as exc:
            log.warning("could not look up client %s: %s", client_tag(client_id), exc)
            return False
        if record is None or app is None or app.key_hash != record.key_hash:
            if len(self._unknown_ids) >= _UNKNOWN_IDS_KEPT:
                self._unknown_ids.clear()
            self._unknown_ids[client_id] = now + _UNKNOWN_ID_MS
            return False
        if client_id in self.dispatcher.sessions:  # adopted meanwhile
            return True
        try:
            self._admit(app, client_id, record.client_hash, router, record.connected_at_ms)
        except ServiceError:
            return False  # the app has as many clients here as it may
        log.info("client %s of app %s moved here", client_tag(client_id), app.name)
        return True

    def heartbeat(self, client_id: str) -> bool:
        """Keep a session alive; ``False`` if the client id is unknown."""
        session = self.dispatcher.sessions.get(client_id)
        if session is None:
            return False
        session.last_seen_ms = self.clock.now_ms()
        return True

    def session(self, client_id: str) -> Session:
        """The live session of ``client_id``, charged one request against its app's
        rate; raises UNAUTHENTICATED (unknown session) or LIMIT_EXCEEDED."""
        session = self.dispatcher.sessions.get(client_id)
        if session is None:
            raise ServiceError.unauthenticated(f"{UNKNOWN_SESSION}: connect first")
        now = self.clock.now_ms()
        session.last_seen_ms = now
        if not self._limiter.take(session.app.name, now):
            raise self._refusals.over(
                "request_rate",
                f"app {session.app.name!r} exceeded its rate of "
                f"{self.config.rate_limit_per_app} requests/s; slow down",
            )
        return session

    def disconnect(self, client_id: str) -> None:
        """The client is gone: drop its session and requeue what it held."""
        session = self.dispatcher.sessions.get(client_id)
        if session is not None:
            self.end_session(session, close_router=False)

    def end_session(self, session: Session, *, close_router: bool = True) -> None:
        if session.closed:
            return
        self.dispatcher.end_session(session)
        if close_router:
            session.router.close()
        log.info("client %s disconnected", client_tag(session.client_id))

    def routes_changed(self, client_id: str) -> None:
        """A transport opened or closed an outbox of this client."""
        session = self.dispatcher.sessions.get(client_id)
        if session is not None:
            self.dispatcher.routes_changed(session)

    def apps_changed(self, apps: Sequence[AppRecord]) -> None:
        """The registered apps as just read: end the sessions of revoked or
        re-keyed apps and apply new subscribe rules."""
        by_name = {app.name: app for app in apps}
        for session in list(self.dispatcher.sessions.values()):
            current = by_name.get(session.app.name)
            if current is None or current.revoked or current.key_hash != session.app.key_hash:
                log.info(
                    "ending client %s: app %s was revoked or got a new key",
                    client_tag(session.client_id),
                    session.app.name,
                )
                self.end_session(session)
                continue
            if current != session.app:
                session.app = current
                for name in list(session.subscriptions):
                    if not allowed(current.subscribe_rules, name):
                        self.dispatcher.unsubscribe(session, name)

    def _apps_changed_here(self) -> None:
        if self.on_apps_changed is not None:
            self.on_apps_changed()
