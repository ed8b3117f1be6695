"""The store options every command that opens a store shares, and what such
a command checks about the data directory before and after its work."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TypedDict

from ensync.server.datadir import engine_holding
from ensync.server.store import sqlite_file

__all__ = ["StoreOptions", "missing_store", "store_options", "unserved_database"]


class StoreOptions(TypedDict):
    nats_creds: Path | None
    nats_tls_ca: Path | None


def store_options(args: argparse.Namespace) -> StoreOptions:
    """``--nats-creds`` and ``--nats-tls-ca`` as ``open_store`` takes them."""
    creds = getattr(args, "nats_creds", None)
    tls_ca = getattr(args, "nats_tls_ca", None)
    return {
        "nats_creds": Path(creds) if creds else None,
        "nats_tls_ca": Path(tls_ca) if tls_ca else None,
    }


def missing_store(args: argparse.Namespace) -> str | None:
    """Why a command that works on an existing store refuses ``--data``: the
    ``sqlite:`` database it names is not there. Opening it would create an
    empty store, so a mistyped directory would look like one without apps or
    dead letters. ``None`` when the file exists, or when the store is not a
    file on this machine.

    Raises:
        ValueError: ``--store`` names no supported store.
    """
    database = sqlite_file(args.store, Path(args.data))
    if database is None or database.exists():
        return None
    create = f"ensync app create NAME --data {shlex.quote(args.data)}"
    if args.store != "sqlite:":
        create += f" --store {shlex.quote(args.store)}"
    return (
        f"no ensync store in {database.parent} (it has no {database.name}): check --data,"
        f" or create one with `{create}` (or by serving it: `ensync serve`)"
    )


def unserved_database(args: argparse.Namespace) -> Path | None:
    """The ``sqlite:`` database of ``args`` if no engine serves it now;
    ``None`` if one does, if the store is not a file on this machine, or if
    that cannot be told (its directory cannot be read).

    Raises:
        ValueError: ``--store`` names no supported store.
    """
    database = sqlite_file(args.store, Path(args.data))
    if database is None:
        return None
    try:
        serving = engine_holding(database)
    except OSError:
        return None  # better nothing than a wrong "no engine serves it"
    return database if serving is None else None
