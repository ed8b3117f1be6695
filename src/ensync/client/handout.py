"""Opened messages waiting for the code that takes them: ``async for``, ``get``, ``fetch``."""

from __future__ import annotations

import asyncio

from ensync import errors
from ensync.models import Message

__all__ = ["Handout"]


class Handout:
    """A subscription's messages for loops and pulls, in arrival order.

    Several takers may wait at once; each message goes to one of them. Once
    `end` is called, takers get what is left, then None (or the failure).
    """

    __slots__ = ("_ended", "_failure", "_queue", "waiting")

    def __init__(self) -> None:
        # None wakes a taker to look again.
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._ended = False
        self._failure: errors.EnSyncError | None = None
        self.waiting = 0  # takers waiting for a message right now

    def __len__(self) -> int:
        return self._queue.qsize()

    async def put(self, message: Message) -> None:
        """Hand ``message`` to the next taker."""
        await self._queue.put(message)

    async def take(self, timeout_s: float | None = None) -> Message | None:
        """The next message; None once ended and empty.

        Raises:
            TimeoutError: ``timeout_s`` passed first.
            EnSyncError: the failure `end` was given, once nothing is left.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self._ended and self._queue.empty():
                if self._failure is not None:
                    raise self._failure
                return None
            self.waiting += 1
            try:
                if deadline is None:
                    message = await self._queue.get()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0 and self._queue.empty():
                        raise TimeoutError
                    async with asyncio.timeout(max(remaining, 0)):
                        message = await self._queue.get()
            finally:
                self.waiting -= 1
            if message is not None:
                return message

    def end(self, failure: errors.EnSyncError | None = None) -> None:
        """Nothing more comes: waiting takers look again, and end (raising ``failure``)."""
        self._ended = True
        if failure is not None:
            self._failure = failure
        for _ in range(self.waiting):
            self._queue.put_nowait(None)
