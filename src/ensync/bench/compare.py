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
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ensync._loop import run as run_loop
from ensync.bench.common import BenchError, EngineProcess, register_apps, running_engine
from ensync.bench.compare_figures import (
    LATENCY_SETUPS,
    THROUGHPUT_SETUPS,
    CompareResult,
    RunFigures,
    Setup,
    describe,
    medians,
    print_table,
    rate_ratios,
    targets_met,
)
from ensync.bench.display import Progress
from ensync.bench.peers import (
    NATS_STREAM,
    NATS_SUBJECT,
    Mode,
    PeerSpec,
    PublisherFigures,
    SubscriberFigures,
)
from ensync.crypto import generate_keypair
from ensync.server.core.apps import NewApp
from ensync.testing.nats_server import NatsError, NatsServer, Sync, nats_server_binary
from ensync.testing.process import cpu_seconds, dies_with_parent

__all__ = ["DEFAULT_LATENCY_MESSAGES", "DEFAULT_MESSAGES", "IN_FLIGHT", "LATENCY_RATE", "run"]

DEFAULT_MESSAGES = 20_000
IN_FLIGHT = 256
LATENCY_RATE = 1_000.0
DEFAULT_LATENCY_MESSAGES = 5_000


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print it; returns the exit code."""
    try:
        binary = nats_server_binary()
        _check_nats_client()
        result = run_loop(_compare(args, binary))
    except (BenchError, NatsError) as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print_table(result, sys.stdout)
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
                *dies_with_parent([sys.executable, "-m", "ensync.bench.peers", spec.to_json()]),
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
                    progress.note(describe(round_index, setup, mode, figures))
    except BaseException:
        progress.note(f"ensync bench: logs kept in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)
    throughput = [medians(setup, "throughput", runs) for setup in THROUGHPUT_SETUPS]
    latency = [medians(setup, "latency", runs) for setup in LATENCY_SETUPS]
    ratios = rate_ratios(throughput)
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
        targets=targets_met(throughput, latency, ratios),
    )


def _nats_version(binary: str) -> str:
    import subprocess

    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"
