"""``ensync dlq list | show | redrive``: the dead letters, in the store.

Like ``ensync app``, these work on the data directory (``--data`` /
``--store``), beside a running engine or offline, and refuse a directory
that holds no store rather than make an empty one. A running engine delivers
redriven messages again within a second (it reads what another process
redrove when it re-reads the apps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensync import EnSyncError
from ensync._loop import run as run_loop
from ensync.cli.stores import missing_store, store_options, unserved_database
from ensync.crypto import open_payload
from ensync.protocol.names import matches, validate_pattern
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store import open_store
from ensync.server.store.base import AppRecord, DeadRef, Store, StoredMessage, StoreError

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
    redrive = actions.add_parser(
        "redrive",
        help="deliver dead letters again",
        description="Return dead letters to their queue (attempts reset), oldest first, "
        "with a progress bar; a running engine delivers them within a second.",
    )
    redrive.add_argument("--app", metavar="NAME", help="only this recipient app's")
    redrive.add_argument(
        "--name", metavar="PATTERN", help="only these message names (a name or a pattern)"
    )
    redrive.add_argument(
        "--rate", type=float, metavar="R", help="at most R messages per second (default: no limit)"
    )
    add_data_options(redrive)
    redrive.set_defaults(run=_redrive)


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
            store = open_store(args.store, Path(args.data), serve=False, **store_options(args))
            missing = missing_store(args)
        except ValueError as exc:
            print(f"ensync: {exc}", file=sys.stderr)
            return 2
        if missing is not None:
            print(f"ensync: {missing}", file=sys.stderr)
            return 1
        await store.open()
        try:
            code: int = await work(store)
            return code
        finally:
            await store.close()

    try:
        return run_loop(go())
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


def _redrive(args: argparse.Namespace) -> int:
    if args.rate is not None and not args.rate > 0:
        print("ensync: --rate must be above 0", file=sys.stderr)
        return 2
    if args.name is not None:
        try:
            validate_pattern(args.name)
        except ValueError as exc:
            print(f"ensync: --name: {exc}", file=sys.stderr)
            return 2

    async def work(store: Store) -> int:
        apps = [app for app in await store.list_apps() if args.app in (None, app.name)]
        if args.app is not None and not apps:
            print(f"ensync: no app named {args.app!r}", file=sys.stderr)
            return 1
        # Ids and names only: a million dead letters fit, their payloads need not.
        chosen: list[DeadRef] = []
        for app in apps:
            dead = await store.list_dead_refs(app.app_id)
            chosen += [ref for ref in dead if args.name is None or matches(args.name, ref.name)]
        if not chosen:
            print("no dead letters to redrive")
            return 0
        chosen.sort()  # oldest first, across apps
        progress = _Progress(len(chosen))
        redriven = 0
        started = time.monotonic()
        for index, ref in enumerate(chosen):
            if args.rate is not None:
                await asyncio.sleep(max(0.0, started + index / args.rate - time.monotonic()))
            if await store.redrive(ref.idem, wall_clock_ms()):
                redriven += 1
            progress.step()
        progress.done()
        gone = len(chosen) - redriven
        print(
            f"redrove {redriven} dead letters" + (f" ({gone} were no longer dead)" if gone else "")
        )
        if unserved_database(args) is not None:
            print("no engine serves this store now: they are delivered when one starts")
        return 0

    return _run(args, work)


class _Progress:
    """A progress bar on standard error (a line every few seconds when it is
    not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.terminal = sys.stderr.isatty()

    def step(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.shown_at >= (0.1 if self.terminal else 5.0):
            self.shown_at = now
            self._show(now)

    def done(self) -> None:
        self._show(time.monotonic())
        if self.terminal:
            print(file=sys.stderr)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.count / elapsed
        width = 30
        filled = width * self.count // self.total
        bar = "#" * filled + "-" * (width - filled)
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        line = f"redriving [{bar}] {self.count}/{self.total}  {rate:,.0f}/s  eta {eta:,.0f}s"
        if self.terminal:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
