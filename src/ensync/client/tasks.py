"""Who owns the SDK's tasks: every long-lived component, through a `TaskOwner`.

A component (a connection, a session, a transport, a subscription) starts
its tasks with ``owner.start(...)`` and ends them with ``await
owner.close()``, which cancels whatever still runs and waits until all of it
has finished: a closed component leaves no task behind.

Why not an `asyncio.TaskGroup`? A group needs a task of its own sitting in
``async with`` for the component's whole life, and one failing task cancels
all the others: a session whose reader hit a bug would lose its writer, a
connection would lose its heartbeat. Here a task that fails is logged with
its traceback and the others go on; failures the component must act on are
handled inside the task itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskOwner"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class TaskOwner:
    """The tasks of one component; `close` cancels and awaits them all.

    For example:

        tasks = TaskOwner()
        tasks.start(self._read(), name="ensync-reader")
        ...
        await tasks.close()
    """

    __slots__ = ("_closed", "_tasks")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        """Whether `close` was called: no task starts any more."""
        return self._closed

    def start(self, coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T] | None:
        """Run ``coro`` as a task of this owner.

        Once the owner is closed: ``None``, and ``coro`` is closed, never run.
        """
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # A bug in the SDK (expected failures are handled in the task):
            # said once, with its traceback, instead of "never retrieved".
            log.error("task %s failed", task.get_name(), exc_info=error)

    async def wait(self, timeout_s: float, *others: asyncio.Future[Any]) -> None:
        """Wait up to ``timeout_s`` for the tasks (and ``others``) to finish on their own.

        Nothing is cancelled.
        """
        pending = {*self._tasks, *others}
        if pending and timeout_s > 0:
            await asyncio.wait(pending, timeout=timeout_s)

    async def close(self) -> None:
        """Cancel every task still running and wait until all have ended.

        Idempotent; no task starts after it.

        Called from one of the owner's own tasks (a listener closing its
        engine), that task is left to finish by itself.
        """
        self._closed = True
        current = asyncio.current_task()
        while tasks := [task for task in self._tasks if task is not current]:
            for task in tasks:
                task.cancel()
            # Our own cancellation (close() cancelled) propagates from here.
            await asyncio.wait(tasks)
