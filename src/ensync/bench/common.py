"""What the ``ensync bench`` programs share.

* the engine as its own process (:mod:`ensync.testing.process`, the same
  helper the fault tests use), failing with :class:`BenchError`;
* app registration straight into the sqlite store before the engine starts;
* the publish loop (bounded concurrency, optional pacing, latencies) and
  an error tally;
* the engine's own view of itself (``/healthz``, ``/metrics``);
* the store the engine uses (sqlite, or NATS servers started for the run).

What they show is in :mod:`ensync.bench.display`.

Memory figures are in MB of 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ensync.client.engine import BaseEngine, EnSyncEngine
from ensync.errors import EnSyncError
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store import StoreError, open_store
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.server.store.sqlite import SqliteStore
from ensync.testing.nats_server import NatsError, nats_cluster
from ensync.testing.process import (
    EngineProcess,
    EngineProcessError,
    Transport,
    cpu_seconds,
    fd_kinds,
    free_ports,
    open_fds,
    process_memory,
)
from ensync.testing.process import running_engine as engine_process
from ensync.websocket import EnSyncEngine as WsEngine

__all__ = [
    "BenchError",
    "BenchStore",
    "EngineProcess",
    "ErrorTally",
    "PublishFigures",
    "ResourceSample",
    "ResourceSampler",
    "Transport",
    "bench_store",
    "client_engine",
    "close_quietly",
    "cpu_seconds",
    "fd_kinds",
    "free_ports",
    "http_get",
    "mb",
    "open_fds",
    "pending_messages",
    "percentile_ms",
    "process_memory",
    "publish_load",
    "register_apps",
    "running_engine",
]


class BenchError(Exception):
    """The benchmark could not run (engine did not start, messages lost)."""


def mb(n_bytes: float) -> float:
    """Bytes as MB (10^6 bytes), one decimal."""
    return round(n_bytes / 1e6, 1)


@contextlib.asynccontextmanager
async def running_engine(
    data_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 120.0,
    log_name: str = "engine.log",
) -> AsyncIterator[EngineProcess]:
    """:func:`ensync.testing.process.running_engine`, failing with :class:`BenchError`."""
    try:
        async with engine_process(
            data_dir, extra_args=extra_args, start_timeout_s=start_timeout_s, log_name=log_name
        ) as engine:
            yield engine
    except EngineProcessError as exc:
        raise BenchError(str(exc)) from exc


async def http_get(port: int, path: str) -> str:
    """The body of ``GET path`` on the engine's HTTP listener (``/healthz``, ``/metrics``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    status = head.split(maxsplit=2)[1] if head.count(" ") else "?"
    if status != "200":
        raise BenchError(f"GET {path} answered {head.splitlines()[0] if head else 'nothing'}")
    return body


async def pending_messages(port: int) -> int:
    """Messages pending in the engine: its ``ensync_backlog`` gauges on ``/metrics``."""
    text = await http_get(port, "/metrics")
    return int(
        sum(
            float(line.rsplit(maxsplit=1)[1])
            for line in text.splitlines()
            if line.startswith("ensync_backlog{")
        )
    )


async def register_apps(
    data_dir: Path, names: Sequence[str], store_url: str | None = None
) -> list[NewApp]:
    """Register apps in ``data_dir``'s sqlite store (before the engine serves
    it), or in the store ``store_url`` names."""
    store = (
        SqliteStore(data_dir / "ensync.db")
        if store_url is None
        else open_store(store_url, data_dir, serve=False)
    )
    await store.open()
    try:
        registry = AppRegistry(store, wall_clock_ms, cache_ms=0)
        return [await registry.create(name) for name in names]
    finally:
        await store.close()


def client_engine(
    transport: Transport,
    port: int,
    *,
    reconnect_interval_ms: int = 5_000,
    heartbeat_interval_ms: int = 30_000,
    sender_key_reuse_ms: int = 0,
) -> BaseEngine:
    """An SDK engine for our client side; it never gives up reconnecting."""
    if transport == "ws":
        return WsEngine(
            f"ws://127.0.0.1:{port}",
            max_reconnect_attempts=0,
            reconnect_interval=reconnect_interval_ms,
            ping_interval=heartbeat_interval_ms,
            sender_key_reuse_ms=sender_key_reuse_ms,
        )
    return EnSyncEngine(
        f"grpc://127.0.0.1:{port}",
        max_reconnect_attempts=0,
        reconnect_interval=reconnect_interval_ms,
        heartbeat_interval=heartbeat_interval_ms,
        sender_key_reuse_ms=sender_key_reuse_ms,
    )


async def close_quietly(sdk: BaseEngine, errors: ErrorTally | None = None) -> None:
    """Close an SDK engine; an error raised while closing is counted, not raised.

    That includes a ``CancelledError`` that does not cancel *this* task (one
    the SDK let out of a call it stopped): the run goes on and reports it.
    """
    task = asyncio.current_task()
    try:
        await sdk.close()
    except EnSyncError as exc:
        if errors is not None:
            errors.add(exc, "close")
    except asyncio.CancelledError as exc:
        if task is None or task.cancelling():
            raise
        if errors is not None:
            errors.add(exc, "close")


# ---------------------------------------------------------------------- sampling


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """One reading of the engine process.

    Attributes:
        at_s: seconds since the sampler started.
        rss_bytes: resident memory.
        fds: open file descriptors.
        count: what the sampler's probe said then (e.g. messages published).
    """

    at_s: float
    rss_bytes: int
    fds: int
    count: int


class ResourceSampler:
    """Reads a process's RSS and open files every ``interval_s`` in a task it owns.

    Use as ``async with ResourceSampler(pid, 0.5, probe) as sampler:``; the
    samples are in :attr:`samples` (one is taken on entry and one on exit).
    """

    def __init__(self, pid: int, interval_s: float, probe: Callable[[], int] | None = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[ResourceSample] = []
        self._probe = probe
        self._start = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> ResourceSample:
        """Take one sample now (also recorded)."""
        reading = ResourceSample(
            at_s=round(time.perf_counter() - self._start, 3),
            rss_bytes=process_memory(self.pid).rss_bytes,
            fds=open_fds(self.pid),
            count=self._probe() if self._probe is not None else 0,
        )
        self.samples.append(reading)
        return reading

    @property
    def max_rss_bytes(self) -> int:
        return max((s.rss_bytes for s in self.samples), default=0)

    @property
    def max_fds(self) -> int:
        return max((s.fds for s in self.samples), default=0)

    def rss_slope_bytes_per_count(self) -> float:
        """Least-squares slope of RSS against the probe's count (0 if flat or unknown)."""
        points = [(s.count, s.rss_bytes) for s in self.samples]
        n = len(points)
        if n < 2:
            return 0.0
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var = sum((x - mean_x) ** 2 for x, _ in points)
        if var == 0:
            return 0.0
        return sum((x - mean_x) * (y - mean_y) for x, y in points) / var

    async def __aenter__(self) -> ResourceSampler:
        self._start = time.perf_counter()
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bench-sampler")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()


# ---------------------------------------------------------------------- publishing


@dataclass(frozen=True, slots=True)
class PublishFigures:
    """What a :func:`publish_load` run achieved."""

    published: int
    failed: int
    duration_s: float
    rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float


class ErrorTally:
    """Errors seen, counted by kind (``where: ExceptionType``), one example each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, exc: BaseException, where: str) -> None:
        kind = f"{where}: {type(exc).__name__}"
        self.counts[kind] += 1
        self.examples.setdefault(kind, str(exc)[:200])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, int | str]]:
        return {
            kind: {"count": count, "example": self.examples[kind]}
            for kind, count in sorted(self.counts.items())
        }


async def publish_load(
    publish: Callable[[int], Awaitable[object]],
    *,
    count: int | None = None,
    until: float | None = None,
    stop: asyncio.Event | None = None,
    concurrency: int = 64,
    rate: float = 0.0,
    errors: ErrorTally | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PublishFigures:
    """Call ``publish(seq)`` for seq = 0, 1, ... with at most ``concurrency`` in flight.

    Stops after ``count`` calls, at ``until`` (a ``time.perf_counter()``
    value) or when ``stop`` is set, whichever comes first, then waits for the
    calls in flight. ``rate`` > 0 paces the calls (per second). An
    :class:`EnSyncError` counts as a failed publish (and goes to ``errors``);
    any other exception propagates. ``on_progress(published, failed)`` is
    called a few times a second and once at the end.
    """
    if count is None and until is None and stop is None:
        raise ValueError("publish_load needs count, until or stop")
    slots = asyncio.Semaphore(concurrency)
    latencies = array("q")
    published = failed = 0
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate if rate > 0 else 0.0

    async def one(seq: int) -> None:
        nonlocal published, failed
        began = time.perf_counter_ns()
        try:
            await publish(seq)
        except EnSyncError as exc:
            failed += 1
            if errors is not None:
                errors.add(exc, "publish")
        else:
            published += 1
            latencies.append(time.perf_counter_ns() - began)
        finally:
            slots.release()

    start = time.perf_counter()
    last_report = start
    seq = 0
    while count is None or seq < count:
        if interval:
            delay = start + seq * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if (until is not None and time.perf_counter() >= until) or (
            stop is not None and stop.is_set()
        ):
            break
        await slots.acquire()
        task = asyncio.get_running_loop().create_task(one(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        seq += 1
        if on_progress is not None and time.perf_counter() - last_report >= 0.2:
            last_report = time.perf_counter()
            on_progress(published, failed)
    while tasks:
        await asyncio.gather(*list(tasks))
    duration = time.perf_counter() - start
    if on_progress is not None:
        on_progress(published, failed)
    ordered = sorted(latencies)
    return PublishFigures(
        published=published,
        failed=failed,
        duration_s=round(duration, 3),
        rate=round(published / duration, 1) if duration > 0 else 0.0,
        latency_p50_ms=percentile_ms(ordered, 0.50),
        latency_p99_ms=percentile_ms(ordered, 0.99),
        latency_max_ms=percentile_ms(ordered, 1.0),
    )


def percentile_ms(ordered: Sequence[int], fraction: float) -> float:
    """The ``fraction`` percentile of sorted nanosecond durations, in ms."""
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return round(ordered[index] / 1e6, 2)


@dataclass(frozen=True, slots=True)
class BenchStore:
    """Where a benchmark's engine keeps its data: ``url`` for ``--store``
    (``None``: sqlite in its data directory), and the pids of the store's
    own processes (NATS servers the benchmark started), whose CPU counts."""

    url: str | None
    pids: tuple[int, ...] = ()


@contextlib.asynccontextmanager
async def bench_store(spec: str | None, root: Path) -> AsyncIterator[BenchStore]:
    """The store a benchmark's engine uses: sqlite in its data directory
    (``None``), NATS JetStream servers started under ``root`` (``"nats"``:
    one; ``"nats-cluster"``: three, replicas 3, fsync always), or a namespace
    of its own on the user's NATS (``nats://...``), deleted afterwards."""
    if spec is None or spec in ("sqlite", "sqlite:"):
        yield BenchStore(None)
        return
    if spec in ("nats", "nats-cluster"):
        size = 1 if spec == "nats" else 3
        try:
            async with nats_cluster(
                root / "nats", size=size, sync="default" if size == 1 else "always"
            ) as servers:
                urls = ",".join(server.url for server in servers)
                yield BenchStore(
                    f"{urls}?namespace=bench&replicas={size}",
                    tuple(server.pid for server in servers),
                )
        except NatsError as exc:
            raise BenchError(str(exc)) from exc
        return
    if not spec.startswith(("nats://", "tls://")) or "namespace=" in spec:
        raise BenchError(
            f"--store {spec!r}: use sqlite, nats, nats-cluster, or nats://HOST:PORT[,...]"
            " (without a namespace: the bench makes its own)"
        )
    url = f"{spec}{'&' if '?' in spec else '?'}namespace=bench{secrets.token_hex(4)}"
    try:
        yield BenchStore(url)
    finally:
        store = open_store(url, root, serve=False)
        try:
            await store.open()
            if isinstance(store, OwnedStore):
                await store.drop()
            await store.close()
        except StoreError as exc:
            print(f"ensync bench: could not delete the namespace {url}: {exc}", file=sys.stderr)
