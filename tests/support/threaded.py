"""An engine served on a background thread, for tests that have no event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ensync.server.core.apps import NewApp
from ensync.testing import TestServer, run_engine

_T = TypeVar("_T")


@dataclass
class ThreadedEngine:
    """`run_engine` on a thread of its own; calls into it block."""

    server: TestServer
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event = field(repr=False)

    def run(self, work: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    def inspect(self, read: Callable[[], _T]) -> _T:
        """``read()`` on the engine's thread (its state is the loop's)."""

        async def call() -> _T:
            return read()

        return self.run(call())

    def create_app(self, name: str) -> NewApp:
        return self.run(self.server.create_app(name))


@contextlib.contextmanager
def engine_in_thread(**options: Any) -> Iterator[ThreadedEngine]:
    """Serve an engine (`run_engine` options) on a thread until the block ends."""
    ready: list[ThreadedEngine] = []
    failed: list[BaseException] = []
    started = threading.Event()

    async def serve() -> None:
        async with run_engine(**options) as server:
            stop = asyncio.Event()
            ready.append(ThreadedEngine(server, asyncio.get_running_loop(), stop))
            started.set()
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            failed.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=main, name="test-engine", daemon=True)
    thread.start()
    started.wait(60)
    if not ready:
        thread.join(10)
        raise RuntimeError(f"the engine did not start: {failed!r}")
    served = ready[0]
    try:
        yield served
    finally:
        served.loop.call_soon_threadsafe(served.stop.set)
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError("the engine's thread did not stop")
