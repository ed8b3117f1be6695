"""``ensync bench --backlog``, ``--soak`` and ``--compare``, run tiny as real processes.

Functional checks only: the programs run, print one JSON object with every
figure, and the figures are consistent. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from ensync.bench import (
    backlog,
    backlog_report,
    common,
    compare,
    compare_figures,
    display,
    fill,
    peers,
    soak,
    soak_ledger,
    soak_report,
    stores,
    throughput,
)
from ensync.server.config import EngineConfig
from tests.support.timing import seconds

pytestmark = pytest.mark.slow


def bench(*args: str, timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run ``ensync bench ARGS --json``; returns the figures and the progress (stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "ensync.cli.main", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=seconds(timeout_s),
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures, result.stderr


@pytest.mark.timeout(seconds(240))
def test_backlog_reports_memory_throughput_and_a_slow_consumer() -> None:
    figures, progress = bench(
        "--backlog",
        "2000",
        "--messages",
        "300",
        "--rounds",
        "2",
        "--slow-seconds",
        "3",
        timeout_s=200,
    )
    assert figures["backlog"] == 2000
    assert figures["prefill"]["method"] == "store"
    assert figures["prefill"]["messages"] == 2000
    # Asked before the warm-up publishes.
    assert figures["pending_at_start"] == 2000
    assert 0 < figures["rss_after_start_mb"] <= figures["peak_rss_mb"]
    assert figures["peak_rss_after_publish_mb"] <= figures["peak_rss_mb"]
    assert figures["peak_rss_target_mb"] == backlog.PEAK_RSS_TARGET_MB
    assert figures["peak_rss_ok"] == (figures["peak_rss_mb"] < 300)
    assert len(figures["rounds"]) == 2
    for key in ("empty_publish", "backlog_publish"):
        publish = figures[key]
        assert publish["published"] == 300
        assert publish["failed"] == 0
        assert publish["rate"] > 0
        assert 0 < publish["latency_p50_ms"] <= publish["latency_p99_ms"]
    ratio = figures["backlog_publish"]["rate"] / figures["empty_publish"]["rate"]
    assert figures["throughput_ratio"] == pytest.approx(ratio, abs=0.001)
    slow = figures["slow_consumer"]
    assert slow["publish"]["published"] > 0
    assert slow["publish"]["failed"] == 0
    assert slow["consumed"] > 0
    assert 0 < slow["rss_start_mb"] <= slow["rss_max_mb"]
    assert slow["rss_end_mb"] <= slow["rss_max_mb"]
    assert len(slow["samples"]) >= 2
    # One client (the SDK, over its session stream), one subscription per
    # partition, each with the session window.
    window = EngineConfig().session_window
    assert 0 < slow["in_flight_max"] <= 2 * window
    # The backlog, the warm-up and the rounds on the backlog engine, the slow phase.
    published = 2000 + 200 + 2 * 300 + slow["publish"]["published"]
    assert figures["pending_at_end"] <= published - slow["consumed"] + 2 * window
    assert figures["pending_at_end"] >= published - slow["consumed"] - 2 * window
    assert figures["engine_problems"] == []
    assert "prefill" in progress
    assert "round 2/2" in progress


@pytest.mark.timeout(seconds(240))
def test_backlog_can_be_filled_through_the_engine() -> None:
    figures, progress = bench(
        "--backlog",
        "300",
        "--backlog-fill",
        "engine",
        "--transport",
        "ws",
        "--messages",
        "100",
        "--rounds",
        "1",
        "--slow-seconds",
        "0",
        timeout_s=200,
    )
    assert figures["prefill"]["method"] == "engine"
    assert figures["pending_at_start"] == 300
    assert figures["slow_consumer"] is None
    assert figures["transport"] == "ws"
    assert figures["pending_at_end"] == 300 + 200 + 100
    assert "prefill through the engine" in progress


@pytest.mark.timeout(seconds(240))
def test_soak_accounts_for_every_message() -> None:
    figures, progress = bench("--soak", "0.1", "--soak-rate", "100", timeout_s=200)
    assert figures["minutes"] == 0.1
    assert figures["all_accounted"] is True
    assert figures["stuck"] == 0
    assert figures["unknown_keys"] == 0
    assert figures["store_pending"] == 0
    assert figures["published"] > 100
    assert figures["publish_failed"] == 0
    verbs = figures["verbs"]
    for verb in ("ack", "delivered"):
        assert verbs[verb] > 0, verb
    # Everything confirmed was settled one way or the other.
    settled = figures["acked"] + figures["discarded"] + figures["settled_per_store_only"]
    assert settled == figures["published"]
    counters = figures["engine_counters"]
    assert counters["published"] == figures["published"]
    assert counters["acked"] + counters["discarded"] == figures["published"]
    assert figures["dead_letters"].get("discarded", 0) == counters["discarded"]
    churn = figures["churn"]
    assert churn["consumer_restarts"] >= 1
    assert churn["link_cuts"] >= 1
    assert churn["reconnects"] >= 1
    for key in ("rss_idle_start_mb", "rss_end_load_mb", "rss_idle_end_mb", "peak_rss_mb"):
        assert figures[key] > 0, key
    for key in ("fds_idle_start", "fds_end_load", "fds_idle_end", "fds_max"):
        assert figures[key] > 0, key
    assert figures["engine_end"]["sessions"] == 0
    assert figures["engine_end"]["in_flight"] == 0
    assert set(figures["fd_kinds"]) == {"idle_start", "idle_end"}
    assert figures["samples"], "at least the closing sample"
    assert "published" in progress


@pytest.mark.timeout(seconds(240))
def test_compare_runs_every_setup_and_relates_their_figures() -> None:
    figures, progress = bench(
        "--compare", "jetstream", "--messages", "400", "--rounds", "1",
        "--latency-messages", "150",
        timeout_s=200,
    )  # fmt: skip
    assert figures["nats_server"].startswith("nats-server")
    assert figures["in_flight"] == 256
    throughput = {row["key"]: row for row in figures["throughput"]}
    assert set(throughput) == {setup.key for setup in compare_figures.THROUGHPUT_SETUPS}
    latency = {row["key"]: row for row in figures["latency"]}
    assert set(latency) == {setup.key for setup in compare_figures.LATENCY_SETUPS}
    for row in [*throughput.values(), *latency.values()]:
        assert row["complete"] is True, row["key"]
        assert row["runs"] == 1
        assert row["rate"] > 0
        assert row["server_cpu_us_per_message"] >= 0
        assert row["subscriber_cpu_us_per_message"] > 0
    for row in latency.values():
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"], row["key"]
        assert row["call_p50_ms"] > 0, row["key"]
    # The engine's own CPU is measured (the NATS server's may round to 0).
    assert throughput["ensync-reuse"]["server_cpu_us_per_message"] > 0
    for key, ratio in figures["ratios"].items():
        mine, theirs = key.split("/")
        expected = throughput[mine]["rate"] / throughput[theirs]["rate"]
        assert ratio == pytest.approx(expected, rel=0.01), key
    assert set(figures["targets"]) >= {"reuse_at_least_jetstream", "latency_p50_at_most_0.8ms"}
    assert "JetStream sync always" in progress


def test_compare_peer_reports_round_trip() -> None:
    spec = peers.PeerSpec(
        system="nats", role="publish", mode="latency", messages=1, payload_bytes=1024,
        url="nats://127.0.0.1:1", recipient_app_id="a", recipient_secret="s",
    )  # fmt: skip
    assert peers.PeerSpec.from_json(spec.to_json()) == spec
    report = {"received": 3, "duplicates": 0, "last_ns": 5, "latency_p50_ms": 1.0,
              "latency_p90_ms": 1.0, "latency_p99_ms": 2.0, "latency_max_ms": 2.0,
              "cpu_s": 0.1, "extra": "ignored"}  # fmt: skip
    assert peers.SubscriberFigures.from_report(report).received == 3


@pytest.mark.timeout(seconds(180))
def test_bench_runs_engine_nodes_on_nats_jetstream() -> None:
    figures, _ = bench("--store", "nats", "--nodes", "2", "--messages", "1000", timeout_s=150)
    assert figures["received"] == figures["messages"] == 1000
    assert (figures["store"], figures["nodes"]) == ("nats", 2)
    assert figures["end_to_end_rate"] > 0


@pytest.mark.timeout(seconds(300))
def test_compare_stores_runs_every_store_and_relates_them_to_sqlite() -> None:
    figures, _ = bench("--compare", "stores", "--messages", "300", "--rounds", "1", timeout_s=280)
    keys = [setup["key"] for setup in figures["setups"]]
    assert keys == ["sqlite", "nats", "nats-cluster", "nats-cluster-2"]
    sqlite, *others = figures["setups"]
    assert sqlite["ratio_to_sqlite"] == 1.0
    for setup in others:
        assert setup["end_to_end_rate"] > 0
        assert setup["store_cpu_percent"] > 0  # the NATS servers' CPU is counted
        assert setup["ratio_to_sqlite"] == round(
            setup["end_to_end_rate"] / sqlite["end_to_end_rate"], 2
        )


def test_bench_refuses_a_store_it_cannot_use() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ensync.cli.main", "bench", "--store", "memory:"],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
    assert result.returncode == 1
    assert "--store 'memory:': use sqlite, nats, nats-cluster, or nats://" in result.stderr


def test_bench_programs_refuse_bad_arguments() -> None:
    for args in (
        ["--backlog", "0"],
        ["--soak", "0"],
        ["--backlog", "10", "--soak", "1"],
        ["--compare", "jetstream", "--latency-messages", "0"],
        ["--compare", "jetstream", "--messages", "0"],
        ["--compare", "kafka"],
        ["--store", "nats", "--soak", "1"],
        ["--nodes", "2"],
        ["--store", "nats", "--nodes", "0"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "ensync.cli.main", "bench", *args],
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
        assert result.returncode == 2, args


def test_bench_modules_declare_their_public_names() -> None:
    for module in (
        backlog,
        backlog_report,
        common,
        compare,
        compare_figures,
        display,
        fill,
        peers,
        soak,
        soak_ledger,
        soak_report,
        stores,
        throughput,
    ):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
