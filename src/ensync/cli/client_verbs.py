"""``ensync publish``: send a message from the command line, as an app would.

The engine's URL and the app's key come from flags or the environment
(``ENSYNC_URL``, ``ENSYNC_APP_KEY``); the payload is JSON given inline or
read from a file (``@FILE``, ``@-`` for standard input).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensync import EnSyncEngine, EnSyncError
from ensync.websocket import EnSyncEngine as WsEngine

__all__ = ["add_publish", "publish"]


def add_publish(commands: Any, env: Callable[[str, str], str]) -> None:
    """The ``publish`` subcommand."""
    parser = commands.add_parser(
        "publish",
        help="publish one message (as an app) and print its idem",
        description="Publish one message, encrypted for each recipient, and print its idem.",
    )
    parser.add_argument("name", help="message name, e.g. orders/created")
    parser.add_argument(
        "--to", action="append", required=True, metavar="APP_ID", help="a recipient (repeatable)"
    )
    parser.add_argument(
        "--payload",
        default="{}",
        help="JSON object, or @FILE (@- for standard input) (default: {})",
    )
    parser.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="a header (repeatable)"
    )
    parser.add_argument("--memory-only", action="store_true", help="persist: false")
    parser.add_argument(
        "--url", default=env("url", "grpc://localhost:50051"), help="the engine (ENSYNC_URL)"
    )
    parser.add_argument(
        "--app-key",
        default=os.environ.get("ENSYNC_APP_KEY"),
        help="the publishing app's key (ENSYNC_APP_KEY)",
    )
    parser.set_defaults(run=publish)


def _payload(text: str) -> object:
    if text.startswith("@"):
        source = text[1:]
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return json.loads(text)


def publish(args: argparse.Namespace) -> int:
    """Run ``ensync publish``; the exit code."""
    if not args.app_key:
        print("ensync: give the app key with --app-key or ENSYNC_APP_KEY", file=sys.stderr)
        return 2
    try:
        payload = _payload(args.payload)
    except (OSError, ValueError) as exc:
        print(f"ensync: --payload is not readable JSON: {exc}", file=sys.stderr)
        return 2
    headers: dict[str, str] = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"ensync: --header {item!r} is not K=V", file=sys.stderr)
            return 2
        headers[key] = value
    metadata = {"persist": not args.memory_only, "headers": headers}

    async def go() -> str:
        engine: Any = (
            WsEngine(args.url, max_reconnect_attempts=1)
            if args.url.startswith(("ws://", "wss://"))
            else EnSyncEngine(args.url, max_reconnect_attempts=1)
        )
        try:
            client = await engine.create_client(args.app_key)
            return str(await client.publish(args.name, args.to, payload, metadata))
        finally:
            await engine.close()

    try:
        print(asyncio.run(go()))
    except EnSyncError as exc:
        print(f"ensync: {exc.name}: {exc}", file=sys.stderr)
        return 1
    return 0
