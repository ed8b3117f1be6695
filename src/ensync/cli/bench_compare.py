"""``ensync bench --compare jetstream``: ensync beside NATS JetStream.

Same machine, same run, same payloads (~1 KB JSON objects). Every figure
is the median of ``--rounds`` runs, the setups taking turns within each
round so that drift in the machine's speed touches all of them alike.

Throughput: one publisher process with 256 publishes in flight (ensync:
256 concurrent ``publish`` calls through the SDK; NATS: ``publish_async``
with at most 256 unconfirmed), one subscriber process (ensync: an auto-ack
handler; NATS: a durable pull consumer fetching batches of 100 and acking
each message), ``--messages`` messages (20,000). The rate is taken at the
subscriber: distinct messages received over the time from the publisher's
start to the last arrival.

Latency: one publisher on a schedule of 1,000 messages/s, each publish
awaited before the next (a late one delays the schedule); latency is the
publish call's start to the subscriber's handler entry (or, for NATS, the
fetched message in hand).

ensync persists every message (fsync'd group commits) and encrypts it for
its recipient, with a fresh key pair per message (``fresh``, the official
clients' way) or one reused per recipient (``reuse``,
``sender_key_reuse_ms`` above 0). NATS runs with file storage in its
default configuration, which does not fsync each message, and with
``sync_interval: always``, which does; with no encryption, or with ensync's
envelope in either key mode sealed and opened by the peers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

from ensync.cli.bench_common import (
    BenchError,
    EngineProcess,
    Progress,
    print_rows,
    register_apps,
    running_engine,
)
from ensync.cli.bench_peers import (
    NATS_STREAM,
    NATS_SUBJECT,
    Encryption,
    Mode,
    PeerSpec,
    PublisherFigures,
    SubscriberFigures,
)
from ensync.cli.nats_server import NatsError, NatsServer, Sync, nats_server_binary
from ensync.crypto import generate_keypair
from ensync.server.core.apps import NewApp
from ensync.testing.process import cpu_seconds, dies_with_parent

__all__ = [
    "DEFAULT_MESSAGES",
    "LATENCY_SETUPS",
    "THROUGHPUT_SETUPS",
    "CompareResult",
    "Setup",
    "SetupFigures",
    "add_arguments",
    "run",
]

DEFAULT_MESSAGES = 20_000
IN_FLIGHT = 256
LATENCY_RATE = 1_000.0
DEFAULT_LATENCY_MESSAGES = 5_000

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--compare`` on the ``bench`` parser."""
    group = parser.add_argument_group("--compare options")
    group.add_argument(
        "--latency-messages",
        type=int,
        default=DEFAULT_LATENCY_MESSAGES,
        help=f"messages per latency run, at 1,000/s ({DEFAULT_LATENCY_MESSAGES})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print it; returns the exit code."""
    if args.latency_messages <= 0 or args.rounds <= 0:
        print("ensync bench: --latency-messages and --rounds must be positive", file=sys.stderr)
        return 2
    try:
        binary = nats_server_binary()
        _check_nats_client()
        result = asyncio.run(_compare(args, binary))
    except (BenchError, NatsError) as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        _print_table(result, sys.stdout)
    every = [*result.throughput, *result.latency]
    return 0 if all(figures.complete for figures in every) else 1


# ---------------------------------------------------------------- NATS server


def _check_nats_client() -> None:
    try:
        import nats  # noqa: F401  (optional: the bench extra)
    except ImportError as exc:
        raise BenchError(
            "the JetStream comparison needs nats-py: pip install 'ensync[bench]'"
        ) from exc


async def _fresh_stream(url: str) -> None:
    """Drop the bench stream (and its consumer) and make it anew."""
    import nats  # optional: the bench extra
    from nats.js.api import StorageType
    from nats.js.errors import NotFoundError

    connection = await nats.connect(url)
    try:
        manager = connection.jetstream()
        with contextlib.suppress(NotFoundError):
            await manager.delete_stream(NATS_STREAM)
        await manager.add_stream(
            name=NATS_STREAM, subjects=[NATS_SUBJECT], storage=StorageType.FILE
        )
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _nats_servers(binary: str, root: Path) -> AsyncIterator[dict[Sync, NatsServer]]:
    servers: dict[Sync, NatsServer] = {}
    try:
        modes: tuple[Sync, ...] = ("default", "always")
        for sync in modes:
            server = NatsServer(binary, root, name=f"nats-{sync}", sync=sync)
            await server.start()
            servers[server.sync] = server
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


# ---------------------------------------------------------------- peers


class _Peer:
    """A peer process: started, told apart by its ``ready`` line, then read
    for its one line of figures."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, spec: PeerSpec, log: Path) -> _Peer:
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *dies_with_parent([sys.executable, "-m", "ensync.cli.bench_peers", spec.to_json()]),
                stdout=asyncio.subprocess.PIPE,
                stderr=sink,
            )
        return cls(process, log)

    async def ready(self, timeout_s: float = 60.0) -> None:
        line = await self._line(timeout_s)
        if line != "ready":
            raise BenchError(f"a bench peer did not start: {line or self._tail()}")

    async def figures(self, timeout_s: float) -> dict[str, Any]:
        line = await self._line(timeout_s)
        await self.process.wait()
        try:
            return dict(json.loads(line))
        except ValueError:
            raise BenchError(f"a bench peer failed: {self._tail()}") from None

    async def _line(self, timeout_s: float) -> str:
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            self.kill()
            raise BenchError(f"a bench peer went silent: {self._tail()}") from None
        return raw.decode(errors="replace").strip()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:]) or "no output"


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a run's peers connect, and who they are."""

    url: str
    server_pid: int
    recipient_app_id: str
    recipient_secret: str
    publisher_key: str = ""
    subscriber_key: str = ""


async def _run_peers(
    setup: Setup, mode: Mode, messages: int, args: argparse.Namespace, target: _Target, logs: Path
) -> RunFigures:
    deadline_s = 60.0 + messages / 200
    subscribe = PeerSpec(
        system=setup.system,
        role="subscribe",
        mode=mode,
        messages=messages,
        payload_bytes=args.payload_bytes,
        url=target.url,
        recipient_app_id=target.recipient_app_id,
        recipient_secret=target.recipient_secret,
        app_key=target.subscriber_key,
        encryption=setup.encryption,
        in_flight=IN_FLIGHT,
        rate=LATENCY_RATE if mode == "latency" else 0.0,
        deadline_s=deadline_s,
    )
    log = logs / f"{setup.key}-{mode}.log"
    subscriber = await _Peer.start(subscribe, log)
    publisher: _Peer | None = None
    try:
        await subscriber.ready()
        server_cpu0 = cpu_seconds(target.server_pid)
        publish = replace(subscribe, role="publish", app_key=target.publisher_key)
        publisher = await _Peer.start(publish, log)
        await publisher.ready()
        sent = PublisherFigures.from_report(await publisher.figures(deadline_s + 30))
        got = SubscriberFigures.from_report(await subscriber.figures(deadline_s + 30))
        server_cpu = cpu_seconds(target.server_pid) - server_cpu0
    finally:
        subscriber.kill()
        if publisher is not None:
            publisher.kill()
    span_s = max(got.last_ns - sent.start_ns, 1) / 1e9
    publish_s = max(sent.end_ns - sent.start_ns, 1) / 1e9
    return RunFigures(
        messages=messages,
        received=got.received,
        duplicates=got.duplicates,
        rate=round(got.received / span_s, 1) if got.received else 0.0,
        publish_rate=round(sent.published / publish_s, 1),
        latency_p50_ms=got.latency_p50_ms,
        latency_p99_ms=got.latency_p99_ms,
        call_p50_ms=sent.call_p50_ms,
        call_p99_ms=sent.call_p99_ms,
        server_cpu_us_per_message=_per_message_us(server_cpu, messages),
        publisher_cpu_us_per_message=_per_message_us(sent.cpu_s, messages),
        subscriber_cpu_us_per_message=_per_message_us(got.cpu_s, messages),
    )


def _per_message_us(cpu_s: float, messages: int) -> float:
    return round(cpu_s * 1e6 / messages, 1) if messages else 0.0


# ---------------------------------------------------------------- one run


async def _run_ensync(
    setup: Setup, mode: Mode, messages: int, args: argparse.Namespace, root: Path
) -> RunFigures:
    data_dir = Path(tempfile.mkdtemp(prefix="ensync-", dir=root))
    try:
        publisher, subscriber = await register_apps(data_dir, ["bench-publisher", "bench-sub"])
        async with running_engine(data_dir) as engine:
            target = _ensync_target(engine, args.transport, publisher.app_key, subscriber)
            return await _run_peers(setup, mode, messages, args, target, root)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _ensync_target(
    engine: EngineProcess, transport: str, publisher_key: str, subscriber: NewApp
) -> _Target:
    return _Target(
        url=engine.ws_url if transport == "ws" else engine.grpc_url,
        server_pid=engine.pid,
        recipient_app_id=subscriber.app_id,
        recipient_secret=subscriber.secret_key,
        publisher_key=publisher_key,
        subscriber_key=subscriber.app_key,
    )


async def _run_nats(
    setup: Setup,
    mode: Mode,
    messages: int,
    args: argparse.Namespace,
    server: NatsServer,
    root: Path,
) -> RunFigures:
    await _fresh_stream(server.url)
    keys = generate_keypair()
    target = _Target(server.url, server.pid, keys.app_id, keys.secret_key)
    return await _run_peers(setup, mode, messages, args, target, root)


# ---------------------------------------------------------------- the program


async def _compare(args: argparse.Namespace, binary: str) -> CompareResult:
    messages = args.messages if args.messages is not None else DEFAULT_MESSAGES
    root = Path(tempfile.mkdtemp(prefix="ensync-compare-"))
    progress = Progress()
    plan: list[tuple[Mode, Setup, int]] = [
        *(("throughput", setup, messages) for setup in THROUGHPUT_SETUPS),
        *(("latency", setup, args.latency_messages) for setup in LATENCY_SETUPS),
    ]
    runs: dict[tuple[Mode, str], list[RunFigures]] = {}
    try:
        async with _nats_servers(binary, root) as servers:
            for round_index in range(args.rounds):
                for step, (mode, setup, count) in enumerate(plan, 1):
                    progress.show(
                        f"round {round_index + 1}/{args.rounds}, {step}/{len(plan)}:"
                        f" {setup.label}, {mode} ({count:,} messages)",
                        force=True,
                    )
                    if setup.system == "ensync":
                        figures = await _run_ensync(setup, mode, count, args, root)
                    else:
                        figures = await _run_nats(
                            setup, mode, count, args, servers[setup.sync], root
                        )
                    runs.setdefault((mode, setup.key), []).append(figures)
                    progress.note(_describe(round_index, setup, mode, figures))
    except BaseException:
        progress.note(f"ensync bench: logs kept in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)
    throughput = [_medians(setup, "throughput", runs) for setup in THROUGHPUT_SETUPS]
    latency = [_medians(setup, "latency", runs) for setup in LATENCY_SETUPS]
    ratios = _ratios(throughput)
    return CompareResult(
        messages=messages,
        latency_messages=args.latency_messages,
        payload_bytes=args.payload_bytes,
        in_flight=IN_FLIGHT,
        latency_rate=LATENCY_RATE,
        transport=args.transport,
        rounds=args.rounds,
        nats_server=_nats_version(binary),
        throughput=throughput,
        latency=latency,
        ratios=ratios,
        targets=_targets(throughput, latency, ratios),
    )


def _describe(round_index: int, setup: Setup, mode: Mode, figures: RunFigures) -> str:
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


def _medians(
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


def _ratios(throughput: Sequence[SetupFigures]) -> dict[str, float]:
    """Each ensync setup's median rate over each JetStream setup's."""
    ours = [f for f in throughput if f.key.startswith("ensync")]
    theirs = [f for f in throughput if f.key.startswith("nats")]
    return {
        f"{mine.key}/{other.key}": round(mine.rate / other.rate, 3) if other.rate else 0.0
        for mine in ours
        for other in theirs
    }


def _targets(
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


def _nats_version(binary: str) -> str:
    import subprocess

    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


# ---------------------------------------------------------------- output


def _print_table(result: CompareResult, out: TextIO) -> None:
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
