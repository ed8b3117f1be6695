"""Test timing: every timeout derives from one constant that
``ENSYNC_TEST_TIME_SCALE`` can stretch on a slow machine."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

__all__ = ["SCALE", "eventually", "seconds"]

SCALE = float(os.environ.get("ENSYNC_TEST_TIME_SCALE", "1"))


def seconds(value: float) -> float:
    """``value`` seconds, scaled for this machine."""
    return value * SCALE


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + seconds(timeout_s)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)
