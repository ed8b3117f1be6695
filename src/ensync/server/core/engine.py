"""The engine core: every operation both transports call, over any store.

The core knows no wire format. Transports authenticate a client with
:meth:`Engine.connect` (handing over a :class:`SessionRouter` that tells the
core where to push deliveries), then call the operations with the
``client_id`` they got back. Failures are :class:`ServiceError`.

Delivery contract (DESIGN.md §2), in the terms of this module:

* a publish stores one message per recipient (``persist: false`` ones in the
  volatile store) and returns after the commit;
* each message goes to one eligible subscriber of the recipient app at a
  time, round robin, first deliveries in block order;
* a delivery is *leased* until acked, deferred or discarded; a lease that
  ends otherwise (deadline, disconnect, pause, unsubscribe) puts the message
  back, and after ``max_deliveries`` leases it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.names import allowed
from ensync.server.config import EngineConfig
from ensync.server.core import validation
from ensync.server.core.apps import AppRegistry
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.ids import new_client_hash, new_client_id, new_idem
from ensync.server.core.model import (
    Delivery,
    EngineStats,
    ReplayResult,
    SessionInfo,
    SessionRouter,
)
from ensync.server.core.partitions import Partition
from ensync.server.core.sessions import Session, Subscription
from ensync.server.store.base import MessageState, Store, StoredMessage, StoreError

__all__ = ["Engine", "wall_clock_ms"]

log = logging.getLogger(__name__)

_IDEM = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_REASON = 1024


def wall_clock_ms() -> int:
    """Epoch milliseconds: the engine's default clock."""
    return time.time_ns() // 1_000_000


@dataclass(eq=False, slots=True)
class _Bucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``rate``."""

    tokens: float
    updated_ms: int

    def take(self, rate: int, now_ms: int) -> bool:
        elapsed = max(0, now_ms - self.updated_ms)
        self.tokens = min(float(rate), self.tokens + elapsed * rate / 1000)
        self.updated_ms = now_ms
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(eq=False, slots=True)
class _Seen:
    """A remembered idempotency key: the publish's commit, then its idem."""

    expires_at_ms: int
    commit: asyncio.Task[str] | None = None
    idem: str | None = None


@dataclass(eq=False, slots=True)
class _Lease:
    message: StoredMessage
    subscription: Subscription
    timer: asyncio.TimerHandle


class Engine:
    """The transport-neutral engine.

    Args:
        store: where persisted messages and apps live.
        volatile: where ``persist: false`` messages live (a memory store);
            may be the same object as ``store``.
        config: tunables.
        now_ms: the clock (epoch ms), replaceable in tests.

    Call :meth:`start` before use and :meth:`stop` at the end.
    """

    def __init__(
        self,
        store: Store,
        volatile: Store,
        config: EngineConfig | None = None,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.config = config or EngineConfig()
        self.store = store
        self.volatile = volatile
        self.stats = EngineStats()
        self.apps = AppRegistry(
            store, now_ms, self.config.app_cache_ms, on_change=self._apps_changed
        )
        self._buckets: dict[str, _Bucket] = {}
        self._apps_refresh: asyncio.Task[None] | None = None
        self._now_ms = now_ms
        self._sessions: dict[str, Session] = {}
        self._partitions: dict[tuple[str, str], Partition] = {}
        self._block_init: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._leases: dict[str, _Lease] = {}
        self._queued: set[str] = set()
        self._deferred: dict[str, asyncio.TimerHandle] = {}
        # Idempotency keys, oldest first (dicts keep insertion order).
        self._seen: dict[bytes, _Seen] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Restore timers of deferred messages and start housekeeping."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        now = self._now_ms()
        for store in self._stores():
            after = now
            while True:
                scheduled = await store.fetch_scheduled(after, 1000)
                for message in scheduled:
                    self._schedule_visible(message.idem, message.visible_at_ms)
                if len(scheduled) < 1000:
                    break
                after = scheduled[-1].visible_at_ms
        window_start = now - self.config.dedupe_window_ms
        recent = await self.store.recent_dedupe_keys(window_start, self.config.dedupe_max_keys)
        for sender, recipient, key, idem in recent:
            seen = _Seen(now + self.config.dedupe_window_ms)
            seen.idem = idem
            self._remember(_dedupe_key(sender, recipient, key), seen)
        self._spawn(self._housekeeping(), name="ensync-housekeeping")
        self._spawn(self._refresh_apps_forever(), name="ensync-housekeeping")

    async def stop(self) -> None:
        """End every session, cancel timers and background work. Idempotent."""
        if not self._running:
            return
        self._running = False
        for session in list(self._sessions.values()):
            self._end_session(session, requeue=True)
        for lease in self._leases.values():
            lease.timer.cancel()
        for handle in self._deferred.values():
            handle.cancel()
        self._deferred.clear()
        tasks = list(self._tasks)
        for task in tasks:
            if task.get_name() == "ensync-housekeeping":
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def statistics(self) -> dict[str, int]:
        """Gauges for metrics: sessions, leases, buffered and deferred messages."""
        return {
            "sessions": len(self._sessions),
            "in_flight": len(self._leases),
            "buffered": len(self._queued),
            "deferred": len(self._deferred),
            "partitions": len(self._partitions),
        }

    # ------------------------------------------------------------------ sessions

    async def connect(self, app_key: str, router: SessionRouter) -> SessionInfo:
        """Authenticate an app key and open a session routed through ``router``."""
        try:
            app = await self.apps.authenticate(app_key)
        except ServiceError:
            self.stats.rejected += 1
            raise
        clients = sum(1 for s in self._sessions.values() if s.app.name == app.name)
        if clients >= self.config.max_clients_per_app:
            raise self._over(
                "clients_per_app",
                f"app {app.name!r} already has {clients} connected clients, "
                f"the limit is {self.config.max_clients_per_app}",
            )
        now = self._now_ms()
        session = Session(
            client_id=new_client_id(),
            client_hash=new_client_hash(),
            app=app,
            router=router,
            connected_at_ms=now,
            last_seen_ms=now,
        )
        self._sessions[session.client_id] = session
        self.stats.connects += 1
        log.info("client %s of app %s connected", session.client_id[:8], app.name)
        return SessionInfo(session.client_id, session.client_hash, app.app_id, app.name)

    def heartbeat(self, client_id: str) -> bool:
        """Keep a session alive; ``False`` if the client id is unknown."""
        session = self._sessions.get(client_id)
        if session is None:
            return False
        session.last_seen_ms = self._now_ms()
        return True

    def session(self, client_id: str) -> Session:
        """The live session of ``client_id``, charged one request against its app's
        rate; raises UNAUTHENTICATED (unknown session) or LIMIT_EXCEEDED."""
        session = self._sessions.get(client_id)
        if session is None:
            raise ServiceError.unauthenticated(f"{UNKNOWN_SESSION}: connect first")
        now = self._now_ms()
        session.last_seen_ms = now
        rate = self.config.rate_limit_per_app
        if rate > 0:
            bucket = self._buckets.get(session.app.name)
            if bucket is None:
                bucket = self._buckets[session.app.name] = _Bucket(float(rate), now)
            if not bucket.take(rate, now):
                raise self._over(
                    "request_rate",
                    f"app {session.app.name!r} exceeded its rate of {rate} requests/s; slow down",
                )
        return session

    def _over(self, limit: str, message: str) -> ServiceError:
        counts = self.stats.limit_rejections
        counts[limit] = counts.get(limit, 0) + 1
        return ServiceError.over_limit(limit, message)

    def _deny(self, message: str) -> ServiceError:
        self.stats.denied += 1
        return ServiceError.denied(message)

    def disconnect(self, client_id: str) -> None:
        """The client is gone: drop its session and requeue what it held."""
        session = self._sessions.get(client_id)
        if session is not None:
            self._end_session(session, requeue=True, close_router=False)

    def routes_changed(self, client_id: str) -> None:
        """A transport opened or closed an outbox of this client.

        Messages held for a name that now has an outbox flow; messages in
        flight for a name that lost its outbox go back to the queue.
        """
        session = self._sessions.get(client_id)
        if session is None:
            return
        for sub in list(session.subscriptions.values()):
            if sub.in_flight and session.router.sink_for(sub.name) is None:
                self._requeue_all(sub)
            self._pump(self._partition(session.app_id, sub.name))

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        client_id: str,
        name: str,
        payload: str,
        recipient: str,
        metadata: str,
        payload_metadata: str | None = None,
    ) -> str:
        """Store a message for one recipient app; returns its idem once committed."""
        commit = await self.accept_publish(
            client_id, name, payload, recipient, metadata, payload_metadata
        )
        return await commit

    async def accept_publish(
        self,
        client_id: str,
        name: str,
        payload: str,
        recipient: str,
        metadata: str,
        payload_metadata: str | None = None,
    ) -> asyncio.Task[str]:
        """Validate and number a publish, and start committing it.

        Returns a task that resolves to the idem once the message is stored
        (or raises :class:`ServiceError`). Publishes accepted one after the
        other are numbered, committed and delivered in that order, so a
        transport may pipeline them: await this call in order, await the
        returned tasks in any order.
        """
        session = self.session(client_id)
        cfg = self.config
        try:
            validation.check_name(name, cfg.max_name_length)
            validation.check_recipient(recipient)
            validation.check_payload(payload, cfg.max_payload_bytes)
            meta = validation.parse_metadata(metadata, cfg.max_metadata_bytes)
        except ServiceError as exc:
            if exc.limit is not None:
                raise self._over(exc.limit, exc.message) from None
            raise
        if not allowed(session.app.publish_rules, name):
            raise self._deny(f"app {session.app.name!r} may not publish {name!r}")
        if await self.apps.active_app(recipient) is None:
            raise ServiceError.invalid(f"recipient {recipient} is not a registered app")
        dedupe = _dedupe_key(session.app_id, recipient, meta.idempotency_key or "")
        if meta.idempotency_key is not None:
            earlier = self._recall(dedupe)
            if earlier is not None:
                self.stats.deduplicated += 1
                return earlier
        partition = await self._partition_ready(recipient, name)
        now = self._now_ms()
        block = partition.allocate()
        message = StoredMessage(
            idem=new_idem(now),
            recipient=recipient,
            name=name,
            block=block,
            payload=payload,
            metadata=meta.text,
            sender=session.app_id,
            created_at_ms=now,
            payload_metadata=validation.parse_payload_metadata(payload_metadata),
            expires_at_ms=now + meta.ttl_ms if meta.ttl_ms is not None else None,
            dedupe_key=meta.idempotency_key,
        )
        store = self.store if meta.persist else self.volatile
        # A task starts in creation order, so commits are queued in block order.
        commit = asyncio.get_running_loop().create_task(self._commit(store, partition, message))
        if meta.idempotency_key is not None:
            seen = _Seen(now + self.config.dedupe_window_ms, commit=commit)
            self._remember(dedupe, seen)
            commit.add_done_callback(lambda done: self._committed(dedupe, seen, done))
        return commit

    def _recall(self, key: bytes) -> asyncio.Task[str] | None:
        """The outcome of an earlier publish with this idempotency key, if remembered."""
        seen = self._seen.get(key)
        if seen is None or seen.expires_at_ms <= self._now_ms():
            return None
        if seen.idem is not None:
            return asyncio.get_running_loop().create_task(_already(seen.idem))
        return seen.commit

    def _remember(self, key: bytes, seen: _Seen) -> None:
        self._seen.pop(key, None)  # re-inserted at the end: the newest
        self._seen[key] = seen
        self._forget_old_keys(self.config.dedupe_max_keys)

    def _forget_old_keys(self, keep: int) -> None:
        """Drop expired keys, and the oldest beyond ``keep``."""
        now = self._now_ms()
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if len(seen) <= keep and seen[oldest].expires_at_ms > now:
                break
            del seen[oldest]

    def _committed(self, key: bytes, seen: _Seen, commit: asyncio.Task[str]) -> None:
        if commit.cancelled() or commit.exception() is not None:
            if self._seen.get(key) is seen:
                del self._seen[key]  # nothing was stored: a retry must store it
            return
        seen.idem = commit.result()
        seen.commit = None

    async def _commit(self, store: Store, partition: Partition, message: StoredMessage) -> str:
        try:
            await store.append([message])
        except BaseException as exc:
            self._release(partition, partition.committed(message.block, None))
            if isinstance(exc, StoreError):
                log.error("store refused a publish: %s", exc)
                raise ServiceError(ErrorCode.UNAVAILABLE, "storage failed; retry later") from exc
            raise
        self.stats.published += 1
        self._release(partition, partition.committed(message.block, message))
        return message.idem

    async def _partition_ready(self, recipient: str, name: str) -> Partition:
        """The partition, with its block counter restored from the store once."""
        partition = self._partition(recipient, name)
        if partition.blocks_loaded:
            return partition
        key = partition.key
        init = self._block_init.get(key)
        if init is not None:
            await asyncio.shield(init)
            return partition
        init = asyncio.get_running_loop().create_future()
        self._block_init[key] = init
        try:
            last = 0
            for store in self._stores():
                last = max(last, await store.last_block(recipient, name))
            partition.last_block = max(partition.last_block, last)
            partition.blocks_loaded = True
            init.set_result(None)
        except BaseException as exc:
            init.set_exception(exc)
            init.exception()  # retrieved: nobody else may be waiting
            if isinstance(exc, StoreError):
                raise ServiceError(ErrorCode.UNAVAILABLE, "storage failed; retry later") from exc
            raise
        finally:
            del self._block_init[key]
        return partition

    def _release(self, partition: Partition, messages: list[StoredMessage]) -> None:
        """Committed messages, in block order, enter the ready buffer if it is caught up."""
        if not messages or not partition.subscribers:
            return
        for message in messages:
            if partition.caught_up:
                if message.block <= partition.cursor:
                    continue
                if len(partition.ready) >= self.config.buffer_high_watermark:
                    # The rest stays in the store until the buffer drains.
                    partition.caught_up = False
                    continue
                partition.ready.append(message)
                partition.cursor = message.block
                self._queued.add(message.idem)
            elif partition.fetching:
                partition.dirty = True
        self._pump(partition)

    # ------------------------------------------------------------------ subscribe

    def subscribe(self, client_id: str, name: str) -> None:
        """Start delivering messages of ``name`` to this client."""
        session = self.session(client_id)
        try:
            validation.check_name(name, self.config.max_name_length)
        except ServiceError as exc:
            if exc.limit is not None:
                raise self._over(exc.limit, exc.message) from None
            raise
        if not allowed(session.app.subscribe_rules, name):
            raise self._deny(f"app {session.app.name!r} may not subscribe to {name!r}")
        if name in session.subscriptions:
            self._pump(self._partition(session.app_id, name))
            return
        if len(session.subscriptions) >= self.config.max_subscriptions_per_client:
            raise self._over(
                "subscriptions_per_client",
                f"this client already has {len(session.subscriptions)} subscriptions, "
                f"the limit is {self.config.max_subscriptions_per_client}",
            )
        sub = Subscription(session=session, name=name)
        session.subscriptions[name] = sub
        partition = self._partition(session.app_id, name)
        partition.subscribers.append(sub)
        self._pump(partition)

    def unsubscribe(self, client_id: str, name: str) -> bool:
        """Stop deliveries of ``name`` to this client; ``False`` if it was not subscribed."""
        session = self.session(client_id)
        sub = session.subscriptions.pop(name, None)
        if sub is None:
            return False
        self._detach(sub)
        return True

    def pause(self, client_id: str, name: str, reason: str = "") -> None:
        """No new deliveries of ``name`` to this client; its unsettled ones go back."""
        session = self.session(client_id)
        validation.check_name(name)
        session.paused[name] = reason[:_MAX_REASON]
        sub = session.subscriptions.get(name)
        if sub is not None:
            self._requeue_all(sub)

    def resume(self, client_id: str, name: str) -> None:
        """Undo :meth:`pause`: deliveries of ``name`` flow to this client again."""
        session = self.session(client_id)
        validation.check_name(name)
        if session.paused.pop(name, None) is not None:
            self._pump(self._partition(session.app_id, name))

    # ------------------------------------------------------------------ settle

    async def ack(self, client_id: str, idem: str) -> None:
        """The message is done. Acking twice is fine (clients do, PROTOCOL.md §5)."""
        session = self.session(client_id)
        message = await self._find(session, idem)
        if message.state is not MessageState.PENDING:
            return
        await self._settle(message, MessageState.ACKED, None)
        self.stats.acked += 1

    async def discard(self, client_id: str, idem: str, reason: str) -> None:
        """Never deliver this message again; it goes to the app's dead letters."""
        session = self.session(client_id)
        message = await self._find(session, idem)
        if message.state is not MessageState.PENDING:
            return
        await self._settle(message, MessageState.DEAD, f"discarded: {reason[:_MAX_REASON]}")
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
        visible_at = self._now_ms() + delay_ms
        store = await self._home(message)
        lease = self._leases.get(idem)
        attempts = lease.message.attempts if lease is not None else message.attempts
        try:
            changed = await store.reschedule(idem, visible_at, attempts)
        except StoreError as exc:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage failed; retry later") from exc
        if not changed:
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION, f"message {idem} was settled meanwhile"
            )
        self._end_lease(idem)
        self._queued.discard(idem)
        self._schedule_visible(idem, visible_at)
        self.stats.deferred += 1
        return visible_at

    async def replay(self, client_id: str, idem: str) -> ReplayResult:
        """Read back any message addressed to the caller's app, whatever its state."""
        session = self.session(client_id)
        message = await self._find(session, idem)
        return ReplayResult(
            delivery=_delivery(message, message.attempts),
            replayed_at_ms=self._now_ms(),
            was_acknowledged=message.state is MessageState.ACKED,
        )

    async def extend(self, client_id: str, idem: str) -> int:
        """Push back the ack deadline of a message the caller's app has in flight.

        Returns the new deadline (epoch ms). Our SDK calls this while a long
        handler runs, so the message is not delivered a second time.
        """
        session = self.session(client_id)
        lease = self._leases.get(idem)
        if lease is None or lease.message.recipient != session.app_id:
            await self._find(session, idem)  # "not found" unless it is the caller's
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        lease.timer.cancel()
        loop = self._loop or asyncio.get_running_loop()
        lease.timer = loop.call_later(self.config.ack_deadline_ms / 1000, self._lease_expired, idem)
        return self._now_ms() + self.config.ack_deadline_ms

    async def _find(self, session: Session, idem: str) -> StoredMessage:
        """The caller's message with this idem. Another app's message is "not
        found" exactly like a missing one, so nothing leaks (DESIGN.md §6)."""
        lease = self._leases.get(idem)
        if lease is not None and lease.message.recipient == session.app_id:
            return lease.message
        message: StoredMessage | None = None
        if _IDEM.fullmatch(idem):
            try:
                message = await self.volatile.get(idem)
                if message is None and self.store is not self.volatile:
                    message = await self.store.get(idem)
            except StoreError as exc:
                raise ServiceError(ErrorCode.UNAVAILABLE, "storage failed; retry later") from exc
        if message is None or message.recipient != session.app_id:
            raise ServiceError.not_found(f"message {idem[:64]!r} not found")
        return message

    async def _settle(
        self, message: StoredMessage, state: MessageState, reason: str | None
    ) -> None:
        try:
            await (await self._home(message)).settle(message.idem, state, self._now_ms(), reason)
        except StoreError as exc:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage failed; retry later") from exc
        self._forget(message.idem)

    def _forget(self, idem: str) -> None:
        """A settled message leaves every in-memory structure."""
        self._end_lease(idem)
        self._queued.discard(idem)
        handle = self._deferred.pop(idem, None)
        if handle is not None:
            handle.cancel()

    # ------------------------------------------------------------------ dispatch

    def _pump(self, partition: Partition) -> None:
        """Hand ready messages to eligible subscribers until one side runs out."""
        if not partition.subscribers or not self._running:
            return
        window = self.config.window
        while True:
            message = self._peek(partition)
            if message is None:
                break
            sub = partition.pick_subscriber(window)
            if sub is None:
                break
            (partition.retry if partition.retry else partition.ready).popleft()
            self._queued.discard(message.idem)
            if message.expires_at_ms is not None and message.expires_at_ms <= self._now_ms():
                self.stats.expired += 1
                self._spawn(self._settle_quietly(message, MessageState.EXPIRED, "ttl expired"))
                continue
            if not self._deliver(message, sub):
                break
        if (
            not partition.caught_up
            and not partition.fetching
            and len(partition.ready) < self.config.fetch_batch // 2
        ):
            partition.fetching = True
            self._spawn(self._fetch(partition))

    def _peek(self, partition: Partition) -> StoredMessage | None:
        """The next message to deliver, dropping entries settled meanwhile."""
        for queue in (partition.retry, partition.ready):
            while queue:
                message = queue[0]
                if message.idem in self._queued:
                    return message
                queue.popleft()
        return None

    def _deliver(self, message: StoredMessage, sub: Subscription) -> bool:
        sink = sub.session.router.sink_for(sub.name)
        if sink is None:  # pick_subscriber checked it; keep the message if not
            self._partition(message.recipient, message.name).retry.appendleft(message)
            self._queued.add(message.idem)
            return False
        attempt = message.attempts + 1
        leased = replace(message, attempts=attempt)
        loop = self._loop or asyncio.get_running_loop()
        timer = loop.call_later(
            self.config.ack_deadline_ms / 1000, self._lease_expired, message.idem
        )
        self._leases[message.idem] = _Lease(leased, sub, timer)
        sub.in_flight.add(message.idem)
        self.stats.delivered += 1
        if attempt > 1:
            self.stats.redelivered += 1
        sink.push(_delivery(leased, attempt))
        return True

    async def _fetch(self, partition: Partition) -> None:
        """Read the next page of a partition from the store(s) into ``ready``."""
        epoch = partition.epoch
        limit = self.config.fetch_batch
        try:
            while True:
                partition.dirty = False
                after = partition.cursor
                now = self._now_ms()
                rows = await self.store.fetch_ready(
                    partition.recipient, partition.name, after, now, limit
                )
                complete = len(rows) < limit
                if self.volatile is not self.store:
                    extra = await self.volatile.fetch_ready(
                        partition.recipient, partition.name, after, now, limit
                    )
                    complete = complete and len(extra) < limit
                    if extra:
                        rows = sorted([*rows, *extra], key=lambda m: m.block)
                        if len(rows) > limit:
                            rows = rows[:limit]
                            complete = False
                if partition.epoch != epoch:
                    return
                for message in rows:
                    if message.block <= partition.cursor:
                        continue
                    partition.cursor = message.block
                    idem = message.idem
                    if idem in self._leases or idem in self._queued or idem in self._deferred:
                        continue
                    partition.ready.append(message)
                    self._queued.add(idem)
                if complete and not partition.dirty:
                    partition.caught_up = True
                if complete and partition.dirty:
                    continue
                break
        except StoreError:
            log.exception("reading partition %s failed; will retry", partition.name)
            await asyncio.sleep(1.0)
        finally:
            if partition.epoch == epoch:
                partition.fetching = False
        if partition.epoch == epoch:
            self._pump(partition)

    # ------------------------------------------------------------------ leases

    def _lease_expired(self, idem: str) -> None:
        lease = self._leases.get(idem)
        if lease is not None:
            log.debug("ack deadline passed for %s", idem)
            self._requeue(idem, failure="ack deadline passed")

    def _end_lease(self, idem: str) -> _Lease | None:
        lease = self._leases.pop(idem, None)
        if lease is None:
            return None
        lease.timer.cancel()
        sub = lease.subscription
        sub.in_flight.discard(idem)
        self._pump(self._partition(sub.session.app_id, sub.name))
        return lease

    def _requeue_all(self, sub: Subscription) -> None:
        for idem in list(sub.in_flight):
            self._requeue(idem)

    def backoff_ms(self, attempts: int) -> int:
        """How long a message that failed ``attempts`` times waits before the next try."""
        schedule = self.config.redelivery_backoff_ms
        if not schedule:
            return 0
        return schedule[min(max(attempts, 1), len(schedule)) - 1]

    def _requeue(self, idem: str, *, failure: str | None = None) -> int | None:
        """A lease ended without a settlement: deliver again, or dead-letter.

        ``failure`` says the message itself failed (deadline passed, handler
        gave it back): it then waits out the redelivery backoff. Otherwise
        (client gone, paused, unsubscribed) it is delivered again at once.
        Returns when it becomes visible again, or ``None`` if dead-lettered.
        """
        lease = self._leases.pop(idem, None)
        if lease is None:
            return None
        lease.timer.cancel()
        sub = lease.subscription
        sub.in_flight.discard(idem)
        message = lease.message
        partition = self._partition(message.recipient, message.name)
        now = self._now_ms()
        if message.attempts >= self.config.max_deliveries:
            self.stats.dead_lettered += 1
            reason = f"delivery limit reached: {message.attempts} attempts without a settlement" + (
                f" (last: {failure})" if failure else ""
            )
            self._spawn(self._settle_quietly(message, MessageState.DEAD, reason))
            self._pump(partition)
            return None
        delay = self.backoff_ms(message.attempts) if failure is not None else 0
        if delay > 0:
            self._spawn(self._store_reschedule(message, now + delay))
            self._schedule_visible(idem, now + delay)
        else:
            self._spawn(self._store_attempts(message))
            if partition.subscribers:
                partition.retry.append(message)
                self._queued.add(idem)
        self._pump(partition)
        return now + delay

    async def release(self, client_id: str, idem: str, reason: str) -> int | None:
        """Give back a message this app has in flight, unsettled (its handler failed).

        It is delivered again after the redelivery backoff; at
        ``max_deliveries`` it is dead-lettered instead. Returns when it
        becomes visible again (epoch ms), or ``None`` if it was dead-lettered.
        """
        session = self.session(client_id)
        lease = self._leases.get(idem)
        if lease is None or lease.message.recipient != session.app_id:
            await self._find(session, idem)  # "not found" unless it is the caller's
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, f"message {idem} is not in flight")
        return self._requeue(idem, failure=reason[:_MAX_REASON] or "released by the client")

    async def _store_reschedule(self, message: StoredMessage, visible_at_ms: int) -> None:
        try:
            store = await self._home(message)
            await store.reschedule(message.idem, visible_at_ms, message.attempts)
        except StoreError:
            log.warning("could not reschedule %s", message.idem)

    async def _store_attempts(self, message: StoredMessage) -> None:
        try:
            store = await self._home(message)
            await store.record_attempts([(message.idem, message.attempts)])
        except StoreError:
            log.warning("could not record the attempt count of %s", message.idem)

    async def _settle_quietly(
        self, message: StoredMessage, state: MessageState, reason: str
    ) -> None:
        try:
            await (await self._home(message)).settle(message.idem, state, self._now_ms(), reason)
        except StoreError:
            log.exception("could not settle %s as %s", message.idem, state.name)

    # ------------------------------------------------------------------ timers

    def _schedule_visible(self, idem: str, visible_at_ms: int) -> None:
        loop = self._loop or asyncio.get_running_loop()
        old = self._deferred.pop(idem, None)
        if old is not None:
            old.cancel()
        delay_s = max(0.0, (visible_at_ms - self._now_ms()) / 1000)
        self._deferred[idem] = loop.call_later(delay_s, self._deferral_over, idem)

    def _deferral_over(self, idem: str) -> None:
        if self._deferred.pop(idem, None) is not None:
            self._spawn(self._revisit(idem))

    async def _revisit(self, idem: str) -> None:
        """A deferred message became visible: queue it if its partition already
        read past it (otherwise the next store read finds it)."""
        try:
            message = await self.volatile.get(idem)
            if message is None and self.store is not self.volatile:
                message = await self.store.get(idem)
        except StoreError:
            log.exception("could not reload deferred message %s", idem)
            return
        if message is None or message.state is not MessageState.PENDING:
            return
        if idem in self._leases or idem in self._queued or idem in self._deferred:
            return
        partition = self._partitions.get(message.partition)
        if partition is None or not partition.subscribers:
            return
        if message.block <= partition.cursor:
            partition.retry.append(message)
            self._queued.add(idem)
        self._pump(partition)

    def _apps_changed(self) -> None:
        """An app changed in this process: apply it now, not at the next refresh."""
        if self._running:
            self._spawn(self._refresh_apps())

    async def _refresh_apps_forever(self) -> None:
        # The CLI changes apps from another process; reading them a few times a
        # second brings revocations, new keys and rules to connected clients.
        while True:
            await asyncio.sleep(self.config.app_refresh_ms / 1000)
            await self._refresh_apps()

    async def _refresh_apps(self) -> None:
        try:
            apps = {app.name: app for app in await self.store.list_apps()}
        except StoreError:
            log.exception("could not re-read the registered apps")
            return
        for session in list(self._sessions.values()):
            current = apps.get(session.app.name)
            if current is None or current.revoked or current.key_hash != session.app.key_hash:
                log.info(
                    "ending client %s: app %s was revoked or got a new key",
                    session.client_id[:8],
                    session.app.name,
                )
                self._end_session(session, requeue=True)
                continue
            if current != session.app:
                session.app = current
                for sub in list(session.subscriptions.values()):
                    if not allowed(current.subscribe_rules, sub.name):
                        del session.subscriptions[sub.name]
                        self._detach(sub)

    async def _housekeeping(self) -> None:
        """Expire silent sessions and prune old settled messages."""
        interval_s = max(0.05, min(self.config.session_timeout_ms / 3000, 10.0))
        last_prune = 0
        while True:
            await asyncio.sleep(interval_s)
            now = self._now_ms()
            for session in list(self._sessions.values()):
                idle = now - session.last_seen_ms
                if idle > self.config.session_timeout_ms and not session.router.is_attached():
                    log.info("client %s expired after %d ms", session.client_id[:8], idle)
                    self._end_session(session, requeue=True)
            # An idle engine frees the keys whose window has passed.
            self._forget_old_keys(self.config.dedupe_max_keys)
            if now - last_prune > 3_600_000:
                last_prune = now
                for store in self._stores():
                    try:
                        await store.prune(now - self.config.retention_ms)
                    except StoreError:
                        log.exception("pruning settled messages failed")

    # ------------------------------------------------------------------ helpers

    def _partition(self, recipient: str, name: str) -> Partition:
        key = (recipient, name)
        partition = self._partitions.get(key)
        if partition is None:
            partition = Partition(recipient, name)
            self._partitions[key] = partition
        return partition

    def _detach(self, sub: Subscription) -> None:
        partition = self._partition(sub.session.app_id, sub.name)
        if sub in partition.subscribers:
            partition.subscribers.remove(sub)
        self._requeue_all(sub)
        if not partition.subscribers:
            for message in partition.deactivate():
                self._queued.discard(message.idem)
        else:
            self._pump(partition)

    def _end_session(self, session: Session, *, requeue: bool, close_router: bool = True) -> None:
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.client_id, None)
        for sub in list(session.subscriptions.values()):
            self._detach(sub)
        session.subscriptions.clear()
        if close_router:
            session.router.close()
        log.info("client %s disconnected", session.client_id[:8])

    async def _home(self, message: StoredMessage) -> Store:
        """The store holding ``message``: the volatile one is asked first
        because it is an in-memory lookup."""
        if self.volatile is self.store:
            return self.store
        return self.volatile if await self.volatile.get(message.idem) is not None else self.store

    def _stores(self) -> list[Store]:
        return [self.store] if self.volatile is self.store else [self.store, self.volatile]

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def _dedupe_key(sender: str, recipient: str, key: str) -> bytes:
    # A 16-byte digest stands for the three strings: a third of their memory,
    # and the window may hold a hundred thousand keys.
    text = f"{sender}\0{recipient}\0{key}".encode()
    return hashlib.blake2b(text, digest_size=16).digest()


async def _already(idem: str) -> str:
    return idem


def _delivery(message: StoredMessage, attempt: int) -> Delivery:
    return Delivery(
        idem=message.idem,
        name=message.name,
        block=message.block,
        payload=message.payload,
        metadata=message.metadata,
        sender=message.sender,
        created_at_ms=message.created_at_ms,
        attempt=attempt,
    )
