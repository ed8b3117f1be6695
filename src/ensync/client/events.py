"""A tiny event emitter for ``engine.on("disconnect" | "reconnect" | "error", ...)``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ensync.client.tasks import TaskOwner

__all__ = ["EVENTS", "EventEmitter", "EventName"]

log = logging.getLogger(__name__)

EventName = Literal["disconnect", "reconnect", "error"]
EVENTS: tuple[EventName, ...] = ("disconnect", "reconnect", "error")


class EventEmitter:
    """Calls listeners (plain functions or coroutine functions) on events.

    A coroutine listener runs as a task the emitter owns: `close` cancels
    and awaits those still running.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[..., Any]]] = {name: [] for name in EVENTS}
        self._tasks = TaskOwner()

    def on(self, event: EventName, callback: Callable[..., Any]) -> Callable[[], None]:
        """Register ``callback``; returns a function that removes it."""
        if event not in self._listeners:
            raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENTS)}")
        self._listeners[event].append(callback)

        def remove() -> None:
            if callback in self._listeners[event]:
                self._listeners[event].remove(callback)

        return remove

    def has_listeners(self, event: EventName) -> bool:
        """Whether anyone listens to ``event``."""
        return bool(self._listeners[event])

    def emit(self, event: EventName, *args: Any) -> None:
        """Call every listener; a listener's failure is logged, never propagated."""
        for callback in list(self._listeners[event]):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    started = self._tasks.start(
                        _listen(event, result), name=f"ensync-{event}-listener"
                    )
                    if started is None and inspect.iscoroutine(result):
                        result.close()  # closed emitter: the listener does not run
            except Exception:  # isolation boundary: user code
                log.exception("%s listener failed", event)

    async def close(self) -> None:
        """Cancel the listeners still running and wait for them.

        Later events call plain listeners only.
        """
        await self._tasks.close()


async def _listen(event: str, listener: Awaitable[Any]) -> None:
    try:
        await listener
    except Exception:  # isolation boundary: user code
        log.exception("%s listener failed", event)
