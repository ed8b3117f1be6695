"""How ``ensync bench --backlog`` builds its backlog: straight into the sqlite
store (fast, before the engine serves it) and through a running engine
(what a real backlog costs to publish), with the warm-up publisher both use."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensync.bench.common import (
    BenchError,
    client_engine,
    close_quietly,
    mb,
    publish_load,
    running_engine,
)
from ensync.bench.display import Progress, bar
from ensync.client.client import EnSyncClient
from ensync.crypto import seal
from ensync.server.core.apps import NewApp
from ensync.server.core.ids import new_idem
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store.base import Appended, NewMessage
from ensync.server.store.sqlite import SqliteStore

__all__ = [
    "METADATA",
    "PREFILL_BATCH",
    "Prefill",
    "Publisher",
    "db_bytes",
    "partition_names",
    "payload_of",
    "prefill_engine",
    "prefill_store",
    "show_fill",
]

PREFILL_BATCH = 5_000
METADATA = {"persist": True, "headers": {}}


@dataclass(frozen=True, slots=True)
class Prefill:
    """How the backlog got into the store."""

    method: str
    messages: int
    partitions: int
    duration_s: float
    rate: float
    db_mb: float


def partition_names(partitions: int) -> list[str]:
    return [f"bench/backlog/{index}" for index in range(partitions)]


def payload_of(payload_bytes: int) -> dict[str, Any]:
    return {"seq": 0, "sent": wall_clock_ms(), "data": "x" * max(0, payload_bytes - 60)}


# ---------------------------------------------------------------------- prefill


async def prefill_store(
    args: argparse.Namespace,
    data_dir: Path,
    publisher: NewApp,
    recipient: NewApp,
    progress: Progress,
) -> Prefill:
    """Append the backlog straight into the (not yet served) sqlite store."""
    total: int = args.backlog
    names = partition_names(args.backlog_partitions)
    payload = payload_of(args.payload_bytes)
    plaintext = json.dumps(payload, separators=(",", ":")).encode()
    envelope = seal(plaintext, recipient.app_id)  # sealed once, shared by every message
    metadata = json.dumps(METADATA, separators=(",", ":"))
    payload_metadata = json.dumps(
        {
            "byte_size": len(plaintext),
            "skeleton": {"seq": "integer", "sent": "long", "data": "string"},
        },
        separators=(",", ":"),
    )
    store = SqliteStore(data_dir / "ensync.db", synchronous="NORMAL")
    await store.open()
    start = time.perf_counter()
    try:
        in_flight: list[asyncio.Task[list[Appended]]] = []
        written = 0
        for first in range(0, total, PREFILL_BATCH):
            now = wall_clock_ms()
            batch = [
                NewMessage(
                    idem=new_idem(now),
                    recipient=recipient.app_id,
                    name=names[seq % len(names)],
                    payload=envelope,
                    metadata=metadata,
                    sender=publisher.app_id,
                    created_at_ms=now,
                    payload_metadata=payload_metadata,
                )
                for seq in range(first, min(total, first + PREFILL_BATCH))
            ]
            # Two appends in flight: the next batch is built while one commits.
            in_flight.append(
                asyncio.get_running_loop().create_task(
                    store.append(batch, now_ms=now, dedupe_since_ms=now)
                )
            )
            if len(in_flight) >= 2:
                await in_flight.pop(0)
            written += len(batch)
            show_fill(progress, "prefill", written, total, start)
        for task in in_flight:
            await task
        show_fill(progress, "prefill", total, total, start, force=True)
    finally:
        await store.close()
    duration = time.perf_counter() - start
    return Prefill(
        method="store",
        messages=total,
        partitions=len(names),
        duration_s=round(duration, 2),
        rate=round(total / duration, 1),
        db_mb=mb(db_bytes(data_dir)),
    )


async def prefill_engine(
    args: argparse.Namespace,
    data_dir: Path,
    publisher: NewApp,
    recipient: NewApp,
    progress: Progress,
) -> Prefill:
    """Publish the backlog through an engine (that is then stopped)."""
    total: int = args.backlog
    names = partition_names(args.backlog_partitions)
    start = time.perf_counter()
    async with running_engine(data_dir, log_name="fill-engine.log") as engine:
        sdk = client_engine(args.transport, engine.port(args.transport))
        try:
            client = await sdk.create_client(publisher.app_key)
            figures = await publish_load(
                Publisher(client, recipient, names, args.payload_bytes),
                count=total,
                concurrency=args.concurrency,
                on_progress=lambda done, _failed: show_fill(
                    progress, "prefill through the engine", done, total, start
                ),
            )
        finally:
            await close_quietly(sdk)
    if figures.failed:
        raise BenchError(f"{figures.failed} publishes of the backlog failed")
    duration = time.perf_counter() - start
    return Prefill(
        method="engine",
        messages=total,
        partitions=len(names),
        duration_s=round(duration, 2),
        rate=round(total / duration, 1),
        db_mb=mb(db_bytes(data_dir)),
    )


def show_fill(
    progress: Progress, what: str, done: int, total: int, start: float, *, force: bool = False
) -> None:
    elapsed = max(1e-9, time.perf_counter() - start)
    progress.show(
        f"{what} {bar(done / total)} {done:,}/{total:,} messages  {done / elapsed:,.0f}/s",
        force=force,
    )


def db_bytes(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in data_dir.glob("ensync.db*"))


class Publisher:
    """``publish(seq)`` for :func:`publish_load`: one client, the partitions in turn."""

    def __init__(
        self, client: EnSyncClient, recipient: NewApp, names: list[str], payload_bytes: int
    ) -> None:
        self._client = client
        self._recipients = [recipient.app_id]
        self.partition_names = names
        self._filler = "x" * max(0, payload_bytes - 60)
        self.published = 0

    async def __call__(self, seq: int) -> None:
        payload = {"seq": seq, "sent": wall_clock_ms(), "data": self._filler}
        name = self.partition_names[seq % len(self.partition_names)]
        await self._client.publish(name, self._recipients, payload, METADATA)
        self.published += 1
