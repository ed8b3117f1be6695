"""A clock for the engine that moves only when a test says so."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FakeClock"]


@dataclass(eq=False)
class _Timer:
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class FakeClock:
    """Epoch milliseconds that stand still; :meth:`advance` moves them and
    fires the timers that came due, in order. Pass it as ``Engine(clock=...)``."""

    now: int = 1_700_000_000_000
    _timers: list[tuple[int, int, _Timer]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def now_ms(self) -> int:
        return self.now

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self._timers, (when_ms, next(self._seq), timer))
        return timer

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` and fire every timer due by then."""
        target = self.now + ms
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.callback()
        self.now = target

    def pending(self) -> list[int]:
        """When the live timers are due."""
        return sorted(when for when, _, timer in self._timers if not timer.cancelled)
