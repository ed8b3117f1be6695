"""``ensync bench --backlog N``: the engine with N pending messages.

What it measures, on two engine processes (sqlite, temporary directories):

1. **Prefill.** N persisted ~1 KB messages for one recipient app, spread
   over a few partitions, none delivered. By default they are written
   straight into the backlog engine's store with ``SqliteStore.append`` in
   large batches *before that engine starts* (one payload is sealed for the
   recipient once and reused; blocks increase per partition), because
   publishing a million messages through the engine takes many minutes.
   ``--backlog-fill engine`` publishes them through an engine instead.
2. **Memory with the backlog.** The backlog engine's peak RSS (VmHWM from
   /proc) over the whole run; the target is under 300 MB for N = 1,000,000.
3. **Publish throughput** (persisted, encrypted, ``--payload-bytes`` JSON,
   one client with ``--concurrency`` publishes in flight, as in the plain
   bench; no subscriber) on an empty engine and on the backlog engine, in
   alternating rounds of ``--messages``; the ratio of the medians should be
   at least 0.8 (within 20 %).
4. **A slow consumer.** On the backlog engine, a subscriber whose handler
   sleeps ``--slow-handler-ms`` per message reads the backlogged partitions
   while the publisher keeps publishing to them at full speed for
   ``--slow-seconds``. The engine's RSS is sampled against the count of
   messages published (a slope in kB per 10k): the consumer must not make
   it grow (the engine holds a bounded window per partition; the rest stays
   on disk). The same slope is measured during the rounds, with no
   subscriber at all: growth found in both comes from the publish path.

The figures are reported; the targets are judged (``*_ok``) but do not
change the exit code, which is non-zero only when the run itself failed.
Memory is in MB of 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ensync._loop import run as run_loop
from ensync.bench.backlog_report import BacklogResult, SlowConsumer, print_table
from ensync.bench.common import (
    BenchError,
    EngineProcess,
    PublishFigures,
    ResourceSampler,
    client_engine,
    close_quietly,
    http_get,
    mb,
    pending_messages,
    publish_load,
    register_apps,
    running_engine,
)
from ensync.bench.display import Progress, bar
from ensync.bench.fill import (
    Prefill,
    Publisher,
    partition_names,
    prefill_engine,
    prefill_store,
)
from ensync.client.engine import BaseEngine
from ensync.models import Message
from ensync.server.core.apps import NewApp

__all__ = [
    "DEFAULT_BACKLOG",
    "PEAK_RSS_TARGET_MB",
    "THROUGHPUT_RATIO_TARGET",
    "BacklogResult",
    "Prefill",
    "SlowConsumer",
    "run",
]

DEFAULT_BACKLOG = 1_000_000
PEAK_RSS_TARGET_MB = 300.0
THROUGHPUT_RATIO_TARGET = 0.8

_PUBLISHER = "bench-publisher"
_RECIPIENT = "bench-backlog"
_WARMUP = 200


def run(args: argparse.Namespace) -> int:
    """Run the backlog program and print its figures; returns the exit code."""
    try:
        result = run_loop(_backlog(args))
    except BenchError as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print_table(result, sys.stdout)
    return 0


async def _backlog(args: argparse.Namespace) -> BacklogResult:
    base = Path(tempfile.mkdtemp(prefix="ensync-bench-backlog-"))
    progress = Progress()
    try:
        empty_dir, backlog_dir = base / "empty", base / "backlog"
        empty_apps = await register_apps(empty_dir, [_PUBLISHER, _RECIPIENT])
        backlog_apps = await register_apps(backlog_dir, [_PUBLISHER, _RECIPIENT])
        fill = prefill_store if args.backlog_fill == "store" else prefill_engine
        prefill = await fill(args, backlog_dir, backlog_apps[0], backlog_apps[1], progress)
        progress.note(
            f"prefill ({prefill.method}): {prefill.messages:,} messages in"
            f" {prefill.partitions} partitions, {prefill.duration_s:.1f} s"
            f" ({prefill.rate:,.0f}/s), database {prefill.db_mb:,.0f} MB"
        )
        async with (
            running_engine(empty_dir) as empty_engine,
            running_engine(backlog_dir) as backlog_engine,
        ):
            return await _measure(
                args, prefill, empty_engine, empty_apps, backlog_engine, backlog_apps, progress
            )
    finally:
        progress.finish()
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- measurements


async def _measure(
    args: argparse.Namespace,
    prefill: Prefill,
    empty_engine: EngineProcess,
    empty_apps: list[NewApp],
    backlog_engine: EngineProcess,
    backlog_apps: list[NewApp],
    progress: Progress,
) -> BacklogResult:
    rss_after_start = backlog_engine.memory().rss_bytes
    pending_at_start = await pending_messages(backlog_engine.http_port)
    progress.note(
        f"backlog engine up: {pending_at_start:,} pending messages,"
        f" RSS {mb(rss_after_start):,.1f} MB"
    )
    names = partition_names(args.backlog_partitions)
    sdks: list[BaseEngine] = []
    try:
        publishers: list[Publisher] = []
        for engine, (pub_app, recipient) in (
            (empty_engine, empty_apps),
            (backlog_engine, backlog_apps),
        ):
            sdk = client_engine(args.transport, engine.port(args.transport))
            sdks.append(sdk)
            client = await sdk.create_client(pub_app.app_key)
            publish = Publisher(client, recipient, names, args.payload_bytes)
            await publish_load(publish, count=_WARMUP, concurrency=args.concurrency)
            publishers.append(publish)
        rounds: list[tuple[PublishFigures, PublishFigures]] = []
        probe = publishers[1]
        async with ResourceSampler(backlog_engine.pid, 1.0, lambda: probe.published) as sampler:
            for index in range(args.rounds):
                rounds.append(await _round(args, index, publishers, progress))
        rounds_slope = sampler.rss_slope_bytes_per_count()
        peak_after_publish = backlog_engine.memory().peak_rss_bytes
        slow: SlowConsumer | None = None
        if args.slow_seconds > 0:
            slow = await _slow_consumer(args, backlog_engine, backlog_apps[1], probe, progress)
    finally:
        for sdk in sdks:
            await close_quietly(sdk)
    peak = backlog_engine.memory().peak_rss_bytes
    empty_median = _median(rounds, 0)
    backlog_median = _median(rounds, 1)
    ratio = round(backlog_median.rate / empty_median.rate, 3) if empty_median.rate else 0.0
    return BacklogResult(
        backlog=args.backlog,
        pending_at_start=pending_at_start,
        transport=args.transport,
        payload_bytes=args.payload_bytes,
        concurrency=args.concurrency,
        prefill=prefill,
        rss_after_start_mb=mb(rss_after_start),
        peak_rss_after_publish_mb=mb(peak_after_publish),
        peak_rss_mb=mb(peak),
        peak_rss_target_mb=PEAK_RSS_TARGET_MB,
        peak_rss_ok=mb(peak) < PEAK_RSS_TARGET_MB,
        empty_engine_peak_rss_mb=mb(empty_engine.memory().peak_rss_bytes),
        rounds=[(empty.rate, backlogged.rate) for empty, backlogged in rounds],
        empty_publish=empty_median,
        backlog_publish=backlog_median,
        throughput_ratio=ratio,
        throughput_ratio_target=THROUGHPUT_RATIO_TARGET,
        throughput_ok=ratio >= THROUGHPUT_RATIO_TARGET,
        rounds_rss_slope_kb_per_10k_published=_kb_per_10k(rounds_slope),
        slow_consumer=slow,
        pending_at_end=await pending_messages(backlog_engine.http_port),
        engine_problems=[*empty_engine.log_problems(), *backlog_engine.log_problems()][:20],
    )


async def _round(
    args: argparse.Namespace, index: int, publishers: list[Publisher], progress: Progress
) -> tuple[PublishFigures, PublishFigures]:
    """One throughput round: the empty engine, then the backlog engine."""
    pair = []
    for label, publish in zip(("empty", "backlog"), publishers, strict=True):
        what = f"round {index + 1}/{args.rounds}, {label} engine"
        figures = await publish_load(
            publish,
            count=args.messages,
            concurrency=args.concurrency,
            on_progress=_count_progress(progress, what, args.messages),
        )
        if figures.failed:
            raise BenchError(f"{figures.failed} publishes failed ({label} engine)")
        pair.append(figures)
    progress.note(
        f"round {index + 1}/{args.rounds}: empty engine {pair[0].rate:,.0f} msg/s,"
        f" backlog engine {pair[1].rate:,.0f} msg/s"
    )
    return pair[0], pair[1]


def _kb_per_10k(bytes_per_message: float) -> float:
    return round(bytes_per_message * 10_000 / 1000, 1)


def _count_progress(progress: Progress, what: str, total: int) -> Callable[[int, int], None]:
    def show(done: int, _failed: int) -> None:
        progress.show(f"{what} {bar(done / total)} {done:,}/{total:,} published")

    return show


def _median(rounds: list[tuple[PublishFigures, PublishFigures]], which: int) -> PublishFigures:
    """The round whose rate is the median one (the lower middle for an even count)."""
    ordered = sorted((pair[which] for pair in rounds), key=lambda figures: figures.rate)
    return ordered[(len(ordered) - 1) // 2]


async def _slow_consumer(
    args: argparse.Namespace,
    engine: EngineProcess,
    recipient: NewApp,
    publish: Publisher,
    progress: Progress,
) -> SlowConsumer:
    """Publish at full speed into the backlog while a slow subscriber reads it."""
    names = partition_names(args.backlog_partitions)
    handler_s = args.slow_handler_ms / 1000
    consumed = 0
    health = {"buffered": 0, "in_flight": 0}

    async def slow_handler(_message: Message) -> None:
        nonlocal consumed
        await asyncio.sleep(handler_s)
        consumed += 1

    async def watch_health() -> None:
        while True:
            try:
                reading = json.loads(await http_get(engine.http_port, "/healthz"))
            except (OSError, ValueError, BenchError):
                reading = {}  # a missed reading; the next one counts
            for key in health:
                health[key] = max(health[key], int(reading.get(key, 0)))
            await asyncio.sleep(1.0)

    def on_progress(done: int, _failed: int) -> None:
        elapsed = time.perf_counter() - start
        progress.show(
            f"slow consumer {bar(elapsed / args.slow_seconds)} {elapsed:,.0f}/"
            f"{args.slow_seconds:g} s  published {done:,}  consumed {consumed:,}"
            f"  engine RSS {mb(engine.memory().rss_bytes):,.1f} MB"
        )

    sdk = client_engine(args.transport, engine.port(args.transport))
    watcher: asyncio.Task[None] | None = None
    try:
        subscriber = await sdk.create_client(recipient.app_key, app_secret_key=recipient.secret_key)
        for name in names:
            (await subscriber.subscribe(name)).on(slow_handler)
        watcher = asyncio.get_running_loop().create_task(watch_health())
        start = time.perf_counter()
        async with ResourceSampler(engine.pid, 1.0, lambda: publish.published) as sampler:
            figures = await publish_load(
                publish,
                until=start + args.slow_seconds,
                concurrency=args.concurrency,
                on_progress=on_progress,
            )
        duration = time.perf_counter() - start
    finally:
        if watcher is not None:
            watcher.cancel()
        await close_quietly(sdk)
    if figures.failed:
        raise BenchError(f"{figures.failed} publishes failed during the slow-consumer phase")
    samples = sampler.samples
    progress.note(
        f"slow consumer: published {figures.published:,} ({figures.rate:,.0f}/s),"
        f" consumed {consumed:,}, engine RSS {mb(samples[0].rss_bytes):,.1f} ->"
        f" {mb(samples[-1].rss_bytes):,.1f} MB (max {mb(sampler.max_rss_bytes):,.1f})"
    )
    return SlowConsumer(
        duration_s=round(duration, 2),
        handler_ms=args.slow_handler_ms,
        consumed=consumed,
        consume_rate=round(consumed / duration, 1),
        publish=figures,
        rss_start_mb=mb(samples[0].rss_bytes),
        rss_end_mb=mb(samples[-1].rss_bytes),
        rss_max_mb=mb(sampler.max_rss_bytes),
        rss_slope_kb_per_10k_published=_kb_per_10k(sampler.rss_slope_bytes_per_count()),
        buffered_max=health["buffered"],
        in_flight_max=health["in_flight"],
        samples=[(s.at_s, mb(s.rss_bytes), s.count) for s in samples],
    )
