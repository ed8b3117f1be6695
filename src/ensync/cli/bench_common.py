"""What the ``ensync bench`` programs share.

* the engine as its own process (``ensync serve`` on free ports, its log in
  a file so a chatty engine can never block on a full pipe);
* readers of that process's memory, open files and CPU time (Linux /proc);
* app registration straight into the sqlite store before the engine starts;
* the publish loop (bounded concurrency, optional pacing, latencies);
* a progress display on stderr, an error tally and the result table.

Memory figures are in MB of 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, TextIO

from ensync.client.engine import BaseEngine, EnSyncEngine
from ensync.errors import EnSyncError
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store.sqlite import SqliteStore
from ensync.websocket import EnSyncEngine as WsEngine

__all__ = [
    "BenchError",
    "EngineProcess",
    "ErrorTally",
    "Progress",
    "PublishFigures",
    "ResourceSample",
    "ResourceSampler",
    "Transport",
    "bar",
    "client_engine",
    "close_quietly",
    "cpu_seconds",
    "fd_kinds",
    "free_ports",
    "http_get",
    "mb",
    "open_fds",
    "percentile_ms",
    "print_rows",
    "process_memory",
    "publish_load",
    "register_apps",
    "running_engine",
]

Transport = Literal["grpc", "ws"]

_ENGINE_STOP_TIMEOUT_S = 30.0
# A log record of `ensync serve`: "<date> <time>,<ms> LEVEL logger: text".
_LOG_RECORD = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")


class BenchError(Exception):
    """The benchmark could not run (engine did not start, messages lost)."""


# ---------------------------------------------------------------------- /proc


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """Resident memory of a process now and at its peak (VmRSS, VmHWM)."""

    rss_bytes: int
    peak_rss_bytes: int


def process_memory(pid: int) -> ProcessMemory:
    """VmRSS and VmHWM of ``pid`` from /proc (Linux); zeros if it is gone."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ProcessMemory(0, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024  # the kernel writes kB
    return ProcessMemory(values["VmRSS"], values["VmHWM"])


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open (entries of /proc/PID/fd)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_kinds(pid: int) -> dict[str, int]:
    """Open file descriptors of ``pid`` by kind: ``socket``, ``pipe``, ``anon_inode``
    or the file's name (``ensync.db-wal``)."""
    kinds: Counter[str] = Counter()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if ":" in target else Path(target).name
        kinds[kind] += 1
    return dict(sorted(kinds.items()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def mb(n_bytes: float) -> float:
    """Bytes as MB (10^6 bytes), one decimal."""
    return round(n_bytes / 1e6, 1)


# ---------------------------------------------------------------------- the engine


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass(slots=True)
class EngineProcess:
    """An engine serving in its own process (see :func:`running_engine`)."""

    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def port(self, transport: Transport) -> int:
        """The port that serves ``transport``."""
        return self.grpc_port if transport == "grpc" else self.http_port

    def memory(self) -> ProcessMemory:
        return process_memory(self.pid)

    def open_fds(self) -> int:
        return open_fds(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_problems(self) -> list[str]:
        """Records the engine logged at WARNING or above (first line of each)."""
        return [line for line in _read_lines(self.log_path) if _LOG_RECORD.match(line)]

    def log_tail(self, lines: int = 10) -> str:
        return "\n".join(_read_lines(self.log_path)[-lines:])


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


@contextlib.asynccontextmanager
async def running_engine(
    data_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 120.0,
    log_name: str = "engine.log",
) -> AsyncIterator[EngineProcess]:
    """Serve ``data_dir`` (sqlite) in a child process until the block ends.

    Waits until both listeners accept connections. The engine's stderr goes
    to ``data_dir/log_name``; it logs at WARNING and above. On exit the
    engine gets SIGTERM (SIGKILL if it has not stopped within 30 s).

    Raises:
        BenchError: the engine exited or did not listen in time.
    """
    grpc_port, http_port = free_ports(2)
    log_path = data_dir / log_name
    command = [
        "-m",
        "ensync.cli.main",
        "serve",
        "--data",
        str(data_dir),
        "--grpc",
        f"127.0.0.1:{grpc_port}",
        "--http",
        f"127.0.0.1:{http_port}",
        "--log-level",
        "WARNING",
        *extra_args,
    ]
    with _append_to(log_path) as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    engine = EngineProcess(process, grpc_port, http_port, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        for port in (grpc_port, http_port):
            await _wait_listening(engine, port, deadline, start_timeout_s)
        yield engine
    finally:
        await _stop(process)


def _append_to(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


async def _wait_listening(
    engine: EngineProcess, port: int, deadline: float, timeout_s: float
) -> None:
    while time.monotonic() < deadline:
        if engine.process.returncode is not None:
            raise BenchError(f"the engine exited at start: {engine.log_tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise BenchError(f"the engine did not listen on port {port} within {timeout_s:g} s")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), _ENGINE_STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


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


async def register_apps(data_dir: Path, names: Sequence[str]) -> list[NewApp]:
    """Register apps in ``data_dir``'s sqlite store (before the engine serves it)."""
    store = SqliteStore(data_dir / "ensync.db")
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
) -> BaseEngine:
    """An SDK engine for our client side; it never gives up reconnecting."""
    if transport == "ws":
        return WsEngine(
            f"ws://127.0.0.1:{port}",
            max_reconnect_attempts=0,
            reconnect_interval=reconnect_interval_ms,
            ping_interval=heartbeat_interval_ms,
        )
    return EnSyncEngine(
        f"grpc://127.0.0.1:{port}",
        max_reconnect_attempts=0,
        reconnect_interval=reconnect_interval_ms,
        heartbeat_interval=heartbeat_interval_ms,
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


# ---------------------------------------------------------------------- display


def bar(fraction: float, width: int = 30) -> str:
    """``[#####-----]`` for a fraction in 0..1."""
    done = int(width * min(1.0, max(0.0, fraction)))
    return "[" + "#" * done + "-" * (width - done) + "]"


class Progress:
    """A status line on stderr: rewritten in place on a terminal, otherwise
    printed as a new line every few seconds."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._last = 0.0
        self._open_line = False

    def show(self, line: str, *, force: bool = False) -> None:
        """Show ``line`` as the current status (rate limited unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self._tty else 2.0):
            return
        self._last = now
        if self._tty:
            self._stream.write("\r\x1b[K" + line)
            self._open_line = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, line: str) -> None:
        """Print ``line`` for good (a phase result, a periodic sample)."""
        self.finish()
        self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the status line (a newline on a terminal)."""
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False


def print_rows(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    """A two-column table: names left-aligned, values after them."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n" if name else "\n")
