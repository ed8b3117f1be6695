"""The engine's runtime: the driver that runs the core on the event loop."""

from __future__ import annotations

from .clock import Cancellable, Timer, WallClock, wall_clock_ms
from .engine import Engine

__all__ = ["Cancellable", "Engine", "Timer", "WallClock", "wall_clock_ms"]
