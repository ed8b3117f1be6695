"""The HTTP listener: WebSocket on ``/message`` (and any path), ``/healthz``, ``/metrics``.

The same class serves the metrics listener (``--metrics``): ``/metrics`` and
``/healthz`` only, no WebSocket, when the metrics are kept off the port that
faces clients.

Served by the ``websockets`` library, whose ``process_request`` hook answers
plain HTTP requests on the same port that accepts WebSocket upgrades. The
official Go client connects to the URL it is given, with no ``/message``
suffix, so an upgrade is accepted on every path (PROTOCOL.md §3.1).
"""

from __future__ import annotations

import dataclasses
import http
import json
import logging
import ssl

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ensync.server.core.validation import largest_request
from ensync.server.metrics import CONTENT_TYPE, render_metrics
from ensync.server.runtime.engine import Engine
from ensync.server.transports.gate import ConnectionGate
from ensync.server.transports.listen import bind_failure
from ensync.server.transports.websocket import WebSocketTransport

__all__ = ["HttpListener"]

log = logging.getLogger(__name__)


class HttpListener:
    """The engine's HTTP port.

    Args:
        engine: the core.
        host, port: where to listen (port 0 picks a free one).
        max_frame_bytes: larger WebSocket frames close the connection with
            code 1009 ("message too big").
        ping_interval_s: keep-alive pings; a peer that does not answer within
            ``ping_interval_s`` is dropped and its in-flight messages requeued.
        ssl_context: serve TLS (``wss://``, ``https://``).
        session: serve ensync's batched session in binary frames.
        websocket: accept WebSocket upgrades (off: a metrics listener).
        metrics: serve ``/metrics`` (its labels name every app).
        gate: the connection caps this listener shares with the engine's
            other HTTP listeners (default: caps of its own).
    """

    def __init__(
        self,
        engine: Engine,
        host: str,
        port: int,
        *,
        max_frame_bytes: int | None = None,
        ping_interval_s: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        session: bool = True,
        websocket: bool = True,
        metrics: bool = True,
        gate: ConnectionGate | None = None,
    ) -> None:
        self._engine = engine
        self._host = host
        self._port = port
        self._max_frame = max_frame_bytes or largest_request(
            engine.config.max_payload_bytes, engine.config.max_metadata_bytes
        )
        self._ping_interval_s = (
            ping_interval_s
            if ping_interval_s is not None
            else engine.config.ws_ping_interval_ms / 1000
        )
        self._server: Server | None = None
        self._websocket = websocket
        self._metrics = metrics
        self._ssl = ssl_context
        self._gate = gate or ConnectionGate(engine)
        self.websocket = WebSocketTransport(
            engine, max_frame_bytes=self._max_frame, session=session
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        try:
            self._server = await self._serve()
        except OSError as exc:
            what = "HTTP" if self._websocket else "metrics"
            flag = "--http" if self._websocket else "--metrics"
            raise bind_failure(what, flag, self._host, self._port, exc) from exc
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        return self.port

    async def _serve(self) -> Server:
        return await serve(
            self.websocket.handle,
            self._host,
            self._port,
            process_request=self._process_request,
            create_connection=self._gate.connection_class(),
            # An upgrade (or a plain request) not sent in time is not waited for.
            open_timeout=self._engine.config.handshake_timeout_ms / 1000,
            # asyncio's default of 100 pending connects overflows in a burst
            # of new clients (a reconnect storm, a flood): their SYNs are
            # dropped and retried seconds later.
            backlog=1024,
            server_header="ensync",
            max_size=self._max_frame,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_interval_s,
            # A dead peer never answers the closing handshake either: do not
            # hold its messages for the library's default 10 s.
            close_timeout=min(5.0, self._ping_interval_s),
            # Official clients send one command per frame: no compression.
            compression=None,
            ssl=self._ssl,
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting connections, let each connection finish the commands
        in progress (up to ``grace_s``), close them with 1001, wait for handlers."""
        if self._server is not None:
            self._server.close(close_connections=False)
            await self.websocket.drain(grace_s)
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if "websocket" in request.headers.get("Upgrade", "").lower():
            if self._websocket:
                return None
            return _response(http.HTTPStatus.NOT_FOUND, b"no WebSocket here\n", "text/plain")
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return self._health()
        if path == "/metrics" and self._metrics:
            return _response(http.HTTPStatus.OK, await render_metrics(self._engine), CONTENT_TYPE)
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _health(self) -> Response:
        """200 and "ok" while the store takes writes; 503 while it fails them,
        so that a load balancer sends clients to a node whose store works."""
        gauges = dataclasses.asdict(self._engine.statistics())
        store = self._engine.store_health
        if store.failing_since_ms is None:
            body = {"status": "ok", **gauges}
            status = http.HTTPStatus.OK
        else:
            body = {
                "status": "store failing",
                "store_error": store.last_error,
                "store_failing_since_ms": store.failing_since_ms,
                **gauges,
            }
            status = http.HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, (json.dumps(body) + "\n").encode(), "application/json")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)
