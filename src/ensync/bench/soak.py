"""``ensync bench --soak MINUTES``: a mixed load, watching for leaks.

One engine process (sqlite, temporary directory, ``--soak-ack-deadline-ms``)
serves, for MINUTES (fractions allowed):

* two publishers, one per transport (gRPC and WebSocket), at
  ``--soak-rate`` messages/s in all, each message for one of two recipient
  apps and one of two names; the WebSocket publisher is replaced by a new
  client every churn period;
* per recipient app three consumer clients (gRPC, WebSocket, and one behind
  a TCP proxy whose links are cut every churn period, so the SDK has to
  reconnect and resubscribe); every churn period one direct consumer is
  closed and a new one created (its unsettled messages go back to the
  others). Consumers ack most messages, and by the message's key defer some
  (then ack the redelivery), discard some, replay some (before and after
  the ack) and ignore a few (redelivered after the ack deadline).

Then publishing stops, the consumers drain, every client closes and the
engine stops. Reported: the engine's RSS and open file descriptors idle
before the load, after a warm-up, once a minute, at the end of the load and
idle again at the end; message counts per verb (ours and the engine's
``/metrics``); errors; and whether every published message was settled —
checked against the store itself once the engine has stopped.
Memory is in MB of 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ensync._loop import run as run_loop
from ensync.bench.common import (
    BenchError,
    EngineProcess,
    ErrorTally,
    ResourceSampler,
    Transport,
    client_engine,
    close_quietly,
    fd_kinds,
    http_get,
    mb,
    pending_messages,
    publish_load,
    register_apps,
    running_engine,
)
from ensync.bench.display import Progress
from ensync.bench.soak_ledger import SoakLedger
from ensync.bench.soak_report import SoakResult, SoakSample, print_table
from ensync.client.client import EnSyncClient
from ensync.client.engine import BaseEngine
from ensync.errors import EnSyncError
from ensync.server.core.apps import NewApp
from ensync.server.store.sqlite import SqliteStore
from ensync.testing.proxy import TcpProxy

__all__ = ["DEFAULT_SOAK_RATE", "SoakResult", "SoakSample", "run"]

DEFAULT_SOAK_RATE = 200.0
_NAMES = ("soak/a", "soak/b")
_METADATA = {"persist": True, "headers": {}}


def run(args: argparse.Namespace) -> int:
    """Run the soak and print its figures; returns 1 if a message was not accounted for."""
    # The SDK warns on every lost link; the soak cuts links on purpose and
    # counts the disconnects itself.
    logging.getLogger("ensync").setLevel(logging.ERROR)
    try:
        result = run_loop(_soak(args))
    except BenchError as exc:
        print(f"ensync bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print_table(result, sys.stdout)
    return 0 if result.all_accounted else 1


async def _soak(args: argparse.Namespace) -> SoakResult:
    data_dir = Path(tempfile.mkdtemp(prefix="ensync-bench-soak-"))
    progress = Progress()
    try:
        apps = await register_apps(data_dir, ["soak-publisher", "soak-r1", "soak-r2"])
        engine_args = [
            f"--ack-deadline-ms={args.soak_ack_deadline_ms}",
            f"--session-timeout-ms={args.soak_session_timeout_ms}",
            # Deliveries that fail because the machine is loaded (leases
            # running out before a busy client gets to them) must not push
            # messages minutes away: the soak has to drain in seconds.
            "--redelivery-backoff-ms=0,250,500,1000",
        ]
        async with running_engine(data_dir, extra_args=engine_args) as engine:
            soak = _Soak(args, engine, apps[0], apps[1:], progress)
            await soak.run()
        return await soak.result(data_dir / "ensync.db")
    finally:
        progress.finish()
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass(eq=False, slots=True)
class _Consumer:
    label: str
    app: NewApp
    transport: Transport
    proxy: TcpProxy | None
    sdk: BaseEngine | None = None


class _Soak:
    """The load, the churn and the engine's readings of one soak run."""

    def __init__(
        self,
        args: argparse.Namespace,
        engine: EngineProcess,
        publisher: NewApp,
        recipients: list[NewApp],
        progress: Progress,
    ) -> None:
        self.args = args
        self.engine = engine
        self.publisher = publisher
        self.recipients = recipients
        self.progress = progress
        self.duration_s = args.soak * 60.0
        self.churn_s = args.churn_seconds or max(1.0, min(20.0, self.duration_s / 5))
        self.filler = "x" * max(0, args.payload_bytes - 40)
        self.errors = ErrorTally()
        self.ledger = SoakLedger(publisher.app_id, self.filler, self.errors)
        self.churn: Counter[str] = Counter()
        self.samples: list[SoakSample] = []
        self.readings: dict[str, tuple[int, int]] = {}  # (rss bytes, fds) by moment
        self.engine_counters: dict[str, int] = {}
        self.engine_end: dict[str, int] = {}
        self.publish_failed = 0
        self.publish_rate = 0.0
        self.rss_max = 0
        self.fds_max = 0
        self.peak_rss = 0
        self.fd_kinds: dict[str, dict[str, int]] = {}
        self._consumers: list[_Consumer] = []
        self._proxies: list[TcpProxy] = []
        self._ws_publisher: tuple[BaseEngine, EnSyncClient] | None = None
        self._retired: list[BaseEngine] = []

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        await asyncio.sleep(1.0)
        self._read("idle_start")
        self.fd_kinds["idle_start"] = fd_kinds(self.engine.pid)
        stop = asyncio.Event()
        grpc_sdk: BaseEngine | None = None
        load: asyncio.Future[list[float]] | None = None
        try:
            for port in (self.engine.grpc_port, self.engine.http_port):
                proxy = TcpProxy(port)
                await proxy.start()
                self._proxies.append(proxy)
            # Per recipient: a direct consumer per transport, and one behind a
            # proxy (gRPC for the first app, WebSocket for the second).
            transports: tuple[Transport, Transport] = ("grpc", "ws")
            for app, proxy, proxied in zip(self.recipients, self._proxies, transports, strict=True):
                for transport in transports:
                    self._consumers.append(
                        _Consumer(f"{app.name}-{transport}", app, transport, None)
                    )
                self._consumers.append(_Consumer(f"{app.name}-proxied", app, proxied, proxy))
            for consumer in self._consumers:
                await self._start_consumer(consumer)
            grpc_sdk = self._sdk("grpc", self.engine.grpc_port)
            grpc_publisher = await grpc_sdk.create_client(self.publisher.app_key)
            await self._new_ws_publisher()
            loads = [
                self._publish_loop("g", lambda: grpc_publisher, stop),
                self._publish_loop("w", self._current_ws_publisher, stop),
            ]
            published = self.ledger.published
            async with ResourceSampler(self.engine.pid, 2.0, lambda: len(published)) as s:
                load = asyncio.gather(*loads)
                await self._watch(s, stop)
                rates = await load
            self.publish_rate = round(sum(rates), 1)
            self.rss_max, self.fds_max = s.max_rss_bytes, s.max_fds
            self._read("end_load")
            await self._drain()
        finally:
            stop.set()
            if load is not None:
                await asyncio.gather(load, return_exceptions=True)
            for sdk in [
                *(c.sdk for c in self._consumers if c.sdk is not None),
                *([grpc_sdk] if grpc_sdk is not None else []),
                *([self._ws_publisher[0]] if self._ws_publisher is not None else []),
                *self._retired,
            ]:
                await close_quietly(sdk, self.errors)
            for proxy in self._proxies:
                await proxy.stop()
        await self._wait_sessions_gone()
        self._read("idle_end")
        self.peak_rss = self.engine.memory().peak_rss_bytes
        self.fd_kinds["idle_end"] = fd_kinds(self.engine.pid)
        self.engine_end = await self._health()
        self.engine_counters = await self._metrics()

    async def _wait_sessions_gone(self) -> None:
        """After the clients closed: wait until the engine has dropped every session."""
        timeout_s = self.args.soak_session_timeout_ms / 1000 * 2 + 15.0
        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            sessions = (await self._health()).get("sessions", 0)
            self.progress.show(f"waiting for the engine to drop {sessions} sessions")
            if sessions == 0:
                break
            await asyncio.sleep(0.5)
        self.progress.finish()
        await asyncio.sleep(1.0)

    async def _watch(self, sampler: ResourceSampler, stop: asyncio.Event) -> None:
        """Show progress, take the warm-up and per-minute readings, churn; then stop."""
        start = time.perf_counter()
        warmup_s = min(10.0, self.duration_s / 10)
        next_churn = start + self.churn_s
        next_minute = start + 60.0
        churn_task: asyncio.Task[None] | None = None
        ledger = self.ledger
        while (now := time.perf_counter()) < start + self.duration_s:
            if "start" not in self.readings and now - start >= warmup_s:
                self._read("start")
            if now >= next_churn and (churn_task is None or churn_task.done()):
                next_churn = now + self.churn_s
                churn_task = asyncio.get_running_loop().create_task(self._churn_once())
            if now >= next_minute:
                next_minute += 60.0
                self._minute_sample((now - start) / 60)
            self.progress.show(
                f"soak {now - start:,.0f}/{self.duration_s:,.0f} s  published"
                f" {len(ledger.published):,}  settled {len(ledger.settled):,}  errors"
                f" {self.errors.total}  engine RSS {mb(sampler.samples[-1].rss_bytes):,.1f} MB"
                f" fds {sampler.samples[-1].fds}"
            )
            await asyncio.sleep(0.5)
        stop.set()
        if churn_task is not None:
            await churn_task
        self._minute_sample((time.perf_counter() - start) / 60)

    def _minute_sample(self, minute: float) -> None:
        memory = self.engine.memory()
        sample = SoakSample(
            minute=round(minute, 2),
            rss_mb=mb(memory.rss_bytes),
            fds=self.engine.open_fds(),
            published=len(self.ledger.published),
            settled=len(self.ledger.settled),
        )
        self.samples.append(sample)
        self.progress.note(
            f"minute {sample.minute:g}: engine RSS {sample.rss_mb:,.1f} MB, fds {sample.fds},"
            f" published {sample.published:,}, settled {sample.settled:,},"
            f" errors {self.errors.total}"
        )

    def _read(self, moment: str) -> None:
        self.readings[moment] = (self.engine.memory().rss_bytes, self.engine.open_fds())

    async def _drain(self) -> None:
        """Wait until every confirmed message is settled (or give up)."""
        limit_s = self.args.soak_drain_seconds
        start = time.perf_counter()
        empty_readings = 0
        while time.perf_counter() - start < limit_s:
            left = self.ledger.unsettled
            self.progress.show(f"draining: {left:,} messages not settled yet")
            if left == 0:
                break
            # A settlement whose answer a cut link lost is settled all the
            # same, and never delivered again: once the engine holds nothing
            # pending twice in a row, the store has the last word (result()).
            empty_readings = empty_readings + 1 if await self._engine_backlog() == 0 else 0
            if empty_readings >= 2:
                break
            await asyncio.sleep(0.5)
        self.progress.finish()

    async def _engine_backlog(self) -> int | None:
        try:
            return await pending_messages(self.engine.http_port)
        except (OSError, BenchError) as exc:
            self.errors.add(exc, "metrics")
            return None

    # ------------------------------------------------------------------ publishing

    async def _publish_loop(
        self, label: str, client: Callable[[], EnSyncClient], stop: asyncio.Event
    ) -> float:
        targets = [(app.app_id, name) for app in self.recipients for name in _NAMES]

        async def publish(seq: int) -> None:
            key = f"{label}-{seq}"
            recipient, name = targets[seq % len(targets)]
            payload = {"key": key, "data": self.filler}
            try:
                idem = await client().publish(name, [recipient], payload, _METADATA)
            except EnSyncError:
                self.ledger.uncertain.add(key)  # it may or may not have been stored
                raise
            self.ledger.published[key] = idem

        figures = await publish_load(
            publish, stop=stop, rate=self.args.soak_rate / 2, errors=self.errors
        )
        self.publish_failed += figures.failed
        return figures.rate

    def _current_ws_publisher(self) -> EnSyncClient:
        assert self._ws_publisher is not None  # created before the load starts
        return self._ws_publisher[1]

    async def _new_ws_publisher(self) -> None:
        sdk = self._sdk("ws", self.engine.http_port)
        client = await sdk.create_client(self.publisher.app_key)
        old, self._ws_publisher = self._ws_publisher, (sdk, client)
        if old is not None:
            self.churn["publisher_restarts"] += 1
            self._retired.append(old[0])
            await asyncio.sleep(1.0)  # publishes already on the old client finish
            # Listed until closed: if the soak ends meanwhile, the final
            # close-all still closes it (closing twice is harmless).
            await close_quietly(old[0], self.errors)
            self._retired.remove(old[0])

    # ------------------------------------------------------------------ consuming

    def _sdk(self, transport: Transport, port: int) -> BaseEngine:
        sdk = client_engine(transport, port, reconnect_interval_ms=250, heartbeat_interval_ms=1000)
        sdk.on("disconnect", lambda _cause: self.churn.update(["disconnects"]))
        sdk.on("reconnect", lambda _attempt: self.churn.update(["reconnects"]))
        sdk.on("error", lambda error: self.errors.add(error, f"sdk {transport}"))
        return sdk

    async def _start_consumer(self, consumer: _Consumer) -> None:
        port = consumer.proxy.port if consumer.proxy else self.engine.port(consumer.transport)
        consumer.sdk = self._sdk(consumer.transport, port)
        app = consumer.app
        client = await consumer.sdk.create_client(app.app_key, app_secret_key=app.secret_key)
        for name in _NAMES:
            subscription = await client.subscribe(name, auto_ack=False)
            subscription.on(self.ledger.handler(subscription))

    async def _churn_once(self) -> None:
        """One round of churn: a consumer replaced, links cut, the WS publisher replaced."""
        direct = [c for c in self._consumers if c.proxy is None]
        consumer = direct[self.churn["consumer_restarts"] % len(direct)]
        try:
            if consumer.sdk is not None:
                await close_quietly(consumer.sdk, self.errors)
            await self._start_consumer(consumer)
            self.churn["consumer_restarts"] += 1
            for proxy in self._proxies:
                self.churn["link_cuts"] += 1
                await proxy.cut(0.5)
            await self._new_ws_publisher()
        except EnSyncError as exc:
            self.errors.add(exc, "churn")

    # ------------------------------------------------------------------ the engine's view

    async def _health(self) -> dict[str, int]:
        try:
            reading = json.loads(await http_get(self.engine.http_port, "/healthz"))
        except (OSError, ValueError, BenchError) as exc:
            self.errors.add(exc, "healthz")
            return {}
        return {key: int(value) for key, value in reading.items() if isinstance(value, int)}

    async def _metrics(self) -> dict[str, int]:
        try:
            text = await http_get(self.engine.http_port, "/metrics")
        except (OSError, BenchError) as exc:
            self.errors.add(exc, "metrics")
            return {}
        counters: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("ensync_") and name.endswith("_total"):
                counters[name.removeprefix("ensync_").removesuffix("_total")] = int(float(value))
        return counters

    async def result(self, db_path: Path) -> SoakResult:
        """The figures, with every unsettled message looked up in the (stopped) store."""
        store = SqliteStore(db_path)
        await store.open()
        try:
            accounting = await self.ledger.account(store, self.recipients)
        finally:
            await store.close()
        ledger, stuck = self.ledger, accounting.stuck
        unknown = ledger.unknown_keys()
        problems = self.engine.log_problems()
        idle_start, start = self.readings["idle_start"], self.readings.get("start", (0, 0))
        end_load, idle_end = self.readings["end_load"], self.readings["idle_end"]
        return SoakResult(
            minutes=self.args.soak,
            rate_target=self.args.soak_rate,
            churn_seconds=self.churn_s,
            rss_idle_start_mb=mb(idle_start[0]),
            fds_idle_start=idle_start[1],
            rss_start_mb=mb(start[0]),
            fds_start=start[1],
            rss_end_load_mb=mb(end_load[0]),
            fds_end_load=end_load[1],
            rss_max_mb=mb(self.rss_max),
            fds_max=self.fds_max,
            rss_idle_end_mb=mb(idle_end[0]),
            fds_idle_end=idle_end[1],
            peak_rss_mb=mb(self.peak_rss),
            fd_kinds=self.fd_kinds,
            samples=self.samples,
            published=len(ledger.published),
            publish_failed=self.publish_failed,
            publish_rate=self.publish_rate,
            verbs=dict(sorted(ledger.verbs.items())),
            engine_counters=self.engine_counters,
            churn=dict(sorted(self.churn.items())),
            acked=ledger.count_settled("acked"),
            discarded=ledger.count_settled("discarded"),
            settled_per_store_only=accounting.settled_in_store,
            stuck=len(stuck),
            stuck_examples=stuck[:10],
            unknown_keys=len(unknown),
            store_pending=accounting.store_pending,
            dead_letters=accounting.dead_letters,
            engine_end=self.engine_end,
            all_accounted=not stuck and not unknown and accounting.store_pending == 0,
            errors=self.errors.as_dict(),
            engine_problem_count=len(problems),
            engine_problems=problems[:20],
        )
