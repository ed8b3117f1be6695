"""The event loop ensync's own programs run on: the standard loop, or uvloop
when ``ENSYNC_LOOP=uvloop`` asks for it (and it is installed).

uvloop makes a loopback round trip about 2.5 times cheaper in CPU, but it is
not the default yet: under a connection flood, an engine on uvloop let
hostile gRPC connections wait past the handshake deadline (its gRPC
listener refused ~650 of 900 connections over its cap at once, where the
standard loop refused all 900; docs/performance.md, "The event loop").

The SDK runs on either: an application chooses its own loop (for example
``uvloop.run(main())``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "run"]

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when ``ENSYNC_LOOP=uvloop`` and it is
    installed; ``None`` (the standard loop) otherwise."""
    if os.environ.get("ENSYNC_LOOP", "").strip().lower() != "uvloop":
        return None
    try:
        import uvloop  # optional: no wheel on some platforms
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: what :func:`run` runs on."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
