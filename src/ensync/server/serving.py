"""Assemble and run an engine: store, core, listeners."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ensync.server.config import EngineConfig, ServerConfig
from ensync.server.core.throttled import ThrottledLog
from ensync.server.core.validation import largest_request
from ensync.server.datadir import EngineLock, loose_permissions
from ensync.server.openfiles import RESERVED_FILES, caps_fit, max_connections, open_files_limit
from ensync.server.runtime.engine import Engine
from ensync.server.store import open_store, sqlite_file
from ensync.server.store.base import Store
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.server.transports.gate import ConnectionGate
from ensync.server.transports.grpc import GrpcTransport
from ensync.server.transports.http import HttpListener

__all__ = [
    "DEFAULT_METRICS_ADDRESS",
    "RunningServer",
    "metrics_address",
    "parse_address",
    "running_server",
]

DEFAULT_METRICS_ADDRESS = "127.0.0.1:9090"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def metrics_address(http_host: str, configured: str | None) -> str | None:
    """Where a listener of its own serves ``/metrics``; ``None``: the HTTP listener does.

    >>> metrics_address("127.0.0.1", None) is None, metrics_address("0.0.0.0", None)
    (True, '127.0.0.1:9090')
    """
    if configured is not None:
        return configured
    return None if http_host in _LOOPBACK else DEFAULT_METRICS_ADDRESS


log = logging.getLogger(__name__)


def parse_address(address: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into its parts, with a clear error."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"{what} address {address!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} port {port} is outside 0..65535")
    return host.strip("[]"), port


def _tls(config: ServerConfig) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    """Server credentials for gRPC and an SSL context for WebSocket, or neither."""
    if config.tls_cert is None and config.tls_key is None:
        return None, None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("TLS needs both a certificate file and a key file")
    try:
        cert = config.tls_cert.read_bytes()
        key = config.tls_key.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS files: {exc}") from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise ValueError(f"the TLS certificate or key is not usable: {exc}") from exc
    return grpc.ssl_server_credentials([(key, cert)]), context


@dataclass(slots=True)
class RunningServer:
    """A serving engine: its core, store and bound ports."""

    engine: Engine
    store: Store
    grpc_port: int
    http_port: int
    # The port serving /metrics: http_port unless a listener of its own does.
    metrics_port: int
    # HOST:PORT of that listener of its own, bound; None: the HTTP listener.
    metrics_listener: str | None = None


@contextlib.asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[RunningServer]:
    """Open the store, start the core and both listeners; undo it all on exit.

    Example::

        async with running_server(ServerConfig(grpc_address="127.0.0.1:0")) as srv:
            print(srv.grpc_port)
    """
    grpc_host, grpc_port = parse_address(config.grpc_address, what="gRPC")
    http_host, http_port = parse_address(config.http_address, what="HTTP")
    async with contextlib.AsyncExitStack() as stack:
        database = sqlite_file(config.store_url, config.data_dir)
        if database is not None:
            stack.enter_context(EngineLock(database))
        store = open_store(
            config.store_url,
            config.data_dir,
            nats_creds=config.nats_creds,
            nats_tls_ca=config.nats_tls_ca,
        )
        if isinstance(store, OwnedStore):
            # The data directory holds only this node's own files: one node each.
            stack.enter_context(EngineLock(config.data_dir / "node"))
        await store.open()
        stack.push_async_callback(store.close)
        if isinstance(store, OwnedStore):
            _check_message_room(store, config.engine)
        if database is not None:
            for loose in loose_permissions(database):
                log.warning("%s: other users can read it (chmod go= to fix)", loose)
        async with _serving(config, store, grpc_host, grpc_port, http_host, http_port) as running:
            yield running


@contextlib.asynccontextmanager
async def _serving(
    config: ServerConfig,
    store: Store,
    grpc_host: str,
    grpc_port: int,
    http_host: str,
    http_port: int,
) -> AsyncIterator[RunningServer]:
    engine = Engine(store, _with_connection_caps(config.engine))
    credentials, ssl_context = _tls(config)
    gate = ConnectionGate(engine)
    grpc_transport = GrpcTransport(
        engine,
        f"{grpc_host}:{grpc_port}",
        credentials=credentials,
        session=config.sessions,
    )
    separate = metrics_address(http_host, config.metrics_address)
    http_listener = HttpListener(
        engine,
        http_host,
        http_port,
        ssl_context=ssl_context,
        session=config.sessions,
        metrics=separate is None,
        gate=gate,
    )
    metrics_listener: HttpListener | None = None
    metrics_host = ""
    if separate is not None:
        metrics_host, metrics_port = parse_address(separate, what="metrics")
        metrics_listener = HttpListener(
            engine, metrics_host, metrics_port, websocket=False, gate=gate
        )
    loop = asyncio.get_running_loop()
    earlier_handler = loop.get_exception_handler()
    loop.set_exception_handler(_AcceptFailures(engine, earlier_handler))
    try:
        await engine.start()
        bound_grpc = await grpc_transport.start()
        bound_http = await http_listener.start()
        bound_metrics, metrics_at = bound_http, None
        if metrics_listener is not None:
            bound_metrics = await metrics_listener.start()
            shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
            metrics_at = f"{shown}:{bound_metrics}"
        # `ensync serve` says it at INFO with more detail; say it once.
        log.debug(
            "engine serving gRPC on %s:%d, HTTP on %s:%d",
            grpc_host,
            bound_grpc,
            http_host,
            bound_http,
        )
        yield RunningServer(engine, store, bound_grpc, bound_http, bound_metrics, metrics_at)
    finally:
        # Stop taking work, let calls in progress finish (their commits
        # included), end streams cleanly; then in-flight messages go back to
        # the queue when the core stops, and the store drains its writes.
        await asyncio.gather(
            http_listener.stop(),
            grpc_transport.stop(grace_s=5.0),
            *([metrics_listener.stop()] if metrics_listener is not None else []),
        )
        await engine.stop()
        loop.set_exception_handler(earlier_handler)


def _with_connection_caps(config: EngineConfig) -> EngineConfig:
    """``config`` with ``max_connections`` set (derived when 0); warns when
    the caps do not fit the open-files limit."""
    limit = open_files_limit()
    caps = dataclasses.replace(config, max_connections=max_connections(config.max_connections))
    if not caps_fit(caps.max_connections, limit):
        log.warning(
            "--max-connections %d on each of the gRPC and HTTP listeners does not fit the"
            " open-files limit of %d (%d kept for the store and the rest): raise the limit"
            " (ulimit -n) or lower --max-connections",
            caps.max_connections,
            limit,
            RESERVED_FILES,
        )
    return caps


class _AcceptFailures:
    """The event loop's exception handler while the engine serves.

    Out of descriptors, asyncio reports each failed ``accept()`` with a
    traceback (thousands a minute in a connection flood): say it once a
    second with a count instead, and keep serving the connections there are.
    Everything else goes to the handler there was before.
    """

    def __init__(self, engine: Engine, earlier: Callable[..., object] | None) -> None:
        self._earlier = earlier
        self._lines = ThrottledLog(log, engine.clock.now_ms, what="accept failed")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and context.get("message", "").startswith("socket.accept()"):
            self._lines.note(
                "out of resources",
                f"{error.strerror or error}: new connections wait until some close"
                " (raise the open-files limit, or lower --max-connections)",
            )
        elif self._earlier is not None:
            self._earlier(loop, context)
        else:
            loop.default_exception_handler(context)


def _check_message_room(store: OwnedStore, engine: EngineConfig) -> None:
    """Refuse to serve when NATS would refuse the largest message the engine accepts."""
    # A stored record is the envelope, the metadata as a JSON string (escaping
    # may double it) and a few fields.
    needed = largest_request(engine.max_payload_bytes, engine.max_metadata_bytes)
    needed += engine.max_metadata_bytes
    if store.max_message_bytes < needed:
        raise ValueError(
            f"the NATS servers take messages of up to {store.max_message_bytes:,} bytes"
            f" (max_payload), but with --max-payload-bytes {engine.max_payload_bytes} the"
            f" engine stores records of up to {needed:,}: set max_payload to at least"
            f" {-(-needed // 1_048_576)}MB in the NATS servers' configuration, or lower"
            " --max-payload-bytes"
        )
