"""The figures of ``ensync bench --soak`` and how they are printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from ensync.bench.display import print_rows
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store.base import StoredMessage

__all__ = ["SoakResult", "SoakSample", "describe_stuck", "print_table"]


@dataclass(frozen=True, slots=True)
class SoakSample:
    """The engine process once a minute."""

    minute: float
    rss_mb: float
    fds: int
    published: int
    settled: int


@dataclass(frozen=True, slots=True)
class SoakResult:
    """The figures of one ``--soak`` run."""

    minutes: float
    rate_target: float
    churn_seconds: float
    rss_idle_start_mb: float
    fds_idle_start: int
    rss_start_mb: float
    fds_start: int
    rss_end_load_mb: float
    fds_end_load: int
    rss_max_mb: float
    fds_max: int
    rss_idle_end_mb: float
    fds_idle_end: int
    peak_rss_mb: float
    fd_kinds: dict[str, dict[str, int]]
    samples: list[SoakSample]
    published: int
    publish_failed: int
    publish_rate: float
    verbs: dict[str, int]
    engine_counters: dict[str, int]
    churn: dict[str, int]
    acked: int
    discarded: int
    settled_per_store_only: int
    stuck: int
    stuck_examples: list[str]
    unknown_keys: int
    store_pending: int
    dead_letters: dict[str, int]
    engine_end: dict[str, int]
    all_accounted: bool
    errors: dict[str, dict[str, int | str]]
    engine_problem_count: int
    engine_problems: list[str] = field(default_factory=list)


def describe_stuck(key: str, idem: str, stored: StoredMessage | None) -> str:
    if stored is None:
        return f"{key} {idem}: missing from the store"
    now = wall_clock_ms()
    return (
        f"{key} {idem}: {stored.state.name}, {stored.attempts} attempts, visible"
        f" {(stored.visible_at_ms - now) / 1000:+.1f} s from now, created"
        f" {(stored.created_at_ms - now) / 1000:+.1f} s"
    )


def print_table(result: SoakResult, out: TextIO) -> None:
    verbs = result.verbs
    rows: list[tuple[str, str]] = [
        ("duration", f"{result.minutes:g} min at {result.rate_target:g} msg/s target"),
        ("churn", f"every {result.churn_seconds:g} s: " + _pairs(result.churn)),
        (
            "engine RSS",
            f"idle {result.rss_idle_start_mb:,.1f} MB, after warm-up {result.rss_start_mb:,.1f},"
            f" end of load {result.rss_end_load_mb:,.1f}, max {result.rss_max_mb:,.1f},"
            f" idle at end {result.rss_idle_end_mb:,.1f} (peak {result.peak_rss_mb:,.1f})",
        ),
        (
            "engine open fds",
            f"idle {result.fds_idle_start}, after warm-up {result.fds_start},"
            f" end of load {result.fds_end_load}, max {result.fds_max},"
            f" idle at end {result.fds_idle_end}",
        ),
    ]
    rows += [(f"  fds {moment}", _pairs(kinds)) for moment, kinds in result.fd_kinds.items()]
    rows += [
        (
            f"  minute {s.minute:g}",
            f"RSS {s.rss_mb:,.1f} MB, fds {s.fds}, published {s.published:,}",
        )
        for s in result.samples
    ]
    rows += [
        (
            "published",
            f"{result.published:,} confirmed ({result.publish_rate:,.0f}/s),"
            f" {result.publish_failed} failed calls",
        ),
        ("client verbs", _pairs(verbs)),
        ("engine counters", _pairs(result.engine_counters)),
        (
            "settled",
            f"{result.acked:,} acked, {result.discarded:,} discarded,"
            f" {result.settled_per_store_only} settled per the store only",
        ),
        ("dead letters", _pairs(result.dead_letters) or "none"),
        (
            "accounted for",
            f"{'yes' if result.all_accounted else 'NO'}: {result.stuck} stuck,"
            f" {result.unknown_keys} unknown, {result.store_pending} pending in the store",
        ),
        ("engine at end", _pairs(result.engine_end)),
        ("errors", f"{sum(int(e['count']) for e in result.errors.values())}"),
    ]
    rows += [(f"  {kind}", f"{e['count']} ({e['example']})") for kind, e in result.errors.items()]
    rows.append(("engine warnings", str(result.engine_problem_count)))
    print_rows(rows, out)
    for line in [*result.stuck_examples, *result.engine_problems]:
        out.write(f"  {line}\n")


def _pairs(values: dict[str, int]) -> str:
    return ", ".join(f"{key} {value:,}" for key, value in values.items())
