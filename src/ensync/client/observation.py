"""Watching an app's new messages without taking them (``EnSyncClient.observe``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from ensync import errors
from ensync.client.messages import open_message
from ensync.client.transport import Delivery
from ensync.crypto import OpeningKey
from ensync.models import Message

__all__ = ["Observation"]

# Copies kept for a reader that is behind; past that they are counted in
# ``missed`` and dropped (an observer must never hold the engine back).
MAX_WAITING = 10_000


class Observation:
    """Copies of the app's new messages whose names match a pattern.

    The app's subscribers get every message exactly as if nobody watched:
    a copy carries no lease and has nothing to ack (``message.attempt`` is
    0). Made by `EnSyncClient.observe`; iterate it, and close it (or
    use ``async with``) when done::

        async with await client.observe("orders/#") as watching:
            async for message in watching:
                print(message.message_name, message.payload)

    Copies start with the messages stored after ``observe`` returned; one
    that cannot be decrypted raises `EnSyncMessageError` from the
    iteration, and the next ``anext`` goes on with the following copy.
    """

    def __init__(
        self,
        pattern: str,
        key: OpeningKey,
        stop: Callable[[str], Awaitable[None]],
    ) -> None:
        self.pattern = pattern
        self.missed = 0
        """Copies this client did not get because it read too slowly (counted
        by the engine and by this observation)."""
        self._key = key
        self._stop = stop
        self._waiting: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._failure: errors.EnSyncError | None = None
        self._closed = False

    # ------------------------------------------------------------------ Observer

    def copied(self, delivery: Delivery) -> None:
        """One copy arrived (kept for the iteration, or counted in ``missed``)."""
        if self._closed:
            return
        if len(self._waiting) >= MAX_WAITING:
            self.missed += 1
            return
        self._waiting.append(delivery)
        self._arrived.set()

    def dropped(self, count: int) -> None:
        """The engine dropped ``count`` copies for this client."""
        self.missed += count

    def fail(self, error: errors.EnSyncError) -> None:
        """The connection failed for good: the iteration raises ``error``."""
        self._failure = error
        self._arrived.set()

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        while not self._waiting:
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            self._arrived.clear()
            await self._arrived.wait()
        return open_message(self._waiting.popleft(), self._key)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop the copies; a waiting iteration ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._waiting.clear()
        self._arrived.set()
        await self._stop(self.pattern)

    async def __aenter__(self) -> Observation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
