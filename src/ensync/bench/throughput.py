"""The throughput program of ``ensync bench``: end-to-end rate and latency.

The engine runs as its own process (``ensync serve`` on a temporary data
directory, sqlite store, or NATS servers started for the run), so it has a
core of its own; the publisher and the subscriber run in this process. Every
message is a ~1 KB JSON payload, published with ``persist: true``, encrypted
for the recipient, decrypted and acked by the subscriber. Latency is
publish-call start to handler entry.

The CPU time used by the engine and by the clients is reported beside the
figures: a component using less than a whole core while the other is
saturated is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from ensync._loop import run as run_loop
from ensync.bench.common import (
    BenchError,
    BenchStore,
    EngineProcess,
    bench_store,
    client_engine,
    close_quietly,
    cpu_seconds,
    percentile_ms,
    publish_load,
    register_apps,
    running_engine,
)
from ensync.bench.display import Progress, bar, print_rows
from ensync.models import Message
from ensync.server.core.apps import NewApp
from ensync.server.runtime.clock import wall_clock_ms

__all__ = ["BenchResult", "bench_once", "print_table", "run"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    """The figures one run produced."""

    transport: str
    store: str
    nodes: int
    messages: int
    received: int
    payload_bytes: int
    target_rate: float
    duration_s: float
    publish_rate: float
    end_to_end_rate: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    engine_cpu_percent: float
    client_cpu_percent: float
    # NATS servers the benchmark started (0 for sqlite, which the engine runs).
    store_cpu_percent: float = 0.0


def run(args: argparse.Namespace) -> int:
    """Run once and print the figures (``--json``: one object); returns the exit code."""
    try:
        result = run_loop(bench_once(args))
    except BenchError as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print_table(result, sys.stdout)
    return 0 if result.received == result.messages else 1


async def bench_once(args: argparse.Namespace) -> BenchResult:
    """One end-to-end run: engines on a temporary data directory, the publisher
    and the subscriber in this process; raises :class:`BenchError` if it cannot run."""
    data_dir = Path(tempfile.mkdtemp(prefix="ensync-bench-"))
    try:
        async with bench_store(args.store, data_dir) as store:
            publisher_app, subscriber_app = await register_apps(
                data_dir, ["bench-publisher", "bench-subscriber"], store.url
            )
            extra = ["--store", store.url] if store.url is not None else []
            async with contextlib.AsyncExitStack() as stack:
                nodes = [
                    await stack.enter_async_context(
                        running_engine(
                            data_dir if args.nodes == 1 else data_dir / f"node-{index}",
                            extra_args=extra,
                        )
                    )
                    for index in range(args.nodes)
                ]
                return await _drive(args, nodes, store, publisher_app, subscriber_app)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _drive(
    args: argparse.Namespace,
    nodes: list[EngineProcess],
    store: BenchStore,
    pub_app: NewApp,
    sub_app: NewApp,
) -> BenchResult:
    total: int = args.messages
    engine = client_engine(args.transport, nodes[0].port(args.transport))
    other = (
        client_engine(args.transport, nodes[-1].port(args.transport)) if len(nodes) > 1 else engine
    )
    try:
        publisher = await engine.create_client(pub_app.app_key)
        subscriber = await other.create_client(sub_app.app_key, app_secret_key=sub_app.secret_key)
        latencies_ns: list[int] = []
        sent_at: dict[int, int] = {}
        all_in = asyncio.Event()
        seen: set[int] = set()

        def handle(message: Message) -> None:
            arrived = time.perf_counter_ns()
            seq = message.payload["seq"]
            if seq in seen:
                return  # a redelivery: count each message once
            seen.add(seq)
            latencies_ns.append(arrived - sent_at[seq])
            if len(seen) == total:
                all_in.set()

        subscription = await subscriber.subscribe("bench/messages")
        subscription.on(handle)
        filler = "x" * max(0, args.payload_bytes - 60)
        recipients = [sub_app.app_id]
        metadata = {"persist": True, "headers": {}}
        progress = Progress()

        def show(published: int, force: bool = False) -> None:
            progress.show(
                f"{bar(len(seen) / total)} published {published}/{total}"
                f"  received {len(seen)}/{total}",
                force=force,
            )

        async def publish_one(seq: int) -> None:
            sent_at[seq] = time.perf_counter_ns()
            payload = {"seq": seq, "sent": wall_clock_ms(), "data": filler}
            await publisher.publish("bench/messages", recipients, payload, metadata)

        engine_cpu0 = sum(node.cpu_seconds() for node in nodes)
        store_cpu0 = sum(cpu_seconds(pid) for pid in store.pids)
        client_cpu0 = time.process_time()
        start = time.perf_counter()
        figures = await publish_load(
            publish_one,
            count=total,
            concurrency=args.concurrency,
            rate=args.rate,
            on_progress=lambda published, _failed: show(published),
        )
        if figures.failed:
            raise BenchError(f"{figures.failed} publishes failed")
        publish_done = time.perf_counter()
        timeout_s = 30.0 + total / 500
        while not all_in.is_set():
            try:
                await asyncio.wait_for(all_in.wait(), 0.2)
            except TimeoutError:
                if time.perf_counter() - publish_done > timeout_s:
                    break
            show(figures.published)
        end = time.perf_counter()
        show(figures.published, force=True)
        progress.finish()
        engine_cpu = sum(node.cpu_seconds() for node in nodes) - engine_cpu0
        store_cpu = sum(cpu_seconds(pid) for pid in store.pids) - store_cpu0
        client_cpu = time.process_time() - client_cpu0
        duration = end - start
        ordered = sorted(latencies_ns)
        return BenchResult(
            transport=args.transport,
            store=args.store or "sqlite",
            nodes=len(nodes),
            messages=total,
            received=len(seen),
            payload_bytes=args.payload_bytes,
            target_rate=args.rate,
            duration_s=round(duration, 3),
            publish_rate=round(figures.published / (publish_done - start), 1),
            end_to_end_rate=round(len(seen) / duration, 1),
            latency_p50_ms=percentile_ms(ordered, 0.50),
            latency_p90_ms=percentile_ms(ordered, 0.90),
            latency_p99_ms=percentile_ms(ordered, 0.99),
            latency_max_ms=percentile_ms(ordered, 1.0),
            engine_cpu_percent=round(100 * engine_cpu / duration, 1),
            client_cpu_percent=round(100 * client_cpu / duration, 1),
            store_cpu_percent=round(100 * store_cpu / duration, 1),
        )
    finally:
        await close_quietly(engine)
        if other is not engine:
            await close_quietly(other)


def print_table(result: BenchResult, out: TextIO) -> None:
    """The figures as a two-column table."""
    rate = f"{result.target_rate:g}/s" if result.target_rate else "as fast as possible"
    print_rows(
        [
            ("transport", result.transport),
            (
                "store",
                result.store + (f", {result.nodes} engine nodes" if result.nodes > 1 else ""),
            ),
            ("messages", f"{result.received}/{result.messages} received"),
            ("payload", f"{result.payload_bytes} B JSON, persisted, encrypted, acked"),
            ("target rate", rate),
            ("duration", f"{result.duration_s:.2f} s"),
            ("publish rate", f"{result.publish_rate:,.0f} msg/s"),
            ("end-to-end rate", f"{result.end_to_end_rate:,.0f} msg/s"),
            ("latency p50", f"{result.latency_p50_ms:.2f} ms"),
            ("latency p90", f"{result.latency_p90_ms:.2f} ms"),
            ("latency p99", f"{result.latency_p99_ms:.2f} ms"),
            ("latency max", f"{result.latency_max_ms:.2f} ms"),
            ("engine CPU", f"{result.engine_cpu_percent:.0f} % of one core"),
            (
                "client CPU",
                f"{result.client_cpu_percent:.0f} % of one core (publisher + subscriber)",
            ),
            *(
                [("NATS CPU", f"{result.store_cpu_percent:.0f} % of one core")]
                if result.store != "sqlite"
                else []
            ),
        ],
        out,
    )
