"""A tiny event emitter for ``engine.on("disconnect" | "reconnect" | "error", ...)``."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["EVENTS", "EventEmitter", "EventName"]

log = logging.getLogger(__name__)

EventName = Literal["disconnect", "reconnect", "error"]
EVENTS: tuple[EventName, ...] = ("disconnect", "reconnect", "error")


class EventEmitter:
    """Calls listeners (plain functions or coroutine functions) on events."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[..., Any]]] = {name: [] for name in EVENTS}
        self._tasks: set[asyncio.Task[Any]] = set()

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
        return bool(self._listeners[event])

    def emit(self, event: EventName, *args: Any) -> None:
        """Call every listener; a listener's failure is logged, never propagated."""
        for callback in list(self._listeners[event]):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            except Exception:  # isolation boundary: user code
                log.exception("%s listener failed", event)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event listener failed", exc_info=task.exception())
