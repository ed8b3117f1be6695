"""The driver: the core, the store, the clock and the operations, wired and run.

:class:`Engine` is the one place where the core meets asyncio. It

* makes the core (:class:`~ensync.server.core.service.Service` over the
  :class:`~ensync.server.core.dispatch.Dispatcher`) and the
  :class:`~ensync.server.runtime.operations.Operations` that transports call;
* *drives* the dispatcher once per loop turn after anything changed: runs
  what is due (:meth:`~Dispatcher.tick`), starts the claims and releases it
  asks for, and sets one timer for its next deadline — never one timer or
  task per message;
* owns every task it or the operations start in one
  :class:`asyncio.TaskGroup`: :meth:`stop` cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any

from ensync.server.config import EngineConfig
from ensync.server.core.apps import AppRegistry
from ensync.server.core.dispatch import ClaimRequest, Dispatcher
from ensync.server.core.health import StoreHealth
from ensync.server.core.ids import client_tag
from ensync.server.core.model import EngineStatistics, EngineStats
from ensync.server.core.observers import Observers
from ensync.server.core.service import Service
from ensync.server.core.sessions import Session
from ensync.server.runtime.clock import Cancellable, Timer, WallClock
from ensync.server.runtime.housekeeping import Housekeeping
from ensync.server.runtime.operations import Operations
from ensync.server.store.base import Release, Store, StoreError

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """The transport-neutral engine, running.

    Args:
        store: where apps and messages live (opened by the caller).
        config: tunables.
        clock: the time and the timer (tests pass a fake one).

    Call :meth:`start` before use and :meth:`stop` at the end; transports
    call :attr:`operations`.
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
        self.apps: AppRegistry = self._service.apps
        self.observers = Observers(self._config.max_subscriptions_per_client, self.stats)
        self.operations = Operations(
            self._service,
            self.observers,
            spawn=functools.partial(self._spawn, work=True),
            changed=self._kick,
        )
        self._housekeeping = Housekeeping(
            self._service, self.clock, lambda: self._config, self._kick
        )
        self._service.admission.on_apps_changed = lambda: self._spawn(
            self._housekeeping.refresh_apps(), "ensync-apps-now"
        )
        self._running = False
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drive_soon = False
        self._timer: Cancellable | None = None
        self._timer_at: int | None = None
        self._unwatch: Any = None
        # Claims, releases and settlements running now (housekeeping excluded).
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

    @property
    def store_health(self) -> StoreHealth:
        """Whether the store takes writes, and its failures so far."""
        return self._service.store_health

    @property
    def sessions(self) -> dict[str, Session]:
        """Live sessions by client id (read only)."""
        return self._dispatcher.sessions

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start driving the core, the operations and the housekeeping."""
        self._loop = asyncio.get_running_loop()
        self._stopping = self._loop.create_future()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._supervisor = self._loop.create_task(self._supervise(ready), name="ensync-engine")
        await ready
        self._running = True
        self.operations.open()
        self._unwatch = self.store.watch(self._on_ready)
        for name, loop in self._housekeeping.loops().items():
            self._spawn(loop(), name)

    async def stop(self) -> None:
        """End every session (their messages go back), then cancel and await
        every task. Idempotent."""
        if not self._running:
            return
        for session in list(self._dispatcher.sessions.values()):
            self._service.admission.end_session(session)
        releases = self._dispatcher.leases.take_releases()
        if releases:
            await self._service.release_many(releases)
        self._running = False
        self.operations.close()
        if self._unwatch is not None:
            self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
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
            in_flight=len(self._dispatcher.leases),
            partitions=partitions,
            claiming=claiming,
            deferred=waiting,
            publishing=self.operations.batches.waiting,
        )

    def quiescent(self) -> bool:
        """Nothing is in progress: no claim, release, settlement or append
        running, no publish or ack waiting for its batch, nothing due that
        has not been run. With a fake clock, tests wait for this instead of
        sleeping."""
        if self._drive_soon or self._work or self.operations.batches.busy:
            return False
        deadline = self._dispatcher.next_deadline()
        return deadline is None or deadline > self.clock.now_ms()

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
        releases = self._dispatcher.leases.take_releases()
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
        releases = self._dispatcher.leases.take_releases()
        if releases:
            await self._service.release_many(releases)
        self._kick()

    async def _release(self, releases: list[tuple[tuple[str, str], Release]]) -> None:
        await self._service.release_many(releases)
        self._kick()

    # ------------------------------------------------------------------ tasks

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, *, work: bool = False) -> None:
        """Run ``coro`` as a task of the engine's group; ``work``: counted as
        work in progress (see :meth:`quiescent`)."""
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
            coro.close()  # cancelled before it ran: not a coroutine never awaited
            if work:
                self._work -= 1
