"""The client verbs: ``publish``, ``tail`` and ``replay``, as an app would.

The engine's URL and the app's keys come from flags or the environment
(``ENSYNC_URL``, ``ENSYNC_APP_KEY``, ``ENSYNC_SECRET_KEY``). ``publish``
takes JSON given inline or read from a file (``@FILE``, ``@-`` for standard
input); ``tail`` watches without taking (``EnSyncClient.observe``);
``replay`` prints one message again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ensync import EnSyncEngine, EnSyncError, EnSyncMessageError, Message
from ensync._loop import run as run_loop
from ensync.protocol.records import metadata_object, split_replay_info
from ensync.websocket import EnSyncEngine as WsEngine

__all__ = ["add_publish", "add_replay", "add_tail", "publish", "replay", "tail"]


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
    _add_connection(parser, env, secret=False)
    parser.set_defaults(run=publish)


def add_tail(commands: Any, env: Callable[[str, str], str]) -> None:
    """The ``tail`` subcommand."""
    parser = commands.add_parser(
        "tail",
        help="print an app's new messages as they arrive, without taking them",
        description="Print each new message of the app whose name matches PATTERN, decrypted, "
        "as it is stored. It only watches: the app's subscribers get every message as before, "
        "and nothing is acked. On engine nodes sharing a NATS store it shows only the messages "
        "published through the node it is connected to (--url), not the others'. Ctrl-C stops.",
    )
    parser.add_argument(
        "pattern", metavar="PATTERN", help="a name or pattern: orders/created, orders/*, '#'"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    _add_connection(parser, env, secret=True)
    parser.set_defaults(run=tail)


def add_replay(commands: Any, env: Callable[[str, str], str]) -> None:
    """The ``replay`` subcommand."""
    parser = commands.add_parser(
        "replay",
        help="print one message of the app again, by idem",
        description="Print a message addressed to the app, whatever its state (pending, acked, "
        "dead-lettered), decrypted when given the secret key, else its envelope's metadata. "
        "It is not delivered again.",
    )
    parser.add_argument("idem")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    _add_connection(parser, env, secret=True, secret_required=False)
    parser.set_defaults(run=replay)


def _add_connection(
    parser: argparse.ArgumentParser,
    env: Callable[[str, str], str],
    *,
    secret: bool,
    secret_required: bool = True,
) -> None:
    parser.add_argument(
        "--url", default=env("url", "grpc://localhost:50051"), help="the engine (ENSYNC_URL)"
    )
    parser.add_argument(
        "--app-key", default=os.environ.get("ENSYNC_APP_KEY"), help="the app's key (ENSYNC_APP_KEY)"
    )
    if secret:
        parser.add_argument(
            "--secret-key",
            default=os.environ.get("ENSYNC_SECRET_KEY"),
            help="the app's secret key, to decrypt (ENSYNC_SECRET_KEY)"
            + ("" if secret_required else "; without it, only metadata"),
        )


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
        async with _connected(args) as client:
            return str(await client.publish(args.name, args.to, payload, metadata))

    return _report(lambda: print(run_loop(go())))


def tail(args: argparse.Namespace) -> int:
    """Run ``ensync tail``; the exit code."""
    problem = _missing_keys(args, secret=True)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("ensync: --count must be at least 1", file=sys.stderr)
        return 2

    async def go() -> None:
        async with _connected(args, secret=True) as client:
            observation = await client.observe(args.pattern)
            print(f"watching {args.pattern!r}; Ctrl-C stops", file=sys.stderr, flush=True)
            shown, missed = 0, 0
            while args.count is None or shown < args.count:
                try:
                    message = await anext(observation)
                except EnSyncMessageError as exc:
                    print(f"ensync: {exc}", file=sys.stderr, flush=True)
                    continue
                if observation.missed > missed:
                    print(
                        f"ensync: {observation.missed - missed} messages not shown "
                        "(this terminal read too slowly)",
                        file=sys.stderr,
                    )
                    missed = observation.missed
                print(_line(message) if not args.json else json.dumps(_fields(message)), flush=True)
                shown += 1

    try:
        return _report(lambda: run_loop(go()))
    except KeyboardInterrupt:
        return 0


def replay(args: argparse.Namespace) -> int:
    """Run ``ensync replay``; the exit code."""
    problem = _missing_keys(args, secret=False)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    async def go() -> dict[str, Any]:
        async with _connected(args, secret=bool(args.secret_key)) as client:
            if args.secret_key:
                message = await client.replay(args.idem)
                fields = _fields(message)
                info = message.replay_info
                fields["was_acknowledged"] = info.was_acknowledged if info else False
                return fields
            # Without the secret key: what the engine can say, not the payload.
            wire = await client._transport().replay("", args.idem)
            return {
                "idem": wire.message.idem,
                "name": wire.message.name,
                "block": wire.message.block,
                "sender": wire.message.sender,
                "timestamp": wire.message.created_at_ms or None,
                # As a decrypted replay shows it: without the engine's replay fields.
                "metadata": split_replay_info(metadata_object(wire.message.metadata))[0],
                "envelope_bytes": len(wire.message.payload),
                "was_acknowledged": wire.info.was_acknowledged if wire.info else False,
            }

    def show() -> None:
        fields = run_loop(go())
        if args.json:
            print(json.dumps(fields))
            return
        if fields["timestamp"]:  # for a reader: the local time, to the millisecond
            fields["timestamp"] = _local_time(fields["timestamp"], "%Y-%m-%d %H:%M:%S.%f")
        for key, value in fields.items():
            print(f"{key + ':':18}{value if isinstance(value, str) else json.dumps(value)}")

    return _report(show)


def _missing_keys(args: argparse.Namespace, *, secret: bool) -> str | None:
    if not args.app_key:
        return "ensync: give the app key with --app-key or ENSYNC_APP_KEY"
    if secret and not args.secret_key:
        return "ensync: give the app's secret key with --secret-key or ENSYNC_SECRET_KEY"
    return None


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace, *, secret: bool = False) -> AsyncIterator[Any]:
    """A client of the app at ``args.url``; one connection attempt, no retrying."""
    engine: Any = (
        WsEngine(args.url, max_reconnect_attempts=1)
        if args.url.startswith(("ws://", "wss://"))
        else EnSyncEngine(args.url, max_reconnect_attempts=1)
    )
    try:
        key = args.secret_key if secret else None
        yield await engine.create_client(args.app_key, app_secret_key=key)
    finally:
        await engine.close()


def _report(work: Callable[[], None]) -> int:
    try:
        work()
    except EnSyncError as exc:
        print(f"ensync: {exc.name}: {exc}", file=sys.stderr)
        return 1
    return 0


def _fields(message: Message) -> dict[str, Any]:
    return {
        "idem": message.idem,
        "name": message.message_name,
        "block": message.block,
        "sender": message.sender,
        "timestamp": message.timestamp,
        "headers": message.headers,
        "metadata": message.metadata,
        "payload": message.payload,
    }


def _local_time(ms: int, pattern: str) -> str:
    """``ms`` since the epoch in local time; ``pattern`` ends with ``%f``, cut to ms."""
    return datetime.datetime.fromtimestamp(ms / 1000).strftime(pattern)[:-3]


def _line(message: Message) -> str:
    """One message for a terminal: time, name, idem, sender, payload."""
    when = _local_time(message.timestamp, "%H:%M:%S.%f") if message.timestamp else "-"
    return (
        f"{when}  {message.message_name}  {message.idem}  from {message.sender[:12]}…  "
        f"{json.dumps(message.payload)}"
    )
