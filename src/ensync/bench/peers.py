"""The publisher and subscriber processes of ``ensync bench --compare``.

Each side of a comparison runs in a process of its own, so a publisher, a
subscriber and the server each have the machine's scheduler to themselves,
as they would in production. The parent starts a peer with one JSON
argument (a :class:`PeerSpec`); the peer prints ``ready`` once it can take
part (a subscriber: subscribed), then one JSON line of figures, and exits.

The same peer code drives ensync (through the public SDK API) and NATS
JetStream (through nats-py), with the same payloads: a ~1 KB JSON object
carrying its sequence number and the ``time.monotonic_ns()`` of its publish
call (one system-wide clock on Linux, so two processes can subtract it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from ensync._loop import run as run_loop
from ensync.bench.common import client_engine, close_quietly, percentile_ms
from ensync.crypto import Sealer, open_payload
from ensync.errors import EnSyncError
from ensync.models import Message
from ensync.server.runtime.clock import wall_clock_ms
from ensync.testing.process import Transport

__all__ = [
    "FETCH_BATCH",
    "NATS_STREAM",
    "NATS_SUBJECT",
    "PeerSpec",
    "PublisherFigures",
    "SubscriberFigures",
    "main",
]

System = Literal["ensync", "nats"]
Role = Literal["publish", "subscribe"]
Mode = Literal["throughput", "latency"]
Encryption = Literal["none", "fresh", "reuse"]

NATS_STREAM = "BENCH"
NATS_SUBJECT = "bench.messages"
NATS_DURABLE = "bench"
ENSYNC_NAME = "bench/messages"
FETCH_BATCH = 100
# A reused ephemeral key lives this long (any value above the run's length
# measures the same thing: one key agreement per recipient).
REUSE_MS = 60_000


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What one peer process does (passed as JSON on its command line)."""

    system: System
    role: Role
    mode: Mode
    messages: int
    payload_bytes: int
    # ensync: "grpc://..." or "ws://..."; NATS: "nats://..."
    url: str
    # The recipient: its app id (the public key sealed to) and secret key.
    recipient_app_id: str
    recipient_secret: str
    # ensync only: the publisher's app key, the subscriber's app key.
    app_key: str = ""
    encryption: Encryption = "fresh"
    in_flight: int = 256
    rate: float = 0.0
    deadline_s: float = 120.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PeerSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True)
class PublisherFigures:
    """What a publisher reports: when it started and ended (monotonic ns),
    how many publishes were confirmed, and each awaited call's duration."""

    start_ns: int
    end_ns: int
    published: int
    failed: int
    call_p50_ms: float
    call_p99_ms: float
    cpu_s: float

    @classmethod
    def from_report(cls, raw: dict[str, Any]) -> PublisherFigures:
        """Read a peer's JSON report (extra fields are ignored)."""
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class SubscriberFigures:
    """What a subscriber reports: distinct messages received, when the last
    one arrived (monotonic ns), and publish-call-to-handler latencies."""

    received: int
    duplicates: int
    last_ns: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    cpu_s: float

    @classmethod
    def from_report(cls, raw: dict[str, Any]) -> SubscriberFigures:
        """Read a peer's JSON report (extra fields are ignored)."""
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


def main(argv: list[str] | None = None) -> int:
    """Run the peer ``argv[0]`` (a :class:`PeerSpec` as JSON) describes."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ensync.bench.peers SPEC_JSON", file=sys.stderr)
        return 2
    spec = PeerSpec.from_json(args[0])
    # Both sides' peers (ensync's and NATS's) run on the same kind of loop.
    figures: PublisherFigures | SubscriberFigures = (
        run_loop(_publish(spec)) if spec.role == "publish" else run_loop(_subscribe(spec))
    )
    print(json.dumps(dataclasses.asdict(figures)), flush=True)
    return 0


def _endpoint(url: str) -> tuple[Transport, int]:
    """``grpc://127.0.0.1:PORT`` or ``ws://...``: the transport and port."""
    transport: Transport = "ws" if url.startswith("ws") else "grpc"
    return transport, int(url.rsplit(":", 1)[1])


def _ready() -> None:
    print("ready", flush=True)


# ---------------------------------------------------------------- payloads


class _Body:
    """Builds the ~``payload_bytes`` JSON objects every peer sends."""

    def __init__(self, payload_bytes: int) -> None:
        overhead = len(json.dumps({"seq": 0, "sent_ns": time.monotonic_ns(), "data": ""}))
        self._filler = "x" * max(0, payload_bytes - overhead - 4)

    def make(self, seq: int) -> dict[str, Any]:
        return {"seq": seq, "sent_ns": time.monotonic_ns(), "data": self._filler}


class _Received:
    """Counts distinct messages and their latencies; done when all are in."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = bytearray(expected)
        self.count = 0
        self.duplicates = 0
        self.last_ns = 0
        self.latencies = array("q")
        self.all_in = asyncio.Event()

    def take(self, body: dict[str, Any], arrived_ns: int) -> None:
        seq = body["seq"]
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.count += 1
        self.last_ns = arrived_ns
        self.latencies.append(arrived_ns - body["sent_ns"])
        if self.count == self.expected:
            self.all_in.set()

    def figures(self, cpu_s: float) -> SubscriberFigures:
        ordered = sorted(self.latencies)
        return SubscriberFigures(
            received=self.count,
            duplicates=self.duplicates,
            last_ns=self.last_ns,
            latency_p50_ms=percentile_ms(ordered, 0.50),
            latency_p90_ms=percentile_ms(ordered, 0.90),
            latency_p99_ms=percentile_ms(ordered, 0.99),
            latency_max_ms=percentile_ms(ordered, 1.0),
            cpu_s=round(cpu_s, 3),
        )


# ---------------------------------------------------------------- publishing


async def _publish(spec: PeerSpec) -> PublisherFigures:
    if spec.system == "ensync":
        return await _publish_ensync(spec)
    return await _publish_nats(spec)


async def _publish_ensync(spec: PeerSpec) -> PublisherFigures:
    reuse = REUSE_MS if spec.encryption == "reuse" else 0
    sdk = client_engine(*_endpoint(spec.url), sender_key_reuse_ms=reuse)
    try:
        client = await sdk.create_client(spec.app_key)
        body = _Body(spec.payload_bytes)
        recipients = [spec.recipient_app_id]
        metadata = {"persist": True, "headers": {}}

        async def send(seq: int) -> None:
            await client.publish(ENSYNC_NAME, recipients, body.make(seq), metadata)

        _ready()
        return await _drive(spec, send, (EnSyncError,))
    finally:
        await close_quietly(sdk)


async def _publish_nats(spec: PeerSpec) -> PublisherFigures:
    import nats  # optional: the bench extra
    from nats.errors import Error as NatsError

    connection = await nats.connect(spec.url)
    try:
        stream = connection.jetstream(publish_async_max_pending=spec.in_flight)
        body = _Body(spec.payload_bytes)
        encode = _nats_encoder(spec)
        _ready()
        if spec.mode == "latency":

            async def send(seq: int) -> None:
                await stream.publish(NATS_SUBJECT, encode(body.make(seq)))

            return await _drive(spec, send, (NatsError,))
        # Full speed: publish_async keeps up to `in_flight` unconfirmed.
        cpu0 = time.process_time()
        start = time.monotonic_ns()
        failed = 0
        acks: list[asyncio.Future[Any]] = []
        for seq in range(spec.messages):
            acks.append(await stream.publish_async(NATS_SUBJECT, encode(body.make(seq))))
        for outcome in await asyncio.gather(*acks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                failed += 1
        end = time.monotonic_ns()
        return PublisherFigures(
            start_ns=start,
            end_ns=end,
            published=spec.messages - failed,
            failed=failed,
            call_p50_ms=0.0,
            call_p99_ms=0.0,
            cpu_s=round(time.process_time() - cpu0, 3),
        )
    finally:
        await connection.close()


def _nats_encoder(spec: PeerSpec) -> Callable[[dict[str, Any]], bytes]:
    if spec.encryption == "none":
        return lambda body: json.dumps(body).encode()
    sealer = Sealer(REUSE_MS if spec.encryption == "reuse" else 0)
    recipient = spec.recipient_app_id

    def encode(body: dict[str, Any]) -> bytes:
        return sealer.seal(json.dumps(body).encode(), recipient, wall_clock_ms()).encode()

    return encode


async def _drive(
    spec: PeerSpec,
    send: Callable[[int], Awaitable[None]],
    failures: tuple[type[Exception], ...],
) -> PublisherFigures:
    """Throughput: ``in_flight`` sends at a time. Latency: one at a time on a
    schedule of ``rate`` per second (a late send delays the schedule). A send
    that raises one of ``failures`` (the system's own errors) is counted as
    failed; anything else is a bug of the peer and ends it."""
    cpu0 = time.process_time()
    calls = array("q")
    failed = 0
    start = time.monotonic_ns()
    if spec.mode == "latency":
        interval_ns = int(1e9 / spec.rate)
        due = start
        for seq in range(spec.messages):
            wait = due - time.monotonic_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
            began = time.monotonic_ns()
            try:
                await send(seq)
            except failures:  # a failed publish is counted, not fatal
                failed += 1
            else:
                calls.append(time.monotonic_ns() - began)
            due = max(due + interval_ns, began)
    else:
        next_seq = 0

        async def worker() -> None:
            nonlocal next_seq, failed
            while next_seq < spec.messages:
                seq = next_seq
                next_seq += 1
                began = time.monotonic_ns()
                try:
                    await send(seq)
                except failures:  # a failed publish is counted, not fatal
                    failed += 1
                else:
                    calls.append(time.monotonic_ns() - began)

        await asyncio.gather(*(worker() for _ in range(min(spec.in_flight, spec.messages))))
    end = time.monotonic_ns()
    ordered = sorted(calls)
    return PublisherFigures(
        start_ns=start,
        end_ns=end,
        published=len(calls),
        failed=failed,
        call_p50_ms=percentile_ms(ordered, 0.50),
        call_p99_ms=percentile_ms(ordered, 0.99),
        cpu_s=round(time.process_time() - cpu0, 3),
    )


# ---------------------------------------------------------------- subscribing


async def _subscribe(spec: PeerSpec) -> SubscriberFigures:
    if spec.system == "ensync":
        return await _subscribe_ensync(spec)
    return await _subscribe_nats(spec)


async def _subscribe_ensync(spec: PeerSpec) -> SubscriberFigures:
    sdk = client_engine(*_endpoint(spec.url))
    received = _Received(spec.messages)
    cpu0 = time.process_time()
    try:
        client = await sdk.create_client(spec.app_key, app_secret_key=spec.recipient_secret)

        def handle(message: Message) -> None:
            received.take(message.payload, time.monotonic_ns())

        (await client.subscribe(ENSYNC_NAME)).on(handle)
        _ready()
        await _wait_all(received, spec.deadline_s)
        return received.figures(time.process_time() - cpu0)
    finally:
        await close_quietly(sdk)


async def _subscribe_nats(spec: PeerSpec) -> SubscriberFigures:
    import nats  # optional: the bench extra
    from nats.errors import TimeoutError as NatsTimeout

    connection = await nats.connect(spec.url)
    received = _Received(spec.messages)
    cpu0 = time.process_time()
    try:
        stream = connection.jetstream()
        subscription = await stream.pull_subscribe(
            NATS_SUBJECT, durable=NATS_DURABLE, stream=NATS_STREAM
        )
        decode = _nats_decoder(spec)
        _ready()

        async def consume() -> None:
            while not received.all_in.is_set():
                try:
                    batch = await subscription.fetch(FETCH_BATCH, timeout=1.0)
                except (NatsTimeout, TimeoutError):
                    continue
                for message in batch:
                    received.take(decode(message.data), time.monotonic_ns())
                    await message.ack()

        consumer = asyncio.get_running_loop().create_task(consume())
        try:
            await _wait_all(received, spec.deadline_s)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        return received.figures(time.process_time() - cpu0)
    finally:
        await connection.close()


def _nats_decoder(spec: PeerSpec) -> Callable[[bytes], dict[str, Any]]:
    if spec.encryption == "none":
        return lambda data: dict(json.loads(data))
    secret = spec.recipient_secret
    return lambda data: dict(json.loads(open_payload(data.decode(), secret)))


async def _wait_all(received: _Received, deadline_s: float) -> None:
    # Give up after the deadline: the figures then show what was missing.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(received.all_in.wait(), deadline_s)


if __name__ == "__main__":
    raise SystemExit(main())
