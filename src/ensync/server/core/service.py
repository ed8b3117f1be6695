"""The operations both transports call, over a store and the dispatcher.

Transport-neutral and clock-free: the time comes from the :class:`Clock`
the runtime hands in, and nothing here creates a task or a timer. Work that
must continue in the background (claims, releases) is left in the
:class:`~ensync.server.core.dispatch.Dispatcher` for the runtime to run.
Failures are :class:`ServiceError`.

Delivery contract (DESIGN.md §2), in the terms of this module:

* a publish stores one message per recipient (``persist: false`` ones in
  memory only) and is answered after the commit;
* each message goes to one eligible subscriber of the recipient app at a
  time, round robin, first deliveries in block order;
* a delivery is *leased* until acked, deferred or discarded; a lease that
  ends otherwise (deadline, disconnect, pause, unsubscribe) puts the message
  back, and after ``max_deliveries`` leases it is dead-lettered.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.names import allowed
from ensync.server.config import EngineConfig
from ensync.server.core import validation
from ensync.server.core.apps import AppRegistry
from ensync.server.core.dispatch import Dispatcher
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.health import StoreHealth
from ensync.server.core.ids import client_tag, new_client_hash, new_client_id, new_idem
from ensync.server.core.limits import RateLimiter
from ensync.server.core.model import (
    Clock,
    Delivery,
    EngineStats,
    ReplayResult,
    SessionInfo,
    SessionRouter,
)
from ensync.server.core.sessions import Session
from ensync.server.core.throttled import ThrottledLog
from ensync.server.store.base import (
    AppendDone,
    Appended,
    AppendsSoon,
    AppRecord,
    DeliveryPolicy,
    MessageState,
    NewMessage,
    Release,
    SessionRecord,
    SessionRegistry,
    Settlement,
    Store,
    StoredMessage,
    StoreError,
)

__all__ = ["Service"]

log = logging.getLogger(__name__)

_IDEM = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_REASON = 1024
# A client id no node registered is not looked up again for this long.
_UNKNOWN_ID_MS = 5_000
_UNKNOWN_IDS_KEPT = 10_000


class Service:
    """Every operation of the engine, for any transport.

    Args:
        store: where apps and messages live.
        config: tunables.
        clock: the time (epoch ms).
        dispatcher: the delivery state machine this service feeds.
        stats: counters shared with the dispatcher and ``/metrics``.
    """

    def __init__(
        self,
        store: Store,
        config: EngineConfig,
        clock: Clock,
        dispatcher: Dispatcher,
        stats: EngineStats,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.dispatcher = dispatcher
        self.stats = stats
        # Told when this process changed an app, so the runtime applies it
        # at once instead of at its next periodic read.
        self.on_apps_changed: Callable[[], None] | None = None
        self.apps = AppRegistry(
            store, clock.now_ms, config.app_cache_ms, on_change=self._apps_changed_here
        )
        self.policy = DeliveryPolicy()
        self._limiter = RateLimiter(config.rate_limit_per_app)
        self._refusals = ThrottledLog(log, clock.now_ms, what="refused")
        self.store_health = StoreHealth(log, clock.now_ms)
        # Client ids found in no registry lately, with when to ask again.
        self._unknown_ids: dict[str, int] = {}
        self._appends_soon = store if isinstance(store, AppendsSoon) else None
        self.configure(config)

    def configure(self, config: EngineConfig) -> None:
        """Use new tunables from the next operation on."""
        self.config = config
        self.policy = DeliveryPolicy(
            lease_ms=config.ack_deadline_ms,
            max_deliveries=config.max_deliveries,
            backoff_ms=config.redelivery_backoff_ms,
        )
        self._limiter = RateLimiter(config.rate_limit_per_app)

    # ------------------------------------------------------------------ sessions

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
            raise self._over(
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
            raise self._over(
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

    # ------------------------------------------------------------------ publish

    async def prepare_publish(
        self,
        client_id: str,
        name: str,
        payload: str,
        recipient: str,
        metadata: str,
        payload_metadata: str | None = None,
    ) -> NewMessage:
        """Check a publish and make its record (the store numbers it)."""
        session = self.session(client_id)
        cfg = self.config
        try:
            validation.check_name(name, cfg.max_name_length)
            validation.check_recipient(recipient)
            validation.check_payload(payload, cfg.max_payload_bytes)
            meta = validation.parse_metadata(metadata, cfg.max_metadata_bytes)
        except ServiceError as exc:
            raise self._counted(exc) from None
        if not allowed(session.app.publish_rules, name):
            raise self._deny(f"app {session.app.name!r} may not publish {name!r}")
        if await self.apps.active_app(recipient) is None:
            raise ServiceError.invalid(f"recipient {recipient} is not a registered app")
        now = self.clock.now_ms()
        return NewMessage(
            idem=new_idem(now),
            recipient=recipient,
            name=name,
            payload=payload,
            metadata=meta.text,
            sender=session.app_id,
            created_at_ms=now,
            payload_metadata=validation.parse_payload_metadata(payload_metadata),
            expires_at_ms=now + meta.ttl_ms if meta.ttl_ms is not None else None,
            dedupe_key=meta.idempotency_key,
            persist=meta.persist,
        )

    async def append(self, batch: Sequence[NewMessage]) -> list[Appended]:
        """Store a batch of publishes in one go; raises StoreError if the
        store failed as a whole."""
        now = self.clock.now_ms()
        results = await self.store.append(
            batch, now_ms=now, dedupe_since_ms=now - self.config.dedupe_window_ms
        )
        self._count(results)
        return results

    def append_soon(self, batch: Sequence[NewMessage], done: AppendDone) -> bool:
        """:meth:`append` without a coroutine, when the store can (``done``
        hears the results, or the StoreError); ``False`` when it cannot.

        Raises:
            StoreError: the store is not open (``done`` is not called).
        """
        store = self._appends_soon
        if store is None:
            return False

        def appended(outcome: list[Appended] | StoreError) -> None:
            if not isinstance(outcome, StoreError):
                self._count(outcome)
            done(outcome)

        now = self.clock.now_ms()
        store.append_soon(
            batch, now_ms=now, dedupe_since_ms=now - self.config.dedupe_window_ms, done=appended
        )
        return True

    def _count(self, results: list[Appended]) -> None:
        for result in results:
            if result.duplicate:
                self.stats.deduplicated += 1
            elif result.error is None:
                self.stats.published += 1
            else:
                self.store_health.failed("publish", StoreError(result.error))
        if results and results[-1].error is None:
            self.store_health.worked()

    # ------------------------------------------------------------------ subscribe

    def subscribe(self, client_id: str, name: str) -> None:
        """Start delivering messages of ``name`` to this client."""
        session = self.session(client_id)
        try:
            validation.check_name(name, self.config.max_name_length)
        except ServiceError as exc:
            raise self._counted(exc) from None
        if not allowed(session.app.subscribe_rules, name):
            raise self._deny(f"app {session.app.name!r} may not subscribe to {name!r}")
        limit = self.config.max_subscriptions_per_client
        if name not in session.subscriptions and len(session.subscriptions) >= limit:
            raise self._over(
                "subscriptions_per_client",
                f"this client already has {len(session.subscriptions)} subscriptions, "
                f"the limit is {limit}",
            )
        self.dispatcher.subscribe(session, name)

    def unsubscribe(self, client_id: str, name: str) -> bool:
        """Stop deliveries of ``name`` to this client; ``False`` if it was not subscribed."""
        return self.dispatcher.unsubscribe(self.session(client_id), name)

    def pause(self, client_id: str, name: str, reason: str = "") -> None:
        """No new deliveries of ``name`` to this client; its unsettled ones go back."""
        session = self.session(client_id)
        validation.check_name(name)
        self.dispatcher.pause(session, name, reason[:_MAX_REASON])

    def resume(self, client_id: str, name: str) -> None:
        """Undo :meth:`pause`: deliveries of ``name`` flow to this client again."""
        session = self.session(client_id)
        validation.check_name(name)
        self.dispatcher.resume(session, name)

    # ------------------------------------------------------------------ settle

    async def ack(self, client_id: str, idem: str) -> None:
        """The message is done. Acking twice is fine (clients do, PROTOCOL.md §5)."""
        (outcome,) = await self.ack_many([(client_id, idem)])
        if outcome is not None:
            raise outcome

    async def ack_many(self, acks: Sequence[tuple[str, str]]) -> list[ServiceError | None]:
        """Ack several messages (of any clients) with one store write; per ack
        ``None`` or the refusal. What :meth:`ack` does, batched."""
        outcomes: list[ServiceError | None] = [None] * len(acks)
        settle: dict[str, int] = {}  # idem -> position of its first ack
        for index, (client_id, idem) in enumerate(acks):
            try:
                session = self.session(client_id)
                message = await self._find(session, idem)
            except ServiceError as exc:
                outcomes[index] = exc
                continue
            if message.state is MessageState.PENDING:
                settle.setdefault(idem, index)
        if not settle:
            return outcomes
        try:
            changed = await self.store.settle(
                [Settlement(idem, MessageState.ACKED) for idem in settle],
                now_ms=self.clock.now_ms(),
            )
        except StoreError as exc:
            failure = self.store_health.failed("ack", exc, count=len(settle))
            for index in settle.values():
                outcomes[index] = failure
            return outcomes
        self.store_health.worked()
        for idem, done in zip(settle, changed, strict=True):
            self.dispatcher.settled(idem)
            if done:
                self.stats.acked += 1
        return outcomes

    async def discard(self, client_id: str, idem: str, reason: str) -> None:
        """Never deliver this message again; it goes to the app's dead letters."""
        session = self.session(client_id)
        message = await self._find(session, idem)
        if message.state is not MessageState.PENDING:
            return
        if await self._settle(idem, MessageState.DEAD, f"discarded: {reason[:_MAX_REASON]}"):
            self.stats.discarded += 1

    async def defer(self, client_id: str, idem: str, delay_ms: int, reason: str) -> int:
        """Deliver the message again after ``delay_ms``; returns that time (epoch ms)."""
        session = self.session(client_id)
        if not 0 <= delay_ms <= self.config.max_defer_ms:
            raise ServiceError.invalid(
                f"delay_ms {delay_ms} is outside 0..{self.config.max_defer_ms} (24 h)"
            )
        message = await self._find(session, idem)
        if message.state is not MessageState.PENDING:
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION,
                f"message {idem} is already {message.state.name.lower()}; it cannot be deferred",
            )
        now = self.clock.now_ms()
        visible_at = now + delay_ms
        try:
            changed = await self.store.defer(idem, visible_at, now)
        except StoreError as exc:
            raise self.store_health.failed("defer", exc) from exc
        if not changed:
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION, f"message {idem} was settled meanwhile"
            )
        self.dispatcher.settled(idem)
        self.dispatcher.wake(message.partition, visible_at)
        self.stats.deferred += 1
        return visible_at

    async def replay(self, client_id: str, idem: str) -> ReplayResult:
        """Read back any message addressed to the caller's app, whatever its state."""
        session = self.session(client_id)
        message = await self._find(session, idem)
        return ReplayResult(
            delivery=Delivery.from_stored(message),
            replayed_at_ms=self.clock.now_ms(),
            was_acknowledged=message.state is MessageState.ACKED,
        )

    async def extend(self, client_id: str, idem: str) -> int:
        """Push back the ack deadline of a message the caller's app has in flight.

        Returns the new deadline (epoch ms). Our SDK calls this while a long
        handler runs, so the message is not delivered a second time.
        """
        session = self.session(client_id)
        held = self.dispatcher.held(idem)
        if held is None or held.recipient != session.app_id:
            await self._find(session, idem)  # "not found" unless it is the caller's
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        deadline = self.clock.now_ms() + self.config.ack_deadline_ms
        try:
            extended = await self.store.extend(idem, held.token, deadline)
        except StoreError as exc:
            raise self.store_health.failed("extend", exc) from exc
        if not extended:
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        self.dispatcher.extended(idem, deadline)
        return deadline

    async def release(self, client_id: str, idem: str, reason: str) -> int | None:
        """Give back a message this app has in flight, unsettled (its handler failed).

        It is delivered again after the redelivery backoff; at
        ``max_deliveries`` it is dead-lettered instead. Returns when it
        becomes visible again (epoch ms), or ``None`` if it was dead-lettered.
        """
        session = self.session(client_id)
        held = self.dispatcher.held(idem)
        if held is None or held.recipient != session.app_id:
            await self._find(session, idem)
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        self.dispatcher.give_back(idem)
        failure = reason[:_MAX_REASON] or "released by the client"
        try:
            (outcome,) = await self.store.release(
                [Release(idem, held.token, failure)], now_ms=self.clock.now_ms(), policy=self.policy
            )
        except StoreError as exc:
            raise self.store_health.failed("release", exc) from exc
        if outcome.stale:
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        if outcome.dead:
            self.stats.dead_lettered += 1
            return None
        if outcome.visible_at_ms is not None:
            self.dispatcher.wake(held.message.partition, outcome.visible_at_ms)
        return outcome.visible_at_ms

    async def release_many(self, releases: Sequence[tuple[tuple[str, str], Release]]) -> None:
        """Hand leases back (deadline passed, client gone); for the runtime.
        The partitions are claimed again when the backoff of each ends."""
        try:
            outcomes = await self.store.release(
                [release for _, release in releases], now_ms=self.clock.now_ms(), policy=self.policy
            )
        except StoreError as exc:
            self.store_health.failed("release", exc, count=len(releases))
            return
        for (key, _), outcome in zip(releases, outcomes, strict=True):
            if outcome.dead:
                self.stats.dead_lettered += 1
            elif outcome.visible_at_ms is not None:
                self.dispatcher.wake(key, outcome.visible_at_ms)

    # ------------------------------------------------------------------ helpers

    async def _find(self, session: Session, idem: str) -> StoredMessage:
        """The caller's message with this idem. Another app's message is "not
        found" exactly like a missing one, so nothing leaks (DESIGN.md §6)."""
        held = self.dispatcher.held(idem)
        if held is not None and held.recipient == session.app_id:
            return held.message
        message: StoredMessage | None = None
        if _IDEM.fullmatch(idem):
            try:
                message = await self.store.get(idem)
            except StoreError as exc:
                raise self.store_health.failed("read", exc, write=False) from exc
        if message is None or message.recipient != session.app_id:
            raise ServiceError.not_found(f"message {idem[:64]!r} not found")
        return message

    async def _settle(self, idem: str, state: MessageState, reason: str | None) -> bool:
        try:
            (changed,) = await self.store.settle(
                [Settlement(idem, state, reason)], now_ms=self.clock.now_ms()
            )
        except StoreError as exc:
            raise self.store_health.failed("settle", exc) from exc
        self.dispatcher.settled(idem)
        return changed

    def _counted(self, exc: ServiceError) -> ServiceError:
        if exc.limit is not None:
            return self._over(exc.limit, exc.message)
        return exc

    def _over(self, limit: str, message: str) -> ServiceError:
        counts = self.stats.limit_rejections
        counts[limit] = counts.get(limit, 0) + 1
        self._refusals.note(limit, message)
        return ServiceError.over_limit(limit, message)

    def _deny(self, message: str) -> ServiceError:
        self.stats.denied += 1
        self._refusals.note("denied", message)
        return ServiceError.denied(message)
