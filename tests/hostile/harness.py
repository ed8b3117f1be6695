"""A live ``ensync serve`` process under attack, and the checks that it came through.

:class:`Arena` starts the engine as a real process (sqlite store, short
session timeout), registers the apps of the test and runs *steady traffic*
beside the attack: two well-behaved publisher/subscriber pairs of our SDK,
gRPC -> WebSocket and WebSocket -> gRPC. After warm-up it records the
process's resident memory and open descriptors. :meth:`Arena.verify` then
checks what must hold after any attack:

* the process is alive and ``/healthz`` answers;
* every publish the steady publishers saw confirmed reached the steady
  subscribers, no steady call failed and no steady client was disconnected;
* every session the attack opened is gone (silent ones expire after the
  session timeout) and memory and descriptors are back near the baseline;
* the engine's log holds no Python traceback.

All problems are collected and reported together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensync import EnSyncClient, EnSyncError, Message
from ensync import EnSyncEngine as GrpcEngine
from ensync.client.engine import BaseEngine
from ensync.server.config import EngineConfig
from ensync.server.core.validation import largest_request
from ensync.websocket import EnSyncEngine as WsEngine
from tests.faults.engine_process import AppKeys, EngineProcess, create_app
from tests.support.timing import eventually, seconds

__all__ = [
    "GRPC_MESSAGE_LIMIT",
    "MAX_PAYLOAD_BYTES",
    "SESSION_TIMEOUT_MS",
    "WS_FRAME_LIMIT",
    "Arena",
    "Footprint",
    "LoggedTraceback",
    "ObservedEngine",
    "SteadyTraffic",
    "grpc_decode_error",
    "http_get",
    "logged_tracebacks",
]

SESSION_TIMEOUT_MS = 2000
MAX_PAYLOAD_BYTES = 64 * 1024
# The engine derives its transport limits from the payload limit (the
# largest request an allowed publish makes), the same for gRPC and WebSocket.
GRPC_MESSAGE_LIMIT = largest_request(MAX_PAYLOAD_BYTES, EngineConfig().max_metadata_bytes)
WS_FRAME_LIMIT = GRPC_MESSAGE_LIMIT
SERVE_ARGS = [
    "--session-timeout-ms",
    str(SESSION_TIMEOUT_MS),
    "--max-payload-bytes",
    str(MAX_PAYLOAD_BYTES),
    "--ack-deadline-ms",
    "5000",
]
# Generous bounds: the point is "no leak proportional to the abuse", not a budget.
RSS_SLACK_KB = 50 * 1024
FD_SLACK = 16
# Steady publishers publish one message, then pause this long.
STEADY_PAUSE_S = 0.02
STEADY_WARMUP_MESSAGES = 10
STEADY_SESSIONS = 4
SDK_OPTIONS: dict[str, Any] = {"reconnect_interval": 100, "call_timeout": 20_000}


@dataclass(frozen=True, slots=True)
class Footprint:
    """The engine process's resident memory and open file descriptors."""

    rss_kb: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        rss_kb = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
        return cls(rss_kb, len(os.listdir(f"/proc/{pid}/fd")))

    def __str__(self) -> str:
        return f"RSS {self.rss_kb / 1024:.1f} MiB, {self.fds} fds"


@dataclass(frozen=True, slots=True)
class LoggedTraceback:
    """A Python traceback found in the engine's log."""

    record: str  # the log line that introduced it
    frames: tuple[str, ...]  # the 'File "...", line N, in f' lines
    exception: str  # the last line: "SomeError: text"

    @property
    def ours(self) -> bool:
        """Whether any frame is ensync's own code."""
        return any("/ensync/" in frame for frame in self.frames)

    def __str__(self) -> str:
        ours = [frame.strip() for frame in self.frames if "/ensync/" in frame]
        where = f"; ensync frames: {ours[-3:]}" if ours else ""
        return f"{self.record[:160]!r} -> {self.exception[:200]!r}{where}"


_TRACEBACK = "Traceback (most recent call last):"


def logged_tracebacks(text: str) -> list[LoggedTraceback]:
    """Every traceback in ``text`` with the log record line before it."""
    found: list[LoggedTraceback] = []
    lines = text.splitlines()
    record = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith(_TRACEBACK):
            if line and not line.startswith(" "):
                record = line
            i += 1
            continue
        i += 1
        frames: list[str] = []
        while i < len(lines) and (lines[i].startswith(" ") or not lines[i]):
            if lines[i].lstrip().startswith("File "):
                frames.append(lines[i])
            i += 1
        exception = lines[i] if i < len(lines) else ""
        found.append(LoggedTraceback(record, tuple(frames), exception))
        i += 1
    return found


def grpc_decode_error(traceback: LoggedTraceback) -> bool:
    """grpcio's own report of a request its deserializer could not parse.

    Not ensync code; whether the engine should produce it at all is the
    subject of one dedicated test, so the other tests tolerate it.
    """
    return (
        "raised by servicer method" in traceback.record
        and traceback.exception.startswith("google.protobuf.message.DecodeError")
        and not traceback.ours
    )


async def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET: ``(status, body)``."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), seconds(timeout_s)
    )
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), seconds(timeout_s))
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class ObservedEngine(EngineProcess):
    """An :class:`EngineProcess` whose pid the test may inspect."""

    @property
    def pid(self) -> int:
        assert self._process is not None, "the engine was never started"
        return self._process.pid

    def footprint(self) -> Footprint:
        return Footprint.of(self.pid)

    async def health(self) -> dict[str, Any]:
        """``/healthz``, parsed; raises AssertionError unless it says ok."""
        status, body = await http_get(self.http_port, "/healthz")
        assert status == 200, f"/healthz answered {status}: {body[:200]!r}"
        answer: dict[str, Any] = json.loads(body)
        assert answer.get("status") == "ok", answer
        return answer


@dataclass
class SteadyTraffic:
    """Two well-behaved pairs, one publish at a time each, and what they saw."""

    receiver: AppKeys
    confirmed: dict[str, tuple[str, int]] = field(default_factory=dict)  # idem -> (route, seq)
    received: dict[str, tuple[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # The message names of the two routes: gRPC publisher to WebSocket
    # subscriber, WebSocket publisher to gRPC subscriber.
    ROUTES = ("hostile/steady/grpc-to-ws", "hostile/steady/ws-to-grpc")

    async def start(self, grpc_engine: BaseEngine, ws_engine: BaseEngine, sender: AppKeys) -> None:
        for engine, label in ((grpc_engine, "grpc"), (ws_engine, "ws")):
            engine.on("disconnect", lambda cause, label=label: self._event(label, cause))
            engine.on("error", lambda error, label=label: self._error(label, error))
        pub_grpc = await grpc_engine.create_client(sender.app_key)
        sub_grpc = await grpc_engine.create_client(
            self.receiver.app_key, app_secret_key=self.receiver.secret_key
        )
        pub_ws = await ws_engine.create_client(sender.app_key)
        sub_ws = await ws_engine.create_client(
            self.receiver.app_key, app_secret_key=self.receiver.secret_key
        )
        to_ws, to_grpc = self.ROUTES
        for subscriber, name in ((sub_ws, to_ws), (sub_grpc, to_grpc)):
            subscription = await subscriber.subscribe(name)
            subscription.on(self._on_message)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._publish_loop(pub_grpc, to_ws)),
            loop.create_task(self._publish_loop(pub_ws, to_grpc)),
        ]

    def _event(self, label: str, cause: object) -> None:
        self.events.append(f"{label} client disconnected: {cause!r}")

    def _error(self, label: str, error: object) -> None:
        self.events.append(f"{label} client error: {error!r}")

    def _on_message(self, message: Message) -> None:
        payload = message.payload
        self.received[message.idem] = (str(payload.get("route")), int(payload.get("seq", -1)))

    async def _publish_loop(self, client: EnSyncClient, route: str) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        while not self._stop.is_set():
            seq += 1
            started = loop.time()
            try:
                idem = await client.publish(
                    route, [self.receiver.app_id], {"route": route, "seq": seq}
                )
            except EnSyncError as exc:
                self.errors.append(f"{route} publish #{seq}: {exc!r}")
            else:
                self.confirmed[idem] = (route, seq)
                self.latencies_s.append(loop.time() - started)
            await asyncio.sleep(STEADY_PAUSE_S)

    def delivered_at_least(self, count: int) -> bool:
        routes = [route for route, _ in self.received.values()]
        return all(routes.count(route) >= count for route in self.ROUTES)

    def missing(self) -> list[str]:
        return [idem for idem in self.confirmed if idem not in self.received]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def summary(self) -> str:
        latencies = sorted(self.latencies_s) or [0.0]
        return (
            f"{len(self.confirmed)} confirmed, {len(self.received)} received, "
            f"publish latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
            f"max {latencies[-1] * 1000:.0f} ms"
        )


class Arena:
    """The engine process, its apps, the steady traffic and the baseline.

    Apps: ``hostile`` (the attacker's own app), ``sink`` (the recipient of its
    floods), ``steady-tx`` and ``steady-rx`` (the well-behaved pairs).
    """

    def __init__(self, engine: ObservedEngine, apps: dict[str, AppKeys]) -> None:
        self.engine = engine
        self.apps = apps
        self.hostile = apps["hostile"]
        self.sink = apps["sink"]
        self.steady = SteadyTraffic(apps["steady-rx"])
        self.baseline = Footprint(0, 0)
        self.peak = Footprint(0, 0)
        self._sdks: list[BaseEngine] = []
        self.notes: list[str] = []

    @classmethod
    async def open(cls, root: Path, *, open_files: int | None = None) -> Arena:
        """Start the engine (with ``open_files`` as its open-files limit, if
        given) and the steady traffic."""
        data = root / "data"
        names = ("hostile", "sink", "steady-tx", "steady-rx")
        # One after the other: concurrent `ensync app create` on a fresh data
        # directory can fail with "database is locked" on a loaded machine.
        keys = [await create_app(data, name) for name in names]
        engine = ObservedEngine(data, root / "logs", SERVE_ARGS, open_files=open_files)
        arena = cls(engine, dict(zip(names, keys, strict=True)))
        try:
            await engine.start()
            await arena._warm_up()
        except BaseException:
            await arena.close()
            raise
        return arena

    async def _warm_up(self) -> None:
        grpc_sdk = GrpcEngine(self.engine.grpc_url, heartbeat_interval=500, **SDK_OPTIONS)
        ws_sdk = WsEngine(self.engine.ws_url, **SDK_OPTIONS)
        self._sdks = [grpc_sdk, ws_sdk]
        await self.steady.start(grpc_sdk, ws_sdk, self.apps["steady-tx"])
        deadline = time.monotonic() + seconds(15)
        while not self.steady.delivered_at_least(STEADY_WARMUP_MESSAGES):
            assert time.monotonic() < deadline, (
                f"steady traffic never flowed: {self.steady.summary()}"
            )
            await asyncio.sleep(0.02)

    async def take_baseline(self) -> None:
        """Record the footprint once the warm-up's attackers are gone."""
        await self.wait_sessions(STEADY_SESSIONS, timeout_s=SESSION_TIMEOUT_MS / 1000 + 5)
        self.baseline = self.peak = self.engine.footprint()

    async def wait_sessions(self, count: int, timeout_s: float) -> int:
        """Poll ``/healthz`` until at most ``count`` sessions remain; the last count seen."""
        deadline = time.monotonic() + seconds(timeout_s)
        while True:
            sessions = int((await self.engine.health())["sessions"])
            if sessions <= count or time.monotonic() > deadline:
                return sessions
            await asyncio.sleep(0.1)

    def sample(self) -> None:
        """Remember the largest footprint seen (call it during an attack)."""
        now = self.engine.footprint()
        self.peak = Footprint(max(self.peak.rss_kb, now.rss_kb), max(self.peak.fds, now.fds))

    async def verify(
        self,
        *,
        tolerate: Callable[[LoggedTraceback], bool] = lambda traceback: False,
        steady_reconnects_allowed: bool = False,
    ) -> None:
        """Every check of the module docstring; raises AssertionError listing all failures.

        Args:
            tolerate: tracebacks in the log that another test is about.
            steady_reconnects_allowed: a steady client that lost its session
                and healed is only noted, not a failure (see the flood test).
        """
        problems: list[str] = []
        if not self.engine.running:
            raise AssertionError(f"the engine process died:\n{self._log_tail()}")
        try:
            await self.engine.health()
        except (AssertionError, OSError, TimeoutError, ValueError) as exc:
            problems.append(f"/healthz failed: {exc!r}")
        steady = self.steady
        await steady.stop()
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not steady.missing(), timeout_s=20)
        missing = steady.missing()
        if missing:
            problems.append(
                f"{len(missing)} of {len(steady.confirmed)} confirmed steady publishes never "
                f"arrived, e.g. {[(idem, steady.confirmed[idem]) for idem in missing[:5]]}"
            )
        wrong = [
            idem
            for idem, seen in steady.received.items()
            if idem in steady.confirmed and steady.confirmed[idem] != seen
        ]
        if wrong:
            problems.append(f"steady deliveries with the wrong content: {wrong[:5]}")
        if not steady.confirmed:
            problems.append("the steady publishers never got a publish confirmed")
        problems += [f"steady traffic: {error}" for error in steady.errors[:10]]
        if steady_reconnects_allowed:
            self.notes += [f"steady traffic: {event}" for event in steady.events[:10]]
        else:
            problems += [f"steady traffic: {event}" for event in steady.events[:10]]
        sessions = await self.wait_sessions(
            STEADY_SESSIONS, timeout_s=SESSION_TIMEOUT_MS / 1000 + 5
        )
        if sessions > STEADY_SESSIONS:
            problems.append(
                f"{sessions} sessions still open, {STEADY_SESSIONS} expected once the "
                f"attackers are gone (session timeout {SESSION_TIMEOUT_MS} ms)"
            )
        footprint = await self._settled_footprint()
        self.notes.append(
            f"baseline {self.baseline}, peak {self.peak}, after {footprint}; {steady.summary()}"
        )
        if footprint.rss_kb > self.baseline.rss_kb + RSS_SLACK_KB:
            problems.append(
                f"memory not released: {footprint} now, {self.baseline} at baseline "
                f"(allowed +{RSS_SLACK_KB // 1024} MiB)"
            )
        if footprint.fds > self.baseline.fds + FD_SLACK:
            problems.append(
                f"descriptors not released: {footprint.fds} open, {self.baseline.fds} at "
                f"baseline (allowed +{FD_SLACK}): {self._fd_kinds()}"
            )
        tracebacks = [tb for tb in logged_tracebacks(self.log()) if not tolerate(tb)]
        if tracebacks:
            problems.append(
                f"{len(tracebacks)} traceback(s) in the engine log, e.g.:\n  "
                + "\n  ".join(str(tb) for tb in _distinct(tracebacks)[:8])
            )
        if not self.engine.running:
            problems.append(f"the engine process died during the checks:\n{self._log_tail()}")
        assert not problems, "\n".join(problems)

    async def _settled_footprint(self) -> Footprint:
        """Descriptors close a moment after their peers go: poll a little."""
        deadline = time.monotonic() + seconds(5)
        while True:
            footprint = self.engine.footprint()
            if footprint.fds <= self.baseline.fds + FD_SLACK or time.monotonic() > deadline:
                return footprint
            await asyncio.sleep(0.1)

    def _fd_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        directory = f"/proc/{self.engine.pid}/fd"
        for name in os.listdir(directory):
            try:
                target = os.readlink(f"{directory}/{name}")
            except OSError:
                continue
            kind = re.sub(r"\[\d+\]$", "", target) if ":" in target else target
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def log(self) -> str:
        return self.engine.all_logs()

    def _log_tail(self) -> str:
        return self.log()[-4000:]

    async def close(self) -> None:
        for sdk in self._sdks:
            try:
                await asyncio.wait_for(sdk.close(), seconds(10))
            except (EnSyncError, TimeoutError) as exc:
                self.notes.append(f"closing an SDK engine failed: {exc!r}")
        await self.engine.close()


def _distinct(tracebacks: list[LoggedTraceback]) -> list[LoggedTraceback]:
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out: list[LoggedTraceback] = []
    for tb in tracebacks:
        key = (tb.exception.split(":", 1)[0], tb.frames[-2:])
        if key not in seen:
            seen.add(key)
            out.append(tb)
    return out
