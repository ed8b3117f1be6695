"""The engine's runtime: the driver that runs the core on the event loop."""

from __future__ import annotations

from ensync.server.runtime.clock import Cancellable, Timer, WallClock, wall_clock_ms
from ensync.server.runtime.engine import Engine
from ensync.server.runtime.operations import Operations

__all__ = ["Cancellable", "Engine", "Operations", "Timer", "WallClock", "wall_clock_ms"]
