"""The figures of ``ensync bench --compare jetstream``: the setups measured,
one run's figures, their medians over the rounds, ratios and targets, and
the table they are printed as."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

from ensync.bench.display import print_rows
from ensync.bench.peers import Encryption, Mode
from ensync.testing.nats_server import Sync

__all__ = [
    "LATENCY_SETUPS",
    "THROUGHPUT_SETUPS",
    "CompareResult",
    "RunFigures",
    "Setup",
    "SetupFigures",
    "describe",
    "medians",
    "print_table",
    "rate_ratios",
    "targets_met",
]

# Targets (issue "fast path"): shown beside the figures, never enforced.
TARGET_RATE_REUSE = 12_000.0
TARGET_RATE_FRESH = 6_000.0
TARGET_RATIO = 1.0
TARGET_LATENCY_P50_MS = 0.8
TARGET_LATENCY_P99_MS = 2.0
TARGET_CALL_P50_MS = 1.0


@dataclass(frozen=True, slots=True)
class Setup:
    """One thing measured: a system, its encryption, NATS's sync mode."""

    key: str
    label: str
    system: Literal["ensync", "nats"]
    encryption: Encryption
    sync: Sync = "default"


ENSYNC_REUSE = Setup("ensync-reuse", "ensync, reused keys", "ensync", "reuse")
ENSYNC_FRESH = Setup("ensync-fresh", "ensync, fresh keys", "ensync", "fresh")
NATS_PLAIN = Setup("nats", "JetStream, no encryption", "nats", "none")
NATS_REUSE = Setup("nats-reuse", "JetStream + envelope, reused keys", "nats", "reuse")
NATS_FRESH = Setup("nats-fresh", "JetStream + envelope, fresh keys", "nats", "fresh")
NATS_ALWAYS = Setup(
    "nats-always", "JetStream sync always, no encryption", "nats", "none", sync="always"
)
NATS_ALWAYS_REUSE = Setup(
    "nats-always-reuse",
    "JetStream sync always + envelope, reused keys",
    "nats",
    "reuse",
    sync="always",
)

THROUGHPUT_SETUPS = (
    ENSYNC_REUSE,
    ENSYNC_FRESH,
    NATS_PLAIN,
    NATS_REUSE,
    NATS_FRESH,
    NATS_ALWAYS,
    NATS_ALWAYS_REUSE,
)
LATENCY_SETUPS = (ENSYNC_REUSE, ENSYNC_FRESH, NATS_PLAIN, NATS_REUSE)


@dataclass(frozen=True, slots=True)
class RunFigures:
    """One run of one setup."""

    messages: int
    received: int
    duplicates: int
    rate: float
    publish_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    call_p50_ms: float
    call_p99_ms: float
    server_cpu_us_per_message: float
    publisher_cpu_us_per_message: float
    subscriber_cpu_us_per_message: float


@dataclass(frozen=True, slots=True)
class SetupFigures:
    """Medians over the rounds of one setup, with each round's headline."""

    key: str
    label: str
    mode: Mode
    runs: int
    complete: bool
    rate: float
    publish_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    call_p50_ms: float
    call_p99_ms: float
    server_cpu_us_per_message: float
    publisher_cpu_us_per_message: float
    subscriber_cpu_us_per_message: float
    per_round: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CompareResult:
    """The figures of ``--compare jetstream``."""

    messages: int
    latency_messages: int
    payload_bytes: int
    in_flight: int
    latency_rate: float
    transport: str
    rounds: int
    nats_server: str
    throughput: list[SetupFigures]
    latency: list[SetupFigures]
    ratios: dict[str, float]
    targets: dict[str, bool]


def describe(round_index: int, setup: Setup, mode: Mode, figures: RunFigures) -> str:
    lost = figures.messages - figures.received
    missing = f", {lost:,} MISSING" if lost else ""
    if mode == "throughput":
        return (
            f"round {round_index + 1}: {setup.label}: {figures.rate:,.0f} msg/s"
            f" (server {figures.server_cpu_us_per_message:,.0f} µs CPU/msg){missing}"
        )
    return (
        f"round {round_index + 1}: {setup.label} at 1,000/s: p50 {figures.latency_p50_ms:.2f} ms,"
        f" p99 {figures.latency_p99_ms:.2f} ms, publish call p50 {figures.call_p50_ms:.2f} ms"
        f"{missing}"
    )


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 2) if values else 0.0


def medians(
    setup: Setup, mode: Mode, runs: dict[tuple[Mode, str], list[RunFigures]]
) -> SetupFigures:
    mine = runs.get((mode, setup.key), [])

    def median_of(name: str) -> float:
        return _median([float(getattr(run, name)) for run in mine])

    return SetupFigures(
        key=setup.key,
        label=setup.label,
        mode=mode,
        runs=len(mine),
        complete=bool(mine) and all(run.received == run.messages for run in mine),
        rate=median_of("rate"),
        publish_rate=median_of("publish_rate"),
        latency_p50_ms=median_of("latency_p50_ms"),
        latency_p99_ms=median_of("latency_p99_ms"),
        call_p50_ms=median_of("call_p50_ms"),
        call_p99_ms=median_of("call_p99_ms"),
        server_cpu_us_per_message=median_of("server_cpu_us_per_message"),
        publisher_cpu_us_per_message=median_of("publisher_cpu_us_per_message"),
        subscriber_cpu_us_per_message=median_of("subscriber_cpu_us_per_message"),
        per_round=[run.rate if mode == "throughput" else run.latency_p50_ms for run in mine],
    )


def rate_ratios(throughput: Sequence[SetupFigures]) -> dict[str, float]:
    """Each ensync setup's median rate over each JetStream setup's."""
    ours = [f for f in throughput if f.key.startswith("ensync")]
    theirs = [f for f in throughput if f.key.startswith("nats")]
    return {
        f"{mine.key}/{other.key}": round(mine.rate / other.rate, 3) if other.rate else 0.0
        for mine in ours
        for other in theirs
    }


def targets_met(
    throughput: Sequence[SetupFigures], latency: Sequence[SetupFigures], ratios: dict[str, float]
) -> dict[str, bool]:
    rates = {f.key: f.rate for f in throughput}
    best_latency = next(f for f in latency if f.key == ENSYNC_REUSE.key)
    return {
        "reuse_rate_at_least_12000": rates[ENSYNC_REUSE.key] >= TARGET_RATE_REUSE,
        "reuse_at_least_jetstream": ratios[f"{ENSYNC_REUSE.key}/{NATS_PLAIN.key}"] >= TARGET_RATIO,
        "fresh_rate_at_least_6000": rates[ENSYNC_FRESH.key] >= TARGET_RATE_FRESH,
        "latency_p50_at_most_0.8ms": best_latency.latency_p50_ms <= TARGET_LATENCY_P50_MS,
        "latency_p99_at_most_2ms": best_latency.latency_p99_ms <= TARGET_LATENCY_P99_MS,
        "publish_call_p50_at_most_1ms": best_latency.call_p50_ms <= TARGET_CALL_P50_MS,
    }


def print_table(result: CompareResult, out: TextIO) -> None:
    out.write(
        f"{result.messages:,} messages of {result.payload_bytes} B JSON,"
        f" {result.in_flight} in flight, ensync over {result.transport},"
        f" {result.nats_server}, medians of {result.rounds}\n\n"
    )
    rows: list[tuple[str, str]] = [("throughput (at the subscriber)", "")]
    for figures in result.throughput:
        rows.append(
            (
                f"  {figures.key}: {figures.label}",
                f"{figures.rate:>9,.0f} msg/s   server {figures.server_cpu_us_per_message:>6,.0f}"
                f" µs CPU/msg{'' if figures.complete else '   MESSAGES MISSING'}",
            )
        )
    rows.append(("", ""))
    rows.append(("ratios (ensync / JetStream)", ""))
    for key, ratio in result.ratios.items():
        mine, other = key.split("/")
        rows.append((f"  {mine} / {other}", f"{ratio:.2f} x"))
    rows.append(("", ""))
    rows.append(("latency at 1,000 msg/s (publish call to handler)", ""))
    for figures in result.latency:
        rows.append(
            (
                f"  {figures.key}: {figures.label}",
                f"p50 {figures.latency_p50_ms:.2f} ms  p99 {figures.latency_p99_ms:.2f} ms"
                f"  publish call p50 {figures.call_p50_ms:.2f} ms"
                f"{'' if figures.complete else '   MESSAGES MISSING'}",
            )
        )
    rows.append(("", ""))
    rows.append(("targets", ""))
    for name, met in result.targets.items():
        rows.append((f"  {name.replace('_', ' ')}", "ok" if met else "MISSED"))
    print_rows(rows, out)
