"""``ensync app create | list | revoke | rotate-key | allow`` and ``ensync keygen``.

Only ``create`` makes a store where there is none; the other actions refuse
a data directory that holds no store (a mistyped ``--data``). A write that
worked says so when no engine serves the directory it wrote to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ensync._loop import run as run_loop
from ensync.cli.stores import missing_store, store_options, unserved_database
from ensync.crypto import generate_keypair
from ensync.server.core.apps import AppRegistry
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store import open_store
from ensync.server.store.base import AppExistsError, AppRecord, Store, StoreError

__all__ = ["allow", "create", "keygen", "list_apps", "revoke", "rotate_key"]


def _registry_call(args: argparse.Namespace, action: str) -> int:
    async def go() -> int:
        try:
            store = open_store(args.store, Path(args.data), serve=False, **store_options(args))
            # Only `create` may make the store: the others read or change apps in it.
            missing = None if action == "create" else missing_store(args)
        except ValueError as exc:
            print(f"ensync: {exc}", file=sys.stderr)
            return 2
        if missing is not None:
            print(f"ensync: {missing}", file=sys.stderr)
            return 1
        try:
            await store.open()
        except StoreError as exc:
            print(f"ensync: {exc}", file=sys.stderr)
            return 1
        try:
            return await _act(store, args, action)
        except StoreError as exc:
            print(f"ensync: storage error: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.close()

    code = run_loop(go())
    if code == 0 and action != "list":
        database = unserved_database(args)
        if database is not None:
            # It worked, offline too; but an engine on another --data would not see it.
            print(
                f"ensync: note: no engine is serving {database} right now"
                " (is the engine using another --data directory?)",
                file=sys.stderr,
            )
    return code


async def _act(store: Store, args: argparse.Namespace, action: str) -> int:
    registry = AppRegistry(store, wall_clock_ms, cache_ms=0)
    if action == "create":
        try:
            app = await registry.create(args.name)
        except ValueError as exc:
            print(f"ensync: {exc}", file=sys.stderr)
            return 2
        except AppExistsError:
            print(f"ensync: an app named {args.name!r} already exists", file=sys.stderr)
            return 1
        if args.json:
            print(
                json.dumps(
                    {
                        "name": app.name,
                        "app_key": app.app_key,
                        "app_id": app.app_id,
                        "secret_key": app.secret_key,
                    }
                )
            )
        else:
            print(f"app:        {app.name}")
            print(f"app key:    {app.app_key}")
            print(f"app id:     {app.app_id}")
            print(f"secret key: {app.secret_key}")
            print("Keep the app key and the secret key now: they are not shown again.")
        return 0
    if action == "list":
        _print_apps(await store.list_apps(), as_json=args.json)
        return 0
    try:
        if action == "revoke":
            await registry.revoke(args.name)
            print(f"revoked {args.name}")
        elif action == "rotate":
            app_key = await registry.rotate_key(args.name)
            if args.json:
                print(json.dumps({"name": args.name, "app_key": app_key}))
            else:
                print(f"app:     {args.name}")
                print(f"app key: {app_key}")
                print("Keep the new app key now: it is not shown again.")
        else:
            if args.publish is None and args.subscribe is None:
                print("ensync: give --publish and/or --subscribe", file=sys.stderr)
                return 2
            ruled = await registry.allow(
                args.name,
                publish=tuple(args.publish) if args.publish else None,
                subscribe=tuple(args.subscribe) if args.subscribe else None,
            )
            print(
                f"{ruled.name}: publish {' '.join(ruled.publish_rules)}; "
                f"subscribe {' '.join(ruled.subscribe_rules)}"
            )
    except LookupError as exc:
        print(f"ensync: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"ensync: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_apps(apps: list[AppRecord], *, as_json: bool) -> None:
    if as_json:
        rows = [
            {
                "name": a.name,
                "app_id": a.app_id,
                "created_at_ms": a.created_at_ms,
                "revoked": a.revoked,
                "publish": list(a.publish_rules),
                "subscribe": list(a.subscribe_rules),
            }
            for a in apps
        ]
        print(json.dumps(rows))
        return
    for a in apps:
        status = "revoked" if a.revoked else "active"
        rules = f"publish {' '.join(a.publish_rules)}; subscribe {' '.join(a.subscribe_rules)}"
        print(f"{a.name}\t{a.app_id}\t{status}\t{rules}")


def create(args: argparse.Namespace) -> int:
    """Register an app and print its app key, app id and secret key once."""
    return _registry_call(args, "create")


def list_apps(args: argparse.Namespace) -> int:
    """List registered apps (never their keys)."""
    return _registry_call(args, "list")


def revoke(args: argparse.Namespace) -> int:
    """Revoke an app: its key is refused from the next connect on."""
    return _registry_call(args, "revoke")


def rotate_key(args: argparse.Namespace) -> int:
    """Give an app a new app key, printed once; the old key stops working."""
    return _registry_call(args, "rotate")


def allow(args: argparse.Namespace) -> int:
    """Set an app's publish and subscribe rules."""
    return _registry_call(args, "allow")


def keygen(args: argparse.Namespace) -> int:
    """Print a fresh Ed25519 key pair."""
    pair = generate_keypair()
    if args.json:
        print(json.dumps({"app_id": pair.app_id, "secret_key": pair.secret_key}))
    else:
        print(f"app id:     {pair.app_id}")
        print(f"secret key: {pair.secret_key}")
    return 0
