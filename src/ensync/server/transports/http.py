"""The HTTP listener: ``/healthz`` now; WebSocket ``/message`` and ``/metrics`` later.

Served by the ``websockets`` library, whose ``process_request`` hook answers
plain HTTP requests on the same port that accepts WebSocket upgrades.
"""

from __future__ import annotations

import http
import json
import logging

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ensync.server.core.engine import Engine

__all__ = ["HttpListener"]

log = logging.getLogger(__name__)


class HttpListener:
    """Answers ``GET /healthz`` with the engine's gauges as JSON."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self._engine = engine
        self._host = host
        self._port = port
        self._server: Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._server = await serve(
            self._session,
            self._host,
            self._port,
            process_request=self._process_request,
            server_header="ensync",
        )
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = json.dumps({"status": "ok", **self._engine.statistics()})
            response = connection.respond(http.HTTPStatus.OK, body + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        if "upgrade" not in request.headers.get("Connection", "").lower():
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def _session(self, connection: ServerConnection) -> None:
        # The WebSocket transport is not served yet: refuse politely.
        await connection.close(1013, "WebSocket transport not available on this engine yet")
