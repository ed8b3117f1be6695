"""Driving an engine on a fake clock, without a transport."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ensync.server.config import EngineConfig
from ensync.server.core.apps import NewApp
from ensync.server.runtime.engine import Engine
from ensync.server.store import MemoryStore
from ensync.server.store.base import Store
from tests.support.clock import FakeClock
from tests.support.engine_calls import Calls
from tests.unit.server.fakes import FakeRouter, envelope

__all__ = ["Factory", "World", "make_engine", "quiet", "world"]

Factory = Callable[..., Awaitable[Engine]]


async def quiet(engine: Engine, *, rounds: int = 3) -> None:
    """Wait until the engine has nothing in progress and nothing due, for a
    few loop turns in a row: "nothing happened" is then proved, not hoped."""
    calm = 0
    for _ in range(20_000):
        calm = calm + 1 if engine.quiescent() else 0
        if calm >= rounds:
            return
        # A store on threads (sqlite) needs real time; memory needs turns.
        await asyncio.sleep(0.001 if calm else 0)
    raise AssertionError("the engine never went quiet")


@pytest.fixture
async def make_engine() -> AsyncIterator[Factory]:
    engines: list[Engine] = []

    async def make(
        store: Store | None = None, clock: FakeClock | None = None, **options: Any
    ) -> Engine:
        if store is None:
            store = MemoryStore()
            await store.open()
        config = dataclasses.replace(EngineConfig(), **options)
        engine = Engine(store, config, clock=clock or FakeClock())
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()
        await engine.store.close()


@dataclasses.dataclass
class World:
    engine: Engine
    alice: NewApp
    bob: NewApp
    carol: NewApp

    @property
    def clock(self) -> FakeClock:
        assert isinstance(self.engine.clock, FakeClock)
        return self.engine.clock

    async def client(self, app: NewApp, router: FakeRouter | None = None) -> tuple[str, FakeRouter]:
        router = router or FakeRouter()
        info = await Calls(self.engine).connect(app.app_key, router)
        return info.client_id, router

    async def publish(
        self,
        client_id: str,
        to: NewApp,
        name: str = "orders/created",
        metadata: str = '{"persist":true,"headers":{}}',
    ) -> str:
        return await Calls(self.engine).publish(
            client_id, name, envelope(to.app_id), to.app_id, metadata
        )

    async def advance(self, ms: int) -> None:
        """Let ``ms`` pass, then wait until everything it caused is done."""
        await quiet(self.engine)
        self.clock.advance(ms)
        await quiet(self.engine)


@pytest.fixture
async def world(make_engine: Factory) -> World:
    engine = await make_engine(ack_deadline_ms=300, redelivery_backoff_ms=(0, 1_000))
    apps = [await engine.apps.create(name) for name in ("alice", "bob", "carol")]
    return World(engine, *apps)
