"""``ensync bench``: end-to-end throughput and latency on this machine.

The engine runs as its own process (``ensync serve`` on a temporary data
directory, sqlite store), so it has a core of its own; the publisher and the
subscriber run in this process. Every message is a ~1 KB JSON payload,
published with ``persist: true``, encrypted for the recipient, decrypted and
acked by the subscriber. Latency is publish-call start to handler entry.

The CPU time used by the engine and by the clients is reported beside the
figures: a component using less than a whole core while the other is
saturated is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ensync.client.engine import BaseEngine, EnSyncEngine
from ensync.models import Message
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.core.engine import wall_clock_ms
from ensync.server.store.sqlite import SqliteStore
from ensync.websocket import EnSyncEngine as WsEngine

__all__ = ["BenchResult", "add_parser"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    """The figures one run produced."""

    transport: str
    messages: int
    received: int
    payload_bytes: int
    target_rate: float
    duration_s: float
    publish_rate: float
    end_to_end_rate: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    engine_cpu_percent: float
    client_cpu_percent: float


def add_parser(commands: Any) -> None:
    """Register ``bench`` on the ``ensync`` command parser."""
    bench = commands.add_parser(
        "bench",
        help="measure end-to-end throughput and latency (engine in its own process)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--messages", type=int, default=10_000, help="messages to send (10000)")
    bench.add_argument("--rate", type=float, default=0, help="messages/s; 0 = as fast as possible")
    bench.add_argument("--payload-bytes", type=int, default=1024, help="JSON payload size (1024)")
    bench.add_argument(
        "--concurrency", type=int, default=64, help="most publishes in flight at once (64)"
    )
    bench.add_argument(
        "--transport", choices=["grpc", "ws"], default="grpc", help="wire protocol (grpc)"
    )
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run one benchmark and print its figures; returns the exit code."""
    for name in ("messages", "payload_bytes", "concurrency"):
        if getattr(args, name) <= 0:
            print(f"ensync bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.rate < 0:
        print("ensync bench: --rate must be 0 or more", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_bench(args))
    except BenchError as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        _print_table(result, sys.stdout)
    return 0 if result.received == result.messages else 1


class BenchError(Exception):
    """The benchmark could not run (engine did not start, messages lost)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@contextlib.contextmanager
def _engine_process(
    data_dir: Path, grpc_port: int, http_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable,
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
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


async def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise BenchError(f"the engine exited at start: {err.strip()[-500:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise BenchError(f"the engine did not listen on port {port} within {timeout_s:g} s")


async def _register(data_dir: Path) -> tuple[NewApp, NewApp]:
    store = SqliteStore(data_dir / "ensync.db")
    await store.open()
    try:
        registry = AppRegistry(store, wall_clock_ms, cache_ms=0)
        return await registry.create("bench-publisher"), await registry.create("bench-subscriber")
    finally:
        await store.close()


class _Progress:
    """A one-line progress display on stderr (periodic lines when not a TTY)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._stream = stream
        self._tty = stream.isatty()
        self._last = 0.0

    def update(self, published: int, received: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self._tty else 2.0):
            return
        self._last = now
        width = 30
        done = int(width * received / self._total)
        bar = "#" * done + "-" * (width - done)
        line = f"[{bar}] published {published}/{self._total}  received {received}/{self._total}"
        if self._tty:
            self._stream.write("\r" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


async def _bench(args: argparse.Namespace) -> BenchResult:
    data_dir = Path(tempfile.mkdtemp(prefix="ensync-bench-"))
    try:
        publisher_app, subscriber_app = await _register(data_dir)
        grpc_port, http_port = _free_port(), _free_port()
        with _engine_process(data_dir, grpc_port, http_port) as process:
            await _wait_listening(grpc_port, process, 30.0)
            await _wait_listening(http_port, process, 30.0)
            port = grpc_port if args.transport == "grpc" else http_port
            return await _drive(args, process.pid, port, publisher_app, subscriber_app)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _drive(
    args: argparse.Namespace, engine_pid: int, port: int, pub_app: NewApp, sub_app: NewApp
) -> BenchResult:
    total: int = args.messages
    engine: BaseEngine
    if args.transport == "ws":
        engine = WsEngine(f"ws://127.0.0.1:{port}", max_reconnect_attempts=0)
    else:
        engine = EnSyncEngine(f"grpc://127.0.0.1:{port}", max_reconnect_attempts=0)
    try:
        publisher = await engine.create_client(pub_app.app_key)
        subscriber = await engine.create_client(sub_app.app_key, app_secret_key=sub_app.secret_key)
        latencies_ns: list[int] = []
        sent_at: dict[int, int] = {}
        all_in = asyncio.Event()
        seen: set[int] = set()

        def handle(message: Message) -> None:
            arrived = time.perf_counter_ns()
            seq = message.payload["seq"]
            if seq in seen:
                return  # a redelivery: count each message once
            seen.add(seq)
            latencies_ns.append(arrived - sent_at[seq])
            if len(seen) == total:
                all_in.set()

        subscription = await subscriber.subscribe("bench/messages")
        subscription.on(handle)
        filler = "x" * max(0, args.payload_bytes - 60)
        recipients = [sub_app.app_id]
        metadata = {"persist": True, "headers": {}}
        progress = _Progress(total, sys.stderr)
        published = 0
        slots = asyncio.Semaphore(args.concurrency)
        interval = 1.0 / args.rate if args.rate > 0 else 0.0

        async def publish_one(seq: int) -> None:
            nonlocal published
            try:
                sent_at[seq] = time.perf_counter_ns()
                payload = {"seq": seq, "sent": wall_clock_ms(), "data": filler}
                await publisher.publish("bench/messages", recipients, payload, metadata)
                published += 1
            finally:
                slots.release()

        engine_cpu0 = _cpu_seconds(engine_pid)
        client_cpu0 = time.process_time()
        start = time.perf_counter()
        tasks: set[asyncio.Task[None]] = set()
        for seq in range(total):
            if interval:
                delay = start + seq * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(publish_one(seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            progress.update(published, len(seen))
        while tasks:
            await asyncio.gather(*tasks)
        publish_done = time.perf_counter()
        timeout_s = 30.0 + total / 500
        while not all_in.is_set():
            try:
                await asyncio.wait_for(all_in.wait(), 0.2)
            except TimeoutError:
                if time.perf_counter() - publish_done > timeout_s:
                    break
            progress.update(published, len(seen))
        end = time.perf_counter()
        progress.update(published, len(seen), force=True)
        progress.finish()
        engine_cpu = _cpu_seconds(engine_pid) - engine_cpu0
        client_cpu = time.process_time() - client_cpu0
        duration = end - start
        ordered = sorted(latencies_ns)
        return BenchResult(
            transport=args.transport,
            messages=total,
            received=len(seen),
            payload_bytes=args.payload_bytes,
            target_rate=args.rate,
            duration_s=round(duration, 3),
            publish_rate=round(published / (publish_done - start), 1),
            end_to_end_rate=round(len(seen) / duration, 1),
            latency_p50_ms=_percentile_ms(ordered, 0.50),
            latency_p90_ms=_percentile_ms(ordered, 0.90),
            latency_p99_ms=_percentile_ms(ordered, 0.99),
            latency_max_ms=_percentile_ms(ordered, 1.0),
            engine_cpu_percent=round(100 * engine_cpu / duration, 1),
            client_cpu_percent=round(100 * client_cpu / duration, 1),
        )
    finally:
        await engine.close()


def _percentile_ms(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return round(ordered[index] / 1e6, 2)


def _print_table(result: BenchResult, out: TextIO) -> None:
    rate = f"{result.target_rate:g}/s" if result.target_rate else "as fast as possible"
    rows = [
        ("transport", result.transport),
        ("messages", f"{result.received}/{result.messages} received"),
        ("payload", f"{result.payload_bytes} B JSON, persisted, encrypted, acked"),
        ("target rate", rate),
        ("duration", f"{result.duration_s:.2f} s"),
        ("publish rate", f"{result.publish_rate:,.0f} msg/s"),
        ("end-to-end rate", f"{result.end_to_end_rate:,.0f} msg/s"),
        ("latency p50", f"{result.latency_p50_ms:.2f} ms"),
        ("latency p90", f"{result.latency_p90_ms:.2f} ms"),
        ("latency p99", f"{result.latency_p99_ms:.2f} ms"),
        ("latency max", f"{result.latency_max_ms:.2f} ms"),
        ("engine CPU", f"{result.engine_cpu_percent:.0f} % of one core"),
        ("client CPU", f"{result.client_cpu_percent:.0f} % of one core (publisher + subscriber)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n")
