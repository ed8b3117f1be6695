"""The runtime's clock: epoch milliseconds and one kind of timer.

The core only asks :class:`~ensync.server.core.model.Clock` for the time;
the runtime also needs to be woken at a time. Tests hand the engine a fake
clock (``tests/support/clock.py``) that only moves when told to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Cancellable", "Timer", "WallClock", "wall_clock_ms"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timer(Protocol):
    """A clock that can also call back at a time."""

    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Cancellable:
        """Call ``callback`` once, on the running loop, at ``when_ms`` or soon after."""
        ...


class WallClock:
    """The real time, with timers on the running event loop."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Cancellable:
        delay_s = max(0.0, (when_ms - self.now_ms()) / 1000)
        return asyncio.get_running_loop().call_later(delay_s, callback)


def wall_clock_ms() -> int:
    """Epoch milliseconds, now."""
    return time.time_ns() // 1_000_000
