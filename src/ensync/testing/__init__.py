"""Helpers for testing code that uses ensync: engines for tests to talk to.

A real engine on a free port, or one in the test's own process that
clients reach without sockets. For example:

    from ensync import EnSyncEngine
    from ensync.testing import run_engine

    async with run_engine() as server:
        alice = await server.create_app("alice")
        engine = EnSyncEngine(server.grpc_url)
        client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)

or, with no socket at all (`run_memory_engine`, `MemoryEngine`):

    async with run_memory_engine() as server:
        alice = await server.create_app("alice")
        engine = server.client_engine()
        client = await engine.create_client(alice.app_key, app_secret_key=alice.secret_key)
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensync.server.config import EngineConfig, ServerConfig
from ensync.server.core.apps import NewApp
from ensync.server.runtime.engine import Engine
from ensync.server.serving import RunningServer, running_server
from ensync.testing.memory import MemoryEngine, MemoryServer, MemoryTransport, run_memory_engine
from ensync.testing.process import EngineProcess, running_engine
from ensync.testing.proxy import TcpProxy, tcp_proxy

__all__ = [
    "EngineProcess",
    "MemoryEngine",
    "MemoryServer",
    "MemoryTransport",
    "TcpProxy",
    "TestServer",
    "run_engine",
    "run_memory_engine",
    "running_engine",
    "tcp_proxy",
]


@dataclass(slots=True)
class TestServer:
    """A running engine for tests; see `run_engine`."""

    __test__ = False  # not a pytest test class

    server: RunningServer
    data_dir: Path

    @property
    def engine(self) -> Engine:
        """The engine serving (for what a test checks inside it)."""
        return self.server.engine

    @property
    def grpc_port(self) -> int:
        """The port of the gRPC listener."""
        return self.server.grpc_port

    @property
    def grpc_url(self) -> str:
        """``grpc://127.0.0.1:<grpc port>``, for `EnSyncEngine`."""
        return f"grpc://127.0.0.1:{self.server.grpc_port}"

    @property
    def grpcs_url(self) -> str:
        """The TLS URL (when served with ``tls=``).

        The name in the test certificate is ``localhost``.
        """
        return f"grpcs://localhost:{self.server.grpc_port}"

    @property
    def wss_url(self) -> str:
        """The WebSocket TLS URL (when served with ``tls=``), on ``localhost``."""
        return f"wss://localhost:{self.server.http_port}"

    @property
    def metrics_port(self) -> int:
        """The port serving ``/metrics`` (the HTTP port unless ``metrics=`` was given)."""
        return self.server.metrics_port

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:<http port>`` (the SDK adds ``/message``)."""
        return f"ws://127.0.0.1:{self.server.http_port}"

    @property
    def http_port(self) -> int:
        """The port of the HTTP listener: WebSocket, ``/healthz``, ``/metrics``."""
        return self.server.http_port

    async def create_app(self, name: str) -> NewApp:
        """Register an app; returns its app key, app id and secret key."""
        return await self.engine.apps.create(name)


@contextlib.asynccontextmanager
async def run_engine(
    store: str = "memory:",
    data_dir: Path | None = None,
    *,
    tls: tuple[Path, Path] | None = None,
    sessions: bool = True,
    metrics: str | None = None,
    **engine_options: Any,
) -> AsyncIterator[TestServer]:
    """Serve an engine on 127.0.0.1 with free ports until the block ends.

    Args:
        store: ``"memory:"`` (default) or ``"sqlite:"`` (in ``data_dir``).
        data_dir: where a sqlite store lives; a temporary directory if None.
        tls: ``(certificate, key)`` PEM files to serve TLS with.
        sessions: serve ensync's batched session on both transports (off:
            the SDK falls back to the official calls, as against an engine
            without it).
        metrics: ``HOST:PORT`` of a listener of its own for ``/metrics``
            (default: the HTTP listener).
        engine_options: `EngineConfig` fields,
            e.g. ``ack_deadline_ms=500``.
    """
    config = dataclasses.replace(EngineConfig(), **engine_options)
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ensync-")))
        server_config = ServerConfig(
            data_dir=data_dir,
            grpc_address="127.0.0.1:0",
            http_address="127.0.0.1:0",
            store_url=store,
            engine=config,
            tls_cert=tls[0] if tls else None,
            tls_key=tls[1] if tls else None,
            sessions=sessions,
            metrics_address=metrics,
        )
        async with running_server(server_config) as server:
            yield TestServer(server, data_dir)
