"""How many calls one connection has on the wire at once.

An engine bounds what one connection may have in progress (gRPC: HTTP/2
``MAX_CONCURRENT_STREAMS``; WebSocket: commands awaiting an answer). A client
that goes past that bound gets streams refused or replies delayed past its
own timeout, and either would be mistaken for a broken link. So each
transport puts its calls through a `CallLimiter` sized below the
engine's bound: at most ``limit`` calls are on the wire, the others wait in
arrival order. Waiting does not count against a call's timeout: the timeout
measures the engine, not the caller's own concurrency.

The queue holds nothing but the waiting callers themselves, so it is as
bounded as the caller's concurrency: ten thousand ``publish`` calls gathered
at once are ten thousand suspended coroutines, and each is sent as soon as a
slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = ["CallLimiter", "LimiterStatistics"]


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a `CallLimiter`."""

    limit: int
    in_flight: int
    waiting: int


class CallLimiter:
    """At most ``limit`` calls at once; the rest wait their turn, first come first served.

    For example:

        limiter = CallLimiter(64)
        async with limiter.slot():
            await send_and_wait_for_answer()
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._limit = limit
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed: BaseException | None = None

    def resize(self, limit: int) -> None:
        """Change the bound (the engine advertised its own); waiters move up at once."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._limit = limit
        self._wake()

    def statistics(self) -> LimiterStatistics:
        """The bound, the calls in flight and the calls waiting."""
        return LimiterStatistics(self._limit, self._in_flight, len(self._waiters))

    def try_acquire(self) -> bool:
        """Take a slot if one is free right now (nobody waiting).

        The caller must `release` it. The fast path of `slot`.
        """
        if self._closed is None and self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot (see `slot` for what may be raised).

        The caller must `release` it.
        """
        await self._acquire()

    def release(self) -> None:
        """Give back a slot taken with `try_acquire` or `acquire`."""
        self._in_flight -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block.

        Raises:
            The ``cause`` given to `close`, if the limiter was closed
            (its connection ended) before or while this call waited.
        """
        await self._acquire()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._wake()

    def close(self, cause: BaseException) -> None:
        """Fail every waiting call, and every later one, with ``cause``."""
        self._closed = cause
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(cause)

    async def _acquire(self) -> None:
        if self._closed is not None:
            raise self._closed
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed over just as the caller gave up: pass it on.
                self._in_flight -= 1
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._in_flight += 1
            waiter.set_result(None)
