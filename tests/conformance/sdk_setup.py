"""The SDK suites' engines: one per transport, and apps to connect as.

Over loopback for the network transports, and once more over the in-memory
transport of ``ensync.testing`` (the engine in this process, no socket).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from ensync import EnSyncClient, EnSyncEngine, Message
from ensync.client.engine import BaseEngine
from ensync.server.core.apps import NewApp
from ensync.server.runtime.engine import Engine
from ensync.testing import MemoryEngine, run_engine, run_memory_engine
from ensync.websocket import EnSyncEngine as WsEngine

# gRPC twice: over the batched session stream, and against an engine without
# it (the SDK falls back to unary calls); WebSocket likewise; and in memory.
TRANSPORTS = ["grpc", "grpc-unary", "ws", "ws-text", "memory"]


class Server(Protocol):
    """The engine under test: served on loopback, or in memory."""

    @property
    def engine(self) -> Engine: ...

    async def create_app(self, name: str) -> NewApp: ...


@dataclass
class Setup:
    server: Server
    make_engine: Callable[..., BaseEngine]
    alice: NewApp
    bob: NewApp
    engines: list[BaseEngine]
    transport: str

    async def connect(self, app: NewApp, **options: Any) -> EnSyncClient:
        engine = self.make_engine(**options)
        self.engines.append(engine)
        return await engine.create_client(app.app_key, app_secret_key=app.secret_key)


@contextlib.asynccontextmanager
async def serving(
    transport: str, ack_deadline_ms: int = 600
) -> AsyncIterator[tuple[Server, Callable[..., BaseEngine]]]:
    """The engine for ``transport``, and how to make SDK engines that reach it."""
    if transport == "memory":
        async with run_memory_engine(ack_deadline_ms=ack_deadline_ms) as in_memory:
            yield in_memory, functools.partial(MemoryEngine, in_memory.engine)
        return
    async with run_engine(
        ack_deadline_ms=ack_deadline_ms, sessions=transport not in ("grpc-unary", "ws-text")
    ) as server:

        def make(**options: Any) -> BaseEngine:
            if transport.startswith("ws"):
                if "heartbeat_interval" in options:
                    options["ping_interval"] = options.pop("heartbeat_interval")
                return WsEngine(server.ws_url, **options)
            return EnSyncEngine(server.grpc_url, **options)

        yield server, make


@contextlib.asynccontextmanager
async def setting_up(transport: str, ack_deadline_ms: int = 600) -> AsyncIterator[Setup]:
    """An engine for ``transport`` with apps alice and bob; SDK engines closed at the end."""
    async with serving(transport, ack_deadline_ms) as (server, make):
        state = Setup(
            server,
            make,
            await server.create_app("alice"),
            await server.create_app("bob"),
            [],
            transport,
        )
        try:
            yield state
        finally:
            for engine in state.engines:
                await engine.close()


@pytest.fixture(params=TRANSPORTS)
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    """`setting_up` once per transport, with a 600 ms ack deadline."""
    async with setting_up(request.param) as state:
        yield state


def collector() -> tuple[list[Message], Callable[[Message], None]]:
    got: list[Message] = []
    return got, got.append
