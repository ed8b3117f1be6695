"""``ensync serve``: run the engine until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from ensync.server.config import EngineConfig, ServerConfig
from ensync.server.runtime import running_server
from ensync.server.store.base import StoreError

__all__ = ["ENGINE_FLAGS", "run"]

_DEFAULTS = EngineConfig()

# (flag, default, help): each maps to the EngineConfig field of the same name.
ENGINE_FLAGS: list[tuple[str, int, str]] = [
    ("ack-deadline-ms", _DEFAULTS.ack_deadline_ms, "redeliver if not settled in this time"),
    ("max-deliveries", _DEFAULTS.max_deliveries, "dead-letter after this many deliveries"),
    ("window", _DEFAULTS.window, "most unsettled deliveries per client subscription"),
    ("max-payload-bytes", _DEFAULTS.max_payload_bytes, "largest accepted payload"),
    ("session-timeout-ms", _DEFAULTS.session_timeout_ms, "drop silent clients after this"),
    ("retention-ms", _DEFAULTS.retention_ms, "keep settled messages this long for replay"),
]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in ENGINE_FLAGS
    }
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {value}")
    return EngineConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs every HTTP request at INFO; keep the engine's log readable.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.root.level))
    try:
        config = ServerConfig(
            data_dir=Path(args.data),
            grpc_address=args.grpc,
            http_address=args.http,
            store_url=args.store,
            engine=engine_config(args),
        )
    except ValueError as exc:
        print(f"ensync: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config))
    except (ValueError, OSError, StoreError) as exc:
        print(f"ensync: cannot serve: {exc}", file=sys.stderr)
        return 1


async def _serve(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_server(config) as server:
        print(
            f"ensync engine serving gRPC on {config.grpc_address.rsplit(':', 1)[0]}:"
            f"{server.grpc_port}, HTTP on {config.http_address.rsplit(':', 1)[0]}:"
            f"{server.http_port} (data: {config.data_dir})",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        print("ensync: shutting down", file=sys.stderr, flush=True)
    return 0
