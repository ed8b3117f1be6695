"""``ensync dlq list | show``: the dead letters, read from the store.

Like ``ensync app``, these work on the data directory (``--data`` /
``--store``), beside a running engine or offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensync import EnSyncError
from ensync.crypto import open_payload
from ensync.server.store import open_store
from ensync.server.store.base import AppRecord, Store, StoredMessage, StoreError

__all__ = ["add_dlq"]


def add_dlq(commands: Any, add_data_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``dlq`` subcommands."""
    dlq = commands.add_parser("dlq", help="list and inspect dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters, newest first")
    listing.add_argument("--app", metavar="NAME", help="only this recipient app's")
    listing.add_argument("--limit", type=int, default=100, help="most per app (default: 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_data_options(listing)
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", help="one message, decrypted when given the secret key")
    show.add_argument("idem")
    show.add_argument(
        "--secret-key", help="the recipient app's secret key: print the payload decrypted"
    )
    show.add_argument("--json", action="store_true", help="one JSON object")
    add_data_options(show)
    show.set_defaults(run=_show)


def _record(message: StoredMessage, apps: dict[str, str]) -> dict[str, Any]:
    return {
        "idem": message.idem,
        "name": message.name,
        "recipient": apps.get(message.recipient, message.recipient),
        "sender": apps.get(message.sender, message.sender),
        "state": message.state.name.lower(),
        "attempts": message.attempts,
        "created_at_ms": message.created_at_ms,
        "settled_at_ms": message.settled_at_ms,
        "reason": message.dead_reason,
        "metadata": json.loads(message.metadata or "{}"),
        "envelope_bytes": len(message.payload),
    }


def _run(args: argparse.Namespace, work: Callable[[Store], Any]) -> int:
    async def go() -> int:
        try:
            store = open_store(args.store, Path(args.data))
        except ValueError as exc:
            print(f"ensync: {exc}", file=sys.stderr)
            return 2
        await store.open()
        try:
            code: int = await work(store)
            return code
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        print(f"ensync: {exc}", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        apps: list[AppRecord] = await store.list_apps()
        names = {app.app_id: app.name for app in apps}
        chosen = [app for app in apps if args.app is None or app.name == args.app]
        if args.app is not None and not chosen:
            print(f"ensync: no app named {args.app!r}", file=sys.stderr)
            return 1
        for app in chosen:
            for message in await store.list_dead(app.app_id, args.limit):
                record = _record(message, names)
                if args.json:
                    print(json.dumps(record))
                else:
                    print(
                        f"{record['idem']}\t{record['recipient']}\t{record['name']}"
                        f"\t{record['reason']}"
                    )
        return 0

    return _run(args, work)


def _show(args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        message = await store.get(args.idem)
        if message is None:
            print(f"ensync: no message {args.idem!r}", file=sys.stderr)
            return 1
        names = {app.app_id: app.name for app in await store.list_apps()}
        record = _record(message, names)
        if args.secret_key:
            try:
                record["payload"] = json.loads(open_payload(message.payload, args.secret_key))
            except (EnSyncError, ValueError) as exc:
                print(f"ensync: cannot decrypt {args.idem}: {exc}", file=sys.stderr)
                return 1
        if args.json:
            print(json.dumps(record))
        else:
            for key, value in record.items():
                print(f"{key + ':':16}{json.dumps(value) if not isinstance(value, str) else value}")
        return 0

    return _run(args, work)
