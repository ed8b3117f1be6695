"""The figures of ``ensync bench --backlog`` and how they are printed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from ensync.bench.common import PublishFigures
from ensync.bench.display import print_rows
from ensync.bench.fill import Prefill

__all__ = ["BacklogResult", "SlowConsumer", "print_table"]


@dataclass(frozen=True, slots=True)
class SlowConsumer:
    """Publishing into the backlog while a slow subscriber reads it."""

    duration_s: float
    handler_ms: float
    consumed: int
    consume_rate: float
    publish: PublishFigures
    rss_start_mb: float
    rss_end_mb: float
    rss_max_mb: float
    rss_slope_kb_per_10k_published: float
    buffered_max: int
    in_flight_max: int
    samples: list[tuple[float, float, int]]
    """(seconds, RSS MB, messages published so far), about one per second."""


@dataclass(frozen=True, slots=True)
class BacklogResult:
    """The figures of one ``--backlog`` run."""

    backlog: int
    pending_at_start: int
    transport: str
    payload_bytes: int
    concurrency: int
    prefill: Prefill
    rss_after_start_mb: float
    peak_rss_after_publish_mb: float
    peak_rss_mb: float
    peak_rss_target_mb: float
    peak_rss_ok: bool
    empty_engine_peak_rss_mb: float
    rounds: list[tuple[float, float]]
    """(empty engine msg/s, backlog engine msg/s) per round."""
    empty_publish: PublishFigures
    backlog_publish: PublishFigures
    throughput_ratio: float
    throughput_ratio_target: float
    throughput_ok: bool
    rounds_rss_slope_kb_per_10k_published: float
    """Engine RSS against messages published during the rounds (no subscriber)."""
    slow_consumer: SlowConsumer | None
    pending_at_end: int
    engine_problems: list[str]


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_table(result: BacklogResult, out: TextIO) -> None:
    """The figures as a two-column table, then the engine's warnings."""
    prefill = result.prefill
    empty, backlogged = result.empty_publish, result.backlog_publish
    rows: list[tuple[str, str]] = [
        ("backlog", f"{result.pending_at_start:,} pending at start ({result.backlog:,} asked)"),
        (
            "prefill",
            f"{prefill.method}: {prefill.messages:,} in {prefill.partitions} partitions,"
            f" {prefill.duration_s:.1f} s, database {prefill.db_mb:,.0f} MB",
        ),
        (
            "payload",
            f"{result.payload_bytes} B JSON, persisted, encrypted, {result.transport},"
            f" {result.concurrency} in flight",
        ),
        ("engine RSS at start", f"{result.rss_after_start_mb:,.1f} MB"),
        ("peak RSS after publish", f"{result.peak_rss_after_publish_mb:,.1f} MB"),
        (
            "peak RSS (VmHWM)",
            f"{result.peak_rss_mb:,.1f} MB (target < {result.peak_rss_target_mb:g} MB:"
            f" {_verdict(result.peak_rss_ok)}); empty engine {result.empty_engine_peak_rss_mb:,.1f}"
            " MB",
        ),
        (
            "publish, empty engine",
            f"{empty.rate:,.0f} msg/s (p50 {empty.latency_p50_ms:.1f} ms,"
            f" p99 {empty.latency_p99_ms:.1f} ms)",
        ),
        (
            "publish, with backlog",
            f"{backlogged.rate:,.0f} msg/s (p50 {backlogged.latency_p50_ms:.1f} ms,"
            f" p99 {backlogged.latency_p99_ms:.1f} ms)",
        ),
        (
            "throughput ratio",
            f"{result.throughput_ratio:.2f} (target >= {result.throughput_ratio_target:g}:"
            f" {_verdict(result.throughput_ok)}); rounds "
            + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in result.rounds),
        ),
        (
            "engine RSS in rounds",
            f"{result.rounds_rss_slope_kb_per_10k_published:+,.1f} kB per 10k published"
            " (no subscriber)",
        ),
    ]
    slow = result.slow_consumer
    if slow is not None:
        rows += [
            (
                "slow consumer",
                f"{slow.handler_ms:g} ms per message: consumed {slow.consumed:,}"
                f" ({slow.consume_rate:,.0f}/s) in {slow.duration_s:.0f} s",
            ),
            (
                "  publish meanwhile",
                f"{slow.publish.published:,} at {slow.publish.rate:,.0f} msg/s"
                f" (p50 {slow.publish.latency_p50_ms:.1f} ms,"
                f" p99 {slow.publish.latency_p99_ms:.1f} ms)",
            ),
            (
                "  engine RSS",
                f"{slow.rss_start_mb:,.1f} -> {slow.rss_end_mb:,.1f} MB, max"
                f" {slow.rss_max_mb:,.1f} MB; {slow.rss_slope_kb_per_10k_published:+,.1f} kB"
                " per 10k published",
            ),
            (
                "  engine buffers",
                f"at most {slow.buffered_max:,} buffered, {slow.in_flight_max:,} in flight",
            ),
        ]
    rows.append(("pending at end", f"{result.pending_at_end:,}"))
    rows.append(("engine warnings", str(len(result.engine_problems))))
    print_rows(rows, out)
    for line in result.engine_problems:
        out.write(f"  {line}\n")
