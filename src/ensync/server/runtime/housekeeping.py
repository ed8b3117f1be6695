"""The engine's periodic work: re-reading apps, renewing sessions, pruning.

None of it is on the path of a message. Each loop runs as a task the driver
owns and ends when the driver stops; a store failure is counted, logged
once a second, and tried again at the next turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ensync._tasks import raise_if_cancelled
from ensync.server.config import EngineConfig
from ensync.server.core.service import Service
from ensync.server.runtime.clock import Timer
from ensync.server.store.base import SessionRegistry, StoreError

__all__ = ["Housekeeping"]

log = logging.getLogger(__name__)

# Settled messages are pruned this often (and soon after start).
_PRUNE_EVERY_S = 3600.0


class Housekeeping:
    """The periodic loops of one engine; `loops` lists them for the driver
    to run, `refresh_apps` re-reads the apps at once (a change made here)."""

    def __init__(
        self,
        service: Service,
        clock: Timer,
        config: Callable[[], EngineConfig],
        changed: Callable[[], None],
    ) -> None:
        self._service = service
        self._store = service.store
        self._clock = clock
        self._config = config
        self._changed = changed

    def loops(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """The loops to run, by task name."""
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "ensync-apps": self._refresh_apps_forever,
            "ensync-prune": self._prune_forever,
        }
        if isinstance(self._store, SessionRegistry):
            loops["ensync-sessions"] = self._renew_sessions_forever
        return loops

    async def refresh_apps(self) -> None:
        """Read the registered apps (and dead letters redriven from another
        process) and apply them: revocations, new keys, new rules."""
        try:
            apps = await self._store.list_apps()
            redriven = await self._store.adopt_redriven()
        except StoreError as exc:
            # Tried again a quarter of a second later; no traceback for an outage.
            self._service.store_health.failed("read apps", exc, write=False)
            return
        if redriven:
            log.info("%d redriven dead letters will be delivered again", redriven)
        self._service.admission.apps_changed(apps)
        self._changed()

    async def _refresh_apps_forever(self) -> None:
        # The CLI changes apps from another process; reading them a few times a
        # second brings revocations, new keys and rules to connected clients.
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self._config().app_refresh_ms / 1000)
            await self.refresh_apps()

    async def _renew_sessions_forever(self) -> None:
        # Sessions other nodes may take over stay registered while they live
        # here (the session sweep ends silent ones): renewed well within
        # their time to live.
        admission = self._service.admission
        while True:
            raise_if_cancelled()
            await asyncio.sleep(admission.registry_ttl_ms() / 3000)
            await admission.register_sessions(list(admission.dispatcher.sessions.values()))

    async def _prune_forever(self) -> None:
        delay_s = min(_PRUNE_EVERY_S, max(0.05, self._config().session_timeout_ms / 3000))
        while True:
            raise_if_cancelled()
            await asyncio.sleep(delay_s)
            delay_s = _PRUNE_EVERY_S
            try:
                await self._store.prune(self._clock.now_ms() - self._config().retention_ms)
            except StoreError as exc:
                self._service.store_health.failed("prune", exc)
