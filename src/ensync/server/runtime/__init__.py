"""The engine's runtime: the driver that runs the core on the event loop,
and the assembly of store, core and listeners into a serving engine."""

from __future__ import annotations

from .clock import Cancellable, Timer, WallClock
from .engine import Engine
from .server import RunningServer, parse_address, running_server

__all__ = [
    "Cancellable",
    "Engine",
    "RunningServer",
    "Timer",
    "WallClock",
    "parse_address",
    "running_server",
]
