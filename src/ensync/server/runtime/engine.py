"""The engine transports talk to: the core's operations, driven on the loop.

:class:`Engine` is the one place where the core meets asyncio. It

* forwards each operation to the :class:`~ensync.server.core.service.Service`
  and then *drives* the :class:`~ensync.server.core.dispatch.Dispatcher`:
  runs what is due (:meth:`~Dispatcher.tick`), starts the claims and
  releases the dispatcher asks for, and sets one timer for its next
  deadline — never one timer or task per message;
* coalesces the publishes accepted in one turn of the loop into one
  ``append`` (one transaction), answering each once its batch is stored;
* owns every task it starts in one :class:`asyncio.TaskGroup`: :meth:`stop`
  cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ensync.protocol.errors import STORE_UNAVAILABLE
from ensync.server.config import EngineConfig
from ensync.server.core.apps import AppRegistry
from ensync.server.core.dispatch import ClaimRequest, Dispatcher
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.health import StoreHealth
from ensync.server.core.ids import client_tag
from ensync.server.core.model import (
    EngineStatistics,
    EngineStats,
    ReplayResult,
    SessionInfo,
    SessionRouter,
)
from ensync.server.core.observers import Observers, ObserverSink
from ensync.server.core.service import Service
from ensync.server.core.sessions import Session
from ensync.server.runtime.clock import Cancellable, Timer, WallClock
from ensync.server.store.base import (
    Appended,
    NewMessage,
    Release,
    SessionRegistry,
    Store,
    StoreError,
)

__all__ = ["Engine"]

log = logging.getLogger(__name__)

# Settled messages are pruned this often (and soon after start).
_PRUNE_EVERY_S = 3600.0
# Refused subscribes logged already, by (client, name); forgotten when full.
_REFUSALS_LOGGED = 10_000


def _fail(batch: list[tuple[NewMessage, asyncio.Future[str]]], error: ServiceError) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that gave up leaves its answer unread: mark it read.
    if not future.cancelled():
        future.exception()


class Engine:
    """The transport-neutral engine, running.

    Args:
        store: where apps and messages live (opened by the caller).
        config: tunables.
        clock: the time and the timer (tests pass a fake one).

    Call :meth:`start` before use and :meth:`stop` at the end.
    """

    def __init__(
        self,
        store: Store,
        config: EngineConfig | None = None,
        *,
        clock: Timer | None = None,
    ) -> None:
        self._config = config or EngineConfig()
        self.store = store
        self.clock: Timer = clock or WallClock()
        self.stats = EngineStats()
        self._dispatcher = Dispatcher(self._config, self.stats)
        self._service = Service(store, self._config, self.clock, self._dispatcher, self.stats)
        self._service.on_apps_changed = self._refresh_apps_soon
        self.apps: AppRegistry = self._service.apps
        self.observers = Observers(self._config.max_subscriptions_per_client, self.stats)
        self._running = False
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drive_soon = False
        self._timer: Cancellable | None = None
        self._timer_at: int | None = None
        self._batch: list[tuple[NewMessage, asyncio.Future[str]]] = []
        self._refusals_logged: set[tuple[str, str]] = set()
        self._acks: list[tuple[str, str, asyncio.Future[None]]] = []
        self._unwatch: Any = None
        # Claims, releases and appends running now (housekeeping excluded).
        self._work = 0

    @property
    def config(self) -> EngineConfig:
        """The tunables; assigning new ones applies them from the next operation."""
        return self._config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        self._config = config
        self.observers.max_per_client = config.max_subscriptions_per_client
        self._service.configure(config)
        self._dispatcher.configure(config)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start driving the core and the housekeeping (app refresh, pruning)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = self._loop.create_future()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._supervisor = self._loop.create_task(self._supervise(ready), name="ensync-engine")
        await ready
        self._running = True
        self._unwatch = self.store.watch(self._on_ready)
        self._spawn(self._refresh_apps_forever(), "ensync-apps")
        self._spawn(self._prune_forever(), "ensync-prune")
        if isinstance(self.store, SessionRegistry):
            self._spawn(self._renew_sessions_forever(), "ensync-sessions")

    async def stop(self) -> None:
        """End every session (their messages go back), then cancel and await
        every task. Idempotent."""
        if not self._running:
            return
        for session in list(self._dispatcher.sessions.values()):
            self._service.end_session(session)
        releases = self._dispatcher.take_releases()
        if releases:
            await self._service.release_many(releases)
        self._running = False
        if self._unwatch is not None:
            self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        _fail(self._batch, ServiceError(ErrorCode.UNAVAILABLE, "the engine stopped"))
        self._batch.clear()
        for _, _, answer in self._acks:
            if not answer.done():
                answer.set_exception(ServiceError(ErrorCode.UNAVAILABLE, "the engine stopped"))
        self._acks.clear()
        assert self._stopping is not None
        assert self._supervisor is not None
        self._stopping.set_result(None)
        await self._supervisor

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        assert self._stopping is not None
        async with asyncio.TaskGroup() as group:
            self._group = group
            ready.set_result(None)
            await self._stopping
        self._group = None

    def statistics(self) -> EngineStatistics:
        """Gauges for metrics: sessions, leases, partitions, claims, batches."""
        partitions, claiming, waiting = self._dispatcher.gauges()
        delivery_statistics = getattr(self.store, "delivery_statistics", None)
        buffered = delivery_statistics()[1] if callable(delivery_statistics) else 0
        return EngineStatistics(
            buffered=buffered,
            sessions=len(self._dispatcher.sessions),
            in_flight=self._dispatcher.in_flight,
            partitions=partitions,
            claiming=claiming,
            deferred=waiting,
            publishing=len(self._batch),
        )

    def quiescent(self) -> bool:
        """Nothing is in progress: no claim, release or append running, no
        publish waiting for its batch, nothing due that has not been run.
        With a fake clock, tests wait for this instead of sleeping."""
        if self._drive_soon or self._batch or self._acks or self._work:
            return False
        deadline = self._dispatcher.next_deadline()
        return deadline is None or deadline > self.clock.now_ms()

    @property
    def store_health(self) -> StoreHealth:
        """Whether the store takes writes, and its failures so far."""
        return self._service.store_health

    @property
    def sessions(self) -> dict[str, Session]:
        """Live sessions by client id (read only)."""
        return self._dispatcher.sessions

    def backoff_ms(self, attempts: int) -> int:
        """How long a message that failed ``attempts`` times waits before the next try."""
        return self._service.policy.backoff_after(attempts)

    # ------------------------------------------------------------------ sessions

    async def connect(self, app_key: str, router: SessionRouter) -> SessionInfo:
        """Authenticate an app key and open a session routed through ``router``."""
        info = await self._service.connect(app_key, router)
        self._kick()
        return info

    def heartbeat(self, client_id: str) -> bool:
        """Keep a session alive; ``False`` if the client id is unknown."""
        return self._service.heartbeat(client_id)

    async def adopt(self, client_id: str, router: SessionRouter) -> bool:
        """Take over a session another node opened (store shared by several
        nodes); ``True`` if ``client_id`` is a session here now."""
        adopted = await self._service.adopt(client_id, router)
        if adopted:
            self._kick()
        return adopted

    def disconnect(self, client_id: str) -> None:
        """The client is gone: drop its session and requeue what it held."""
        self._service.disconnect(client_id)
        self._kick()

    def routes_changed(self, client_id: str) -> None:
        """A transport opened or closed an outbox of this client."""
        self._service.routes_changed(client_id)
        self._kick()

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
        answer = await self.accept_publish(
            client_id, name, payload, recipient, metadata, payload_metadata
        )
        return await answer

    async def accept_publish(
        self,
        client_id: str,
        name: str,
        payload: str,
        recipient: str,
        metadata: str,
        payload_metadata: str | None = None,
    ) -> asyncio.Future[str]:
        """Check a publish and queue it for the next batch.

        Returns a future of its idem, set once the batch holding it is stored
        (or failing with :class:`ServiceError`). Publishes accepted one after
        the other are numbered, stored and delivered in that order, so a
        transport may pipeline them: await this call in order, await the
        futures in any order.
        """
        message = await self._service.prepare_publish(
            client_id, name, payload, recipient, metadata, payload_metadata
        )
        if not self._running or self._loop is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the engine is shutting down")
        answer: asyncio.Future[str] = self._loop.create_future()
        answer.add_done_callback(_retrieve)
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch.append((message, answer))
        return answer

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        messages = [message for message, _ in batch]

        def appended(outcome: list[Appended] | StoreError) -> None:
            self._work -= 1
            if isinstance(outcome, StoreError):
                self._append_failed(batch, outcome)
            else:
                self._answer_appended(batch, outcome)

        # The store on one machine answers from a callback once the commit is
        # done: no task, and no loop turn between the commit and the answers.
        self._work += 1
        try:
            started = self._service.append_soon(messages, appended)
        except StoreError as exc:
            started = True
            appended(exc)
        except Exception:  # isolation boundary: a bug fails this batch, not the engine
            log.exception("appending a batch of publishes failed")
            self._work -= 1
            _fail(batch, ServiceError(ErrorCode.UNAVAILABLE, "internal error"))
            return
        if not started:
            self._work -= 1
            self._spawn(self._append(batch), "ensync-append", work=True)

    async def _append(self, batch: list[tuple[NewMessage, asyncio.Future[str]]]) -> None:
        try:
            results = await self._service.append([message for message, _ in batch])
        except StoreError as exc:
            self._append_failed(batch, exc)
            return
        except BaseException:
            _fail(batch, ServiceError(ErrorCode.UNAVAILABLE, "the engine stopped"))
            raise
        self._answer_appended(batch, results)

    def _append_failed(
        self, batch: list[tuple[NewMessage, asyncio.Future[str]]], exc: StoreError
    ) -> None:
        _fail(batch, self._service.store_health.failed("publish", exc, count=len(batch)))

    def _answer_appended(
        self, batch: list[tuple[NewMessage, asyncio.Future[str]]], results: list[Appended]
    ) -> None:
        if self.observers:
            self.observers.copy([message for message, _ in batch], results)
        for (_, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue
            if result.error is not None:
                answer.set_exception(ServiceError(ErrorCode.UNAVAILABLE, STORE_UNAVAILABLE))
            else:
                answer.set_result(result.idem)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, client_id: str, name: str) -> None:
        """Start delivering messages of ``name`` to this client."""
        try:
            self._service.subscribe(client_id, name)
        except ServiceError as exc:
            self.refused_subscribe(client_id, name, exc.message)
            raise
        self._kick()

    def refused_subscribe(self, client_id: str, name: str, reason: str) -> None:
        """Count a refused Subscribe; log it once per client and name (a
        client that retries at once must not flood the log)."""
        self.stats.subscribe_refusals += 1
        key = (client_id, name)
        if key in self._refusals_logged:
            return
        if len(self._refusals_logged) >= _REFUSALS_LOGGED:
            self._refusals_logged.clear()
        self._refusals_logged.add(key)
        log.info(
            "subscribe of client %s to %r refused: %s",
            client_tag(client_id) if client_id else "-",
            name[:100],
            reason,
        )

    def observe(self, client_id: str, pattern: str, sink: ObserverSink) -> None:
        """Copy this client's app's new messages matching ``pattern`` to ``sink``,
        without leasing them (core/observers.py)."""
        self.observers.observe(self._service.session(client_id), pattern, sink)

    def unobserve(self, client_id: str, pattern: str, sink: ObserverSink) -> bool:
        """Stop one observation; ``False`` if there was none."""
        return self.observers.unobserve(self._service.session(client_id), pattern, sink)

    def unsubscribe(self, client_id: str, name: str) -> bool:
        """Stop deliveries of ``name`` to this client; ``False`` if it was not subscribed."""
        done = self._service.unsubscribe(client_id, name)
        self._kick()
        return done

    def pause(self, client_id: str, name: str, reason: str = "") -> None:
        """No new deliveries of ``name`` to this client; its unsettled ones go back."""
        self._service.pause(client_id, name, reason)
        self._kick()

    def resume(self, client_id: str, name: str) -> None:
        """Undo :meth:`pause`."""
        self._service.resume(client_id, name)
        self._kick()

    # ------------------------------------------------------------------ settle

    async def ack(self, client_id: str, idem: str) -> None:
        """The message is done (idempotent).

        Acks of one loop turn, from every client, are settled together with
        one store write (one UPDATE transaction instead of one per ack).
        """
        await self.ack_soon(client_id, idem)

    def ack_soon(self, client_id: str, idem: str) -> asyncio.Future[None]:
        """:meth:`ack` without a coroutine: the future of its outcome, for a
        transport that answers from a callback (no task per ack)."""
        if not self._running or self._loop is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the engine is shutting down")
        answer: asyncio.Future[None] = self._loop.create_future()
        answer.add_done_callback(_retrieve)
        if not self._acks:
            self._loop.call_soon(self._flush_acks)
        self._acks.append((client_id, idem, answer))
        return answer

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            self._spawn(self._ack_batch(acks), "ensync-ack", work=True)

    async def _ack_batch(self, acks: list[tuple[str, str, asyncio.Future[None]]]) -> None:
        try:
            outcomes = await self._service.ack_many([(client, idem) for client, idem, _ in acks])
        except BaseException:
            for _, _, answer in acks:
                if not answer.done():
                    answer.set_exception(ServiceError(ErrorCode.UNAVAILABLE, "the engine stopped"))
            raise
        finally:
            self._kick()
        for (_, _, answer), outcome in zip(acks, outcomes, strict=True):
            if answer.done():
                continue
            if outcome is None:
                answer.set_result(None)
            else:
                answer.set_exception(outcome)

    async def discard(self, client_id: str, idem: str, reason: str) -> None:
        """Never deliver this message again; it goes to the app's dead letters."""
        try:
            await self._service.discard(client_id, idem, reason)
        finally:
            self._kick()

    async def defer(self, client_id: str, idem: str, delay_ms: int, reason: str) -> int:
        """Deliver the message again after ``delay_ms``; returns that time (epoch ms)."""
        try:
            return await self._service.defer(client_id, idem, delay_ms, reason)
        finally:
            self._kick()

    async def replay(self, client_id: str, idem: str) -> ReplayResult:
        """Read back any message addressed to the caller's app."""
        return await self._service.replay(client_id, idem)

    async def extend(self, client_id: str, idem: str) -> int:
        """Push back the ack deadline of a message in flight; returns the new one."""
        try:
            return await self._service.extend(client_id, idem)
        finally:
            self._kick()

    async def release(self, client_id: str, idem: str, reason: str) -> int | None:
        """Give back a message in flight, unsettled; ``None`` if dead-lettered."""
        try:
            return await self._service.release(client_id, idem, reason)
        finally:
            self._kick()

    # ------------------------------------------------------------------ driving

    def _on_ready(self, recipient: str, name: str) -> None:
        self._dispatcher.notify(recipient, name)
        self._kick()

    def _kick(self) -> None:
        if self._drive_soon or not self._running or self._loop is None:
            return
        self._drive_soon = True
        self._loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._drive_soon = False
        if not self._running:
            return
        self._dispatcher.tick(self.clock.now_ms())
        for session in self._dispatcher.take_closed():
            log.info("client %s expired", client_tag(session.client_id))
            session.router.close()
        releases = self._dispatcher.take_releases()
        if releases:
            self._spawn(self._release(releases), "ensync-release", work=True)
        for request in list(self._dispatcher.claims()):
            self._spawn(self._claim(request), "ensync-claim", work=True)
        self._arm(self._dispatcher.next_deadline())

    def _arm(self, deadline: int | None) -> None:
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.clock.call_at(deadline, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._timer_at = None
        self._kick()

    async def _claim(self, request: ClaimRequest) -> None:
        recipient, name = request.key
        try:
            claim = await self.store.claim(
                recipient,
                name,
                limit=request.limit,
                now_ms=self.clock.now_ms(),
                policy=self._service.policy,
            )
        except StoreError as exc:
            self._service.store_health.failed("claim", exc)  # and retried
            self._dispatcher.claim_failed(request.key, self.clock.now_ms())
            self._kick()
            return
        except BaseException:
            self._dispatcher.claim_failed(request.key, self.clock.now_ms())
            raise
        self._dispatcher.claimed(request.key, request.limit, claim, self.clock.now_ms())
        releases = self._dispatcher.take_releases()
        if releases:
            await self._service.release_many(releases)
        self._kick()

    async def _release(self, releases: list[tuple[tuple[str, str], Release]]) -> None:
        await self._service.release_many(releases)
        self._kick()

    # ------------------------------------------------------------------ housekeeping

    def _refresh_apps_soon(self) -> None:
        if self._running:
            self._spawn(self._refresh_apps(), "ensync-apps-now")

    async def _refresh_apps_forever(self) -> None:
        # The CLI changes apps from another process; reading them a few times a
        # second brings revocations, new keys and rules to connected clients.
        while True:
            await asyncio.sleep(self.config.app_refresh_ms / 1000)
            await self._refresh_apps()

    async def _refresh_apps(self) -> None:
        try:
            apps = await self.store.list_apps()
            # Dead letters `ensync dlq redrive` returned from another process.
            redriven = await self.store.adopt_redriven()
        except StoreError as exc:
            # Tried again a quarter of a second later; no traceback for an outage.
            self._service.store_health.failed("read apps", exc, write=False)
            return
        if redriven:
            log.info("%d redriven dead letters will be delivered again", redriven)
        self._service.apps_changed(apps)
        self._kick()

    async def _renew_sessions_forever(self) -> None:
        # Sessions other nodes may take over stay registered while they live
        # here (the session sweep ends silent ones): renewed well within
        # their time to live.
        while True:
            await asyncio.sleep(self._service.registry_ttl_ms() / 3000)
            await self._service.register_sessions(list(self._dispatcher.sessions.values()))

    async def _prune_forever(self) -> None:
        delay_s = min(_PRUNE_EVERY_S, max(0.05, self.config.session_timeout_ms / 3000))
        while True:
            await asyncio.sleep(delay_s)
            delay_s = _PRUNE_EVERY_S
            try:
                await self.store.prune(self.clock.now_ms() - self.config.retention_ms)
            except StoreError as exc:
                self._service.store_health.failed("prune", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, *, work: bool = False) -> None:
        if self._group is None:
            coro.close()
            return
        task = self._group.create_task(self._isolated(coro, work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if work:
            self._work += 1

    async def _isolated(self, coro: Coroutine[Any, Any, None], work: bool) -> None:
        # Isolation boundary: one failing piece of background work is logged
        # with its traceback and must not cancel the others (or the group).
        try:
            await coro
        except Exception:
            log.exception("background task failed")
        finally:
            if work:
                self._work -= 1
