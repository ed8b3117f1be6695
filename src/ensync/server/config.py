"""Runtime configuration of the engine: one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EngineConfig", "ServerConfig"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tunables of the delivery core. Times are milliseconds.

    Attributes:
        ack_deadline_ms: a delivered message not settled within this time is
            delivered again.
        max_deliveries: after this many deliveries without a settlement the
            message is dead-lettered.
        window: most unsettled deliveries per client subscription.
        session_window: the same for subscriptions delivered on ensync's
            session stream, whose SDK keeps the leases of messages it holds
            (so a bigger window cannot make them expire unhandled).
        max_payload_bytes: largest accepted payload: its JSON before
            encryption, in bytes (the envelope on the wire is ~1.8 times that).
        max_metadata_bytes: largest accepted ``metadata`` JSON text.
        session_timeout_ms: a client with no open stream and no call for this
            long is dropped (three missed 30 s heartbeats).
        max_defer_ms: longest accepted defer delay (24 h).
        retention_ms: how long acked and dead messages stay replayable.
        fetch_batch: how many pending messages are read from the store at a
            time for one partition.
        buffer_high_watermark: most messages of one partition held in memory
            ahead of delivery; the rest wait in the store.
        app_cache_ms: how long a looked-up recipient app is trusted.
        ws_ping_interval_ms: WebSocket keep-alive pings; a peer that does not
            answer within the same time is dropped and its messages requeued.
        redelivery_backoff_ms: how long a message waits before its next
            delivery after its n-th failed one (deadline passed, handler gave
            it back); the last value repeats.
        dedupe_window_ms: how long a publish's idempotency key is remembered.
        dedupe_max_keys: most keys remembered (the oldest are forgotten first).
        app_refresh_ms: how often the app registry is re-read, so that a
            revocation, a new key or new rules set by the CLI reach connected
            clients.
        max_name_length: longest accepted message name (at most 255).
        max_clients_per_app: most connected clients of one app.
        max_subscriptions_per_client: most names one client may subscribe to.
        rate_limit_per_app: requests per second an app may make (token bucket,
            bursts up to one second's worth); 0 turns the limit off.
        handshake_timeout_ms: a connection that has not completed its
            handshake in this time is closed (gRPC: the HTTP/2 preface and
            settings; WebSocket: the upgrade, then a ``CONN`` with a valid key).
        max_connections: most connections on the gRPC listener, and most on
            the HTTP listeners together; 0 derives it from the open-files
            limit (see `connection_budget`).
        max_connections_per_address: most connections from one client
            address on the HTTP listeners.
    """

    ack_deadline_ms: int = 30_000
    max_deliveries: int = 10
    window: int = 128
    session_window: int = 1024
    max_payload_bytes: int = 1024 * 1024
    max_metadata_bytes: int = 64 * 1024
    session_timeout_ms: int = 90_000
    max_defer_ms: int = 86_400_000
    retention_ms: int = 7 * 86_400_000
    fetch_batch: int = 256
    buffer_high_watermark: int = 1024
    app_cache_ms: int = 2_000
    ws_ping_interval_ms: int = 20_000
    redelivery_backoff_ms: tuple[int, ...] = (0, 1_000, 5_000, 15_000, 60_000, 300_000)
    dedupe_window_ms: int = 600_000
    dedupe_max_keys: int = 100_000
    app_refresh_ms: int = 250
    max_name_length: int = 255
    max_clients_per_app: int = 1_000
    max_subscriptions_per_client: int = 100
    rate_limit_per_app: int = 20_000
    handshake_timeout_ms: int = 5_000
    max_connections: int = 0
    max_connections_per_address: int = 256


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the engine listens and keeps its data."""

    data_dir: Path = Path(".ensync")
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:8080"
    # Where /metrics (and /healthz) are served: None picks the HTTP listener
    # when it is on loopback, else a listener of their own on 127.0.0.1:9090
    # (the metrics name every app; keep them off the port clients reach).
    metrics_address: str | None = None
    store_url: str = "sqlite:"
    # For nats:// stores: a credentials file, a CA bundle for tls:// servers.
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    engine: EngineConfig = EngineConfig()
    # PEM files; when both are set, gRPC and WebSocket are served over TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Serve ensync's batched session (the EnSyncSession method on gRPC,
    # binary frames on WebSocket) beside the official protocol; off, the
    # ensync SDK uses the official calls and commands.
    sessions: bool = True
