"""The engine as a real ``ensync serve`` process that a test can SIGKILL and
start again (:class:`ensync.testing.process.EngineProcess`, which the
benchmarks use too), and what the fault tests need around it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store import open_store
from ensync.testing.process import EngineProcess
from tests.support.timing import seconds

__all__ = [
    "AppKeys",
    "EngineProcess",
    "create_app",
    "integrity_check",
    "register_shop_and_warehouse",
]


@dataclass(frozen=True, slots=True)
class AppKeys:
    """What ``ensync app create --json`` prints."""

    name: str
    app_key: str
    app_id: str
    secret_key: str


async def create_app(data: Path, name: str) -> AppKeys:
    """Register an app in ``data`` with the real command line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ensync.cli.main",
        "app",
        "create",
        name,
        "--data",
        str(data),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds(60))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"ensync app create {name} failed: {err.decode()}"
    fields = json.loads(out)
    return AppKeys(fields["name"], fields["app_key"], fields["app_id"], fields["secret_key"])


async def register_shop_and_warehouse(store_url: str, root: Path) -> tuple[NewApp, NewApp]:
    """Register the apps ``shop`` and ``warehouse`` in a store (a cluster's,
    as a command does: without joining its nodes)."""
    store = open_store(store_url, root, serve=False)
    await store.open()
    try:
        registry = AppRegistry(store, wall_clock_ms, cache_ms=0)
        return await registry.create("shop"), await registry.create("warehouse")
    finally:
        await store.close()


def integrity_check(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` on ``db``, opened read-only: ``["ok"]`` when sound."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=seconds(10))
    try:
        return [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()
