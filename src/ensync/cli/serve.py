"""``ensync serve``: run the engine until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ensync._loop import loop_name
from ensync._loop import run as run_loop
from ensync._version import __version__
from ensync.cli.stores import store_options
from ensync.server.config import EngineConfig, ServerConfig
from ensync.server.openfiles import open_files_limit, raise_open_files_limit
from ensync.server.serving import running_server
from ensync.server.store.base import StoreError

__all__ = ["ENGINE_FLAGS", "engine_config", "parse_backoff", "run"]

log = logging.getLogger(__name__)

_DEFAULTS = EngineConfig()


def parse_backoff(text: str) -> tuple[int, ...]:
    """``"0,1000,5000"`` into delays in ms; ``ValueError`` names a bad item."""
    delays = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--redelivery-backoff-ms item {item!r} is not a whole number of ms")
        delays.append(int(item))
    return tuple(delays)


# (flag, default, minimum, help): each maps to the EngineConfig field of the
# same name. Every one can also come from ENSYNC_<FLAG>.
ENGINE_FLAGS: list[tuple[str, int, int, str]] = [
    ("ack-deadline-ms", _DEFAULTS.ack_deadline_ms, 1, "redeliver if not settled in this time"),
    ("max-deliveries", _DEFAULTS.max_deliveries, 1, "dead-letter after this many deliveries"),
    ("window", _DEFAULTS.window, 1, "most unsettled deliveries per client subscription"),
    (
        "session-window",
        _DEFAULTS.session_window,
        1,
        "the same on ensync's session stream (the SDK keeps those leases)",
    ),
    ("max-payload-bytes", _DEFAULTS.max_payload_bytes, 1, "largest accepted payload"),
    ("max-metadata-bytes", _DEFAULTS.max_metadata_bytes, 2, "largest accepted metadata JSON"),
    ("max-name-length", _DEFAULTS.max_name_length, 1, "longest message name (at most 255)"),
    ("max-clients-per-app", _DEFAULTS.max_clients_per_app, 1, "most connected clients per app"),
    (
        "max-subscriptions-per-client",
        _DEFAULTS.max_subscriptions_per_client,
        1,
        "most subscriptions per client",
    ),
    ("rate-limit-per-app", _DEFAULTS.rate_limit_per_app, 0, "requests/s per app (0: no limit)"),
    ("session-timeout-ms", _DEFAULTS.session_timeout_ms, 1, "drop silent clients after this"),
    ("retention-ms", _DEFAULTS.retention_ms, 1, "keep settled messages this long for replay"),
    ("dedupe-window-ms", _DEFAULTS.dedupe_window_ms, 1, "remember idempotency keys this long"),
    ("ws-ping-interval-ms", _DEFAULTS.ws_ping_interval_ms, 1, "WebSocket keep-alive interval"),
    (
        "handshake-timeout-ms",
        _DEFAULTS.handshake_timeout_ms,
        100,
        "close connections that have not connected a client in this time",
    ),
    (
        "max-connections",
        _DEFAULTS.max_connections,
        0,
        "most connections on the gRPC listener, and on the HTTP ones together"
        " (0: from the open-files limit)",
    ),
    (
        "max-connections-per-address",
        _DEFAULTS.max_connections_per_address,
        1,
        "most HTTP/WebSocket connections from one client address",
    ),
]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` of parsed ``serve`` arguments; ``ValueError`` if invalid."""
    values: dict[str, object] = {}
    for flag, _, minimum, _ in ENGINE_FLAGS:
        field = flag.replace("-", "_")
        value = getattr(args, field)
        if value < minimum:
            raise ValueError(f"--{flag} must be at least {minimum}, not {value}")
        values[field] = value
    if values["max_name_length"] > 255:  # type: ignore[operator]
        raise ValueError("--max-name-length cannot exceed 255")
    values["redelivery_backoff_ms"] = parse_backoff(args.redelivery_backoff_ms)
    return EngineConfig(**values)  # type: ignore[arg-type]


def add_arguments(
    parser: argparse.ArgumentParser,
    env: Callable[[str, str], str],
    env_int: Callable[[str, int], int],
) -> None:
    """The ``serve`` flags (defaults from ``ENSYNC_*``)."""
    parser.add_argument("--grpc", default=env("grpc", "127.0.0.1:50051"), help="gRPC HOST:PORT")
    parser.add_argument("--http", default=env("http", "127.0.0.1:8080"), help="HTTP HOST:PORT")
    parser.add_argument(
        "--metrics",
        default=env("metrics", "") or None,
        metavar="HOST:PORT",
        help="serve /metrics and /healthz here (default: with --http when that is loopback,"
        " else 127.0.0.1:9090)",
    )
    parser.add_argument("--log-level", default=env("log_level", "INFO"), help="DEBUG, INFO, ...")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=env("log_format", "text"),
        help="text lines, or one JSON object per line (time, level, logger, message)",
    )
    parser.add_argument(
        "--tls-cert", default=env("tls_cert", "") or None, help="PEM certificate chain: serve TLS"
    )
    parser.add_argument(
        "--tls-key", default=env("tls_key", "") or None, help="PEM private key of --tls-cert"
    )
    for flag, default, _, text in ENGINE_FLAGS:
        parser.add_argument(f"--{flag}", type=int, default=env_int(flag, default), help=text)
    parser.add_argument(
        "--redelivery-backoff-ms",
        default=env(
            "redelivery_backoff_ms", ",".join(str(d) for d in _DEFAULTS.redelivery_backoff_ms)
        ),
        help="delays after the 1st, 2nd, ... failed delivery (comma list; the last repeats)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(
        _JsonFormatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    # websockets logs every HTTP request at INFO and whole frames at DEBUG
    # (app keys included): keep the engine's log readable and secret-free.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.root.level))
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        config = ServerConfig(
            data_dir=Path(args.data),
            grpc_address=args.grpc,
            http_address=args.http,
            metrics_address=args.metrics,
            store_url=args.store,
            **store_options(args),
            engine=engine_config(args),
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
        )
    except ValueError as exc:
        print(f"ensync: {exc}", file=sys.stderr)
        return 2
    # Every connection holds a descriptor: take all the system allows.
    raise_open_files_limit()
    try:
        return run_loop(_serve(config))
    except (ValueError, OSError, StoreError) as exc:
        print(f"ensync: cannot serve: {exc}", file=sys.stderr)
        return 1


async def _serve(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_server(config) as server:
        scheme = "TLS" if config.tls_cert else "plaintext"
        http_host = config.http_address.rsplit(":", 1)[0]
        metrics = f", metrics on {server.metrics_listener}" if server.metrics_listener else ""
        log.info(
            "ensync %s serving gRPC on %s:%d, HTTP on %s:%d%s (%s; data: %s;"
            " open files: %d, connections: %d per listener; loop: %s)",
            __version__,
            config.grpc_address.rsplit(":", 1)[0],
            server.grpc_port,
            http_host,
            server.http_port,
            metrics,
            scheme,
            config.data_dir,
            open_files_limit(),
            server.engine.config.max_connections,
            loop_name(),
        )
        await stop.wait()
        log.info("shutting down")
    return 0


class _JsonFormatter(logging.Formatter):
    """One JSON object per record, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
