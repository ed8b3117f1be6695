"""The loop every Python driver of an official client shares.

A driver module defines how to start its client, run one command and close
it; this module reads commands from stdin, writes JSON events to stdout,
bounds the driver's lifetime, and always closes. Drivers run as
``python -m tests.interop.drivers.<name> '<config JSON>'`` from the project root.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "CALL_TIMEOUT_S",
    "CLOSE_TIMEOUT_S",
    "Driver",
    "cancel_leftovers",
    "describe",
    "emit",
    "run",
]

CALL_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 3.0


class Driver(Protocol):
    async def start(self) -> None: ...

    async def run(self, command: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


def emit(event: str, **fields: Any) -> None:
    """Write one JSON event line and flush it at once."""
    sys.stdout.write(json.dumps({"event": event, **fields}, default=repr) + "\n")
    sys.stdout.flush()


def describe(error: BaseException) -> dict[str, str]:
    # The official EnSyncError carries ``error_type`` and ``message``.
    return {
        "error": str(getattr(error, "message", error)),
        "error_type": str(getattr(error, "error_type", type(error).__name__)),
    }


async def cancel_leftovers() -> None:
    """Cancel every task but this one: official clients leave tasks behind on close."""
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    if leftovers:
        await asyncio.wait(leftovers, timeout=CLOSE_TIMEOUT_S)


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _serve(driver: Driver) -> None:
    await driver.start()
    reader = await _commands()
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("op") == "close":
            emit("result", id=command.get("id"), op="close", ok=True, value=None)
            return
        # Sequential on purpose: the test sees results in command order.
        await driver.run(command)


async def run(package: str, make_driver: Callable[[Any], Driver], lifetime_s: float) -> int:
    """Import the official ``package``, drive it until ``close``, end of input or
    ``lifetime_s``; returns the exit code."""
    try:
        # The official packages have no type hints: everything they give is Any.
        sdk: Any = importlib.import_module(package)
    except ImportError as error:
        emit("fatal", error=f"the official client is not installed: {error}", error_type="Import")
        return 1
    driver = make_driver(sdk)
    lifetime = asyncio.timeout(lifetime_s)
    code = 0
    try:
        async with lifetime:
            await _serve(driver)
    # Isolation boundary: whatever the official client raises ends the driver
    # with a report the test reads, never with a bare traceback.
    except Exception as error:  # noqa: BLE001
        if lifetime.expired():
            emit("fatal", error=f"lifetime of {lifetime_s} s exceeded", error_type="Timeout")
        else:
            emit("fatal", **describe(error))
        code = 1
    finally:
        await driver.close()
        emit("closed")
    return code
