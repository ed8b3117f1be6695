"""The EnSync engine over WebSocket: the same client API as `ensync`.

For example:

    from ensync.websocket import EnSyncEngine

    engine = EnSyncEngine("ws://localhost:8080")
    client = await engine.create_client(app_key, app_secret_key=secret)
    await client.publish("orders/created", [warehouse_id], {"orderId": "o-1"})
"""

from __future__ import annotations

from collections.abc import Sequence

from ensync.client.engine import NetworkEngine
from ensync.client.transport import ClientTransport
from ensync.client.ws_transport import WebSocketClientTransport
from ensync.protocol.urls import EngineUrl

__all__ = ["EnSyncEngine"]


class EnSyncEngine(NetworkEngine):
    """The EnSync engine over WebSocket.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` (the ``/message``
            path is added when the URL has none), or a list of them (as
            for `ensync.EnSyncEngine`).
        ping_interval: ms between keep-alive pings (default 30 000).
        reconnect_interval: base delay of the reconnect backoff, ms.
        max_reconnect_attempts: give up after this many (0: never).
        enable_logging: log connection life at INFO instead of DEBUG.
        call_timeout: how long a request waits for its answer, ms.
        ca_file: PEM file of a CA to trust for ``wss://``.
        sender_key_reuse_ms: as for `ensync.EnSyncEngine`.
    """

    _transport_kind = "ws"

    def __init__(
        self,
        url: str | Sequence[str] = "ws://localhost:8080",
        *,
        ping_interval: int = 30_000,
        reconnect_interval: int = 5_000,
        max_reconnect_attempts: int = 5,
        enable_logging: bool = False,
        call_timeout: int = 30_000,
        ca_file: str | None = None,
        sender_key_reuse_ms: int = 0,
    ) -> None:
        super().__init__(
            url,
            reconnect_interval=reconnect_interval,
            max_reconnect_attempts=max_reconnect_attempts,
            enable_logging=enable_logging,
            keepalive_interval=ping_interval,
            call_timeout=call_timeout,
            ca_file=ca_file,
            sender_key_reuse_ms=sender_key_reuse_ms,
        )

    def _make_transport(self, url: EngineUrl) -> ClientTransport:
        return WebSocketClientTransport(
            url,
            call_timeout_s=self._call_timeout_s,
            root_certificates=self._root_certificates,
        )
