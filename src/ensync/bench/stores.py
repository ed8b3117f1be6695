"""``ensync bench --compare stores``: the same end-to-end run with the engine
on each of its stores, taking turns, medians of ``--rounds``.

Setups: SQLite (one engine); one NATS JetStream server (replicas 1,
JetStream's default sync); three NATS servers (replicas 3, every write
fsynced, as ``ensync dev-cluster`` runs them); and two engine nodes on those
three, the publisher on one node and the subscriber on the other. Every run
is ``ensync bench``'s: an SDK publisher and subscriber in this process,
``--concurrency`` publishes in flight, ~1 KB payloads persisted, encrypted
and acked. Ratios are against SQLite in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ensync._loop import run as run_loop
from ensync.bench.common import BenchError
from ensync.bench.display import Progress, print_rows
from ensync.bench.throughput import BenchResult, bench_once

__all__ = ["STORE_SETUPS", "StoreFigures", "StoresResult", "run"]

DEFAULT_MESSAGES = 10_000

# (key, label, --store, --nodes)
STORE_SETUPS: tuple[tuple[str, str, str, int], ...] = (
    ("sqlite", "SQLite, one engine", "sqlite", 1),
    ("nats", "JetStream, 1 server (replicas 1)", "nats", 1),
    ("nats-cluster", "JetStream, 3 servers (replicas 3, sync always)", "nats-cluster", 1),
    ("nats-cluster-2", "two engine nodes on 3 servers", "nats-cluster", 2),
)


@dataclass(frozen=True, slots=True)
class StoreFigures:
    """Medians of one setup's rounds."""

    key: str
    label: str
    rates: list[float]
    end_to_end_rate: float
    latency_p50_ms: float
    engine_cpu_percent: float
    store_cpu_percent: float
    ratio_to_sqlite: float


@dataclass(frozen=True, slots=True)
class StoresResult:
    messages: int
    concurrency: int
    rounds: int
    setups: list[StoreFigures]


def run(args: argparse.Namespace) -> int:
    """Run every setup ``--rounds`` times; print the table (or ``--json``)."""
    messages = args.messages if args.messages is not None else DEFAULT_MESSAGES
    progress = Progress()
    runs: dict[str, list[BenchResult]] = {key: [] for key, *_ in STORE_SETUPS}
    try:
        for round_index in range(args.rounds):
            for key, label, store, nodes in STORE_SETUPS:
                progress.show(f"round {round_index + 1}/{args.rounds}: {label}", force=True)
                one = replace_args(args, messages=messages, store=store, nodes=nodes)
                once = run_loop(bench_once(one))
                if once.received != once.messages:
                    raise BenchError(f"{label}: {once.received}/{once.messages} received")
                runs[key].append(once)
                progress.note(
                    f"round {round_index + 1}, {label}: {once.end_to_end_rate:,.0f} msg/s"
                )
    except BenchError as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    progress.finish()
    base = statistics.median(r.end_to_end_rate for r in runs["sqlite"])
    figures = [
        StoreFigures(
            key=key,
            label=label,
            rates=[r.end_to_end_rate for r in runs[key]],
            end_to_end_rate=round(statistics.median(r.end_to_end_rate for r in runs[key]), 1),
            latency_p50_ms=round(statistics.median(r.latency_p50_ms for r in runs[key]), 2),
            engine_cpu_percent=round(statistics.median(r.engine_cpu_percent for r in runs[key]), 1),
            store_cpu_percent=round(statistics.median(r.store_cpu_percent for r in runs[key]), 1),
            ratio_to_sqlite=round(statistics.median(r.end_to_end_rate for r in runs[key]) / base, 2)
            if base
            else 0.0,
        )
        for key, label, _, _ in STORE_SETUPS
    ]
    result = StoresResult(messages, args.concurrency, args.rounds, figures)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        _print_table(result, sys.stdout)
    return 0


def replace_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of ``args`` with ``changes``."""
    return argparse.Namespace(**{**vars(args), **changes})


def _print_table(result: StoresResult, out: TextIO) -> None:
    out.write(
        f"{result.messages:,} messages, {result.concurrency} in flight, medians of"
        f" {result.rounds}\n\n"
    )
    rows = [
        (
            figures.label,
            f"{figures.end_to_end_rate:>8,.0f} msg/s  {figures.ratio_to_sqlite:.2f}x SQLite"
            f"  p50 {figures.latency_p50_ms:.1f} ms  engine CPU {figures.engine_cpu_percent:.0f} %"
            + (f"  NATS CPU {figures.store_cpu_percent:.0f} %" if figures.key != "sqlite" else ""),
        )
        for figures in result.setups
    ]
    print_rows(rows, out)
