"""Fixtures for testing applications that use ensync (a pytest plugin).

Installed with ensync and active in every pytest run (the ``pytest11`` entry
point); the fixtures are async, so the project needs ``pytest-asyncio``::

    async def test_an_order_reaches_the_warehouse(ensync_app) -> None:
        shop = await ensync_app("shop")
        warehouse = await ensync_app("warehouse")
        sub = await warehouse.client.subscribe("orders/created")
        await shop.client.publish("orders/created", [warehouse.app_id], {"id": 1})
        message = await sub.get(timeout=5)
        assert message.payload == {"id": 1}

* ``ensync_engine``: an engine in the test's process on free loopback ports
  with the memory store (a `TestServer`: ``grpc_url``,
  ``ws_url``, ``create_app``), stopped after the test.
* ``ensync_app``: a factory; ``await ensync_app(name)`` registers an app on
  that engine and returns an `AppClient` (its ``client``, connected
  with the app's secret key, ``app_id`` and keys); ``transport="ws"`` for
  WebSocket, ``transport="memory"`` for a client in the test's process that
  reaches the engine without a socket. Every client is closed after the test.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from ensync.client.client import EnSyncClient
    from ensync.testing import TestServer

__all__ = ["AppClient", "ensync_app", "ensync_engine"]

try:
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio

    def _async_fixture(function: Callable[..., Any]) -> Any:
        @pytest.fixture(name=function.__name__)
        def missing() -> None:
            raise pytest.UsageError(
                f"ensync's {function.__name__} fixture is async: pip install pytest-asyncio"
            )

        return missing


@dataclass(frozen=True, slots=True)
class AppClient:
    """An app registered on the test engine, and its connected client."""

    name: str
    app_id: str
    app_key: str
    secret_key: str
    client: EnSyncClient


@_async_fixture
async def ensync_engine() -> AsyncIterator[TestServer]:
    """An engine on free loopback ports (memory store), for one test."""
    from ensync.testing import run_engine

    async with run_engine() as server:
        yield server


@_async_fixture
async def ensync_app(
    ensync_engine: TestServer,
) -> AsyncIterator[Callable[..., Awaitable[AppClient]]]:
    """A factory of apps, each with a connected client.

    In a test: ``app = await ensync_app("shop")``.
    """
    from ensync import EnSyncEngine
    from ensync.testing.memory import MemoryEngine
    from ensync.websocket import EnSyncEngine as WsEngine

    engines: list[Any] = []
    numbers = itertools.count(1)

    async def make(
        name: str | None = None,
        *,
        transport: Literal["grpc", "ws", "memory"] = "grpc",
        **options: Any,
    ) -> AppClient:
        app = await ensync_engine.create_app(name or f"app-{next(numbers)}")
        engine: Any
        if transport == "ws":
            engine = WsEngine(ensync_engine.ws_url, **options)
        elif transport == "memory":
            engine = MemoryEngine(ensync_engine.engine, **options)
        else:
            engine = EnSyncEngine(ensync_engine.grpc_url, **options)
        engines.append(engine)
        client = await engine.create_client(app.app_key, app_secret_key=app.secret_key)
        return AppClient(app.name, app.app_id, app.app_key, app.secret_key, client)

    try:
        yield make
    finally:
        for engine in engines:
            await engine.close()
