"""An engine stops even when an await in its housekeeping loses the cancellation."""

from __future__ import annotations

import asyncio
import dataclasses

from ensync.server.config import EngineConfig
from ensync.server.runtime.engine import Engine
from ensync.server.store import MemoryStore
from ensync.server.store.base import AppRecord
from tests.support.clock import FakeClock


class SwallowingStore(MemoryStore):
    """A store whose app read loses its caller's cancellation, as an await on
    ``asyncio.wait_for`` does on Python 3.11 when the answer comes in the same
    loop turn as the cancel (nats-py's requests await it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.swallowed = 0

    async def list_apps(self) -> list[AppRecord]:
        self.reading.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1  # the answer "arrived with the cancel"
        return await super().list_apps()


async def test_an_engine_stops_though_its_app_refresh_missed_the_cancel() -> None:
    store = SwallowingStore()
    await store.open()
    config = dataclasses.replace(EngineConfig(), app_refresh_ms=10)
    engine = Engine(store, config, clock=FakeClock())
    await engine.start()
    try:
        async with asyncio.timeout(5):
            await store.reading.wait()
        async with asyncio.timeout(5):
            await engine.stop()
        assert store.swallowed == 1
    finally:
        await store.close()
