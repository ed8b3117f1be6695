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
from collections.abc import Sequence

from ensync.protocol.names import allowed
from ensync.server.config import EngineConfig
from ensync.server.core import validation
from ensync.server.core.admission import Admission
from ensync.server.core.dispatch import Dispatcher
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.health import StoreHealth
from ensync.server.core.ids import new_idem
from ensync.server.core.model import (
    Clock,
    Delivery,
    EngineStats,
    ReplayResult,
)
from ensync.server.core.refusals import Refusals
from ensync.server.core.sessions import Session
from ensync.server.store.base import (
    AppendDone,
    Appended,
    AppendsSoon,
    DeliveryPolicy,
    MessageState,
    NewMessage,
    Release,
    Settlement,
    SlottedIds,
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
    """The message operations of the engine, for any transport: publish,
    subscribe, settle, replay.

    Args:
        store: where apps and messages live.
        config: tunables.
        clock: the time (epoch ms).
        dispatcher: the delivery state machine this service feeds.
        stats: counters shared with the dispatcher and ``/metrics``.

    Sessions are its :attr:`admission`'s (connect, heartbeat, limits).
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
        self.store_health = StoreHealth(log, clock.now_ms)
        self._refusals = Refusals(log, clock, stats)
        self.admission = Admission(
            store, config, clock, dispatcher, stats, self._refusals, self.store_health
        )
        self.apps = self.admission.apps
        self.policy = DeliveryPolicy()
        self._appends_soon = store if isinstance(store, AppendsSoon) else None
        self._slots = store if isinstance(store, SlottedIds) else None
        self.configure(config)

    def configure(self, config: EngineConfig) -> None:
        """Use new tunables from the next operation on."""
        self.config = config
        self.admission.configure(config)
        self.policy = DeliveryPolicy(
            lease_ms=config.ack_deadline_ms,
            max_deliveries=config.max_deliveries,
            backoff_ms=config.redelivery_backoff_ms,
        )

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
        session = self.admission.session(client_id)
        cfg = self.config
        try:
            validation.check_name(name, cfg.max_name_length)
            validation.check_recipient(recipient)
            validation.check_payload(payload, cfg.max_payload_bytes)
            meta = validation.parse_metadata(metadata, cfg.max_metadata_bytes)
        except ServiceError as exc:
            raise self._refusals.counted(exc) from None
        if not allowed(session.app.publish_rules, name):
            raise self._refusals.deny(f"app {session.app.name!r} may not publish {name!r}")
        try:
            recipient_app = await self.apps.active_app(recipient)
        except StoreError as exc:  # the lookup read the store: "retry later"
            raise self.store_health.failed("read", exc, write=False) from exc
        if recipient_app is None:
            raise ServiceError.invalid(f"recipient {recipient} is not a registered app")
        now = self.clock.now_ms()
        slot = self._slots.slot_of(recipient, name) if self._slots is not None else None
        return NewMessage(
            idem=new_idem(now, slot=slot),
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
        session = self.admission.session(client_id)
        try:
            validation.check_name(name, self.config.max_name_length)
        except ServiceError as exc:
            raise self._refusals.counted(exc) from None
        if not allowed(session.app.subscribe_rules, name):
            raise self._refusals.deny(f"app {session.app.name!r} may not subscribe to {name!r}")
        limit = self.config.max_subscriptions_per_client
        if name not in session.subscriptions and len(session.subscriptions) >= limit:
            raise self._refusals.over(
                "subscriptions_per_client",
                f"this client already has {len(session.subscriptions)} subscriptions, "
                f"the limit is {limit}",
            )
        self.dispatcher.subscribe(session, name)

    def unsubscribe(self, client_id: str, name: str) -> bool:
        """Stop deliveries of ``name`` to this client; ``False`` if it was not subscribed."""
        return self.dispatcher.unsubscribe(self.admission.session(client_id), name)

    def pause(self, client_id: str, name: str, reason: str = "") -> None:
        """No new deliveries of ``name`` to this client; its unsettled ones go back."""
        session = self.admission.session(client_id)
        validation.check_name(name)
        self.dispatcher.pause(session, name, reason[:_MAX_REASON])

    def resume(self, client_id: str, name: str) -> None:
        """Undo :meth:`pause`: deliveries of ``name`` flow to this client again."""
        session = self.admission.session(client_id)
        validation.check_name(name)
        self.dispatcher.resume(session, name)

    # ------------------------------------------------------------------ settle

    async def ack_many(self, acks: Sequence[tuple[str, str]]) -> list[ServiceError | None]:
        """Ack several messages (of any clients) with one store write; per ack
        ``None`` or the refusal. Acking twice is fine (clients do, PROTOCOL.md §5)."""
        outcomes: list[ServiceError | None] = [None] * len(acks)
        settle: dict[str, int] = {}  # idem -> position of its first ack
        for index, (client_id, idem) in enumerate(acks):
            try:
                session = self.admission.session(client_id)
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
            self.dispatcher.leases.settled(idem)
            if done:
                self.stats.acked += 1
        return outcomes

    async def discard(self, client_id: str, idem: str, reason: str) -> None:
        """Never deliver this message again; it goes to the app's dead letters."""
        session = self.admission.session(client_id)
        message = await self._find(session, idem)
        if message.state is not MessageState.PENDING:
            return
        if await self._settle(idem, MessageState.DEAD, f"discarded: {reason[:_MAX_REASON]}"):
            self.stats.discarded += 1

    async def defer(self, client_id: str, idem: str, delay_ms: int, reason: str) -> int:
        """Deliver the message again after ``delay_ms``; returns that time (epoch ms)."""
        session = self.admission.session(client_id)
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
        self.dispatcher.leases.settled(idem)
        self.dispatcher.wake(message.partition, visible_at)
        self.stats.deferred += 1
        return visible_at

    async def replay(self, client_id: str, idem: str) -> ReplayResult:
        """Read back any message addressed to the caller's app, whatever its state."""
        session = self.admission.session(client_id)
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
        session = self.admission.session(client_id)
        held = self.dispatcher.leases.get(idem)
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
        self.dispatcher.leases.extended(idem, deadline)
        return deadline

    async def release(self, client_id: str, idem: str, reason: str) -> int | None:
        """Give back a message this app has in flight, unsettled (its handler failed).

        It is delivered again after the redelivery backoff; at
        ``max_deliveries`` it is dead-lettered instead. Returns when it
        becomes visible again (epoch ms), or ``None`` if it was dead-lettered.
        """
        session = self.admission.session(client_id)
        held = self.dispatcher.leases.get(idem)
        if held is None or held.recipient != session.app_id:
            await self._find(session, idem)
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        self.dispatcher.leases.give_back(idem)
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
        held = self.dispatcher.leases.get(idem)
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
        self.dispatcher.leases.settled(idem)
        return changed
