"""Abuse by volume: rapid reset, connection churn, a one-app flood."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from functools import partial

from ensync._proto import ensync_pb2 as pb
from tests.hostile.common import (
    INTERNAL_ERROR,
    Findings,
    bounded,
    grpc_conn,
    refused_politely,
    valid_payload,
    ws_conn,
)
from tests.hostile.harness import Arena
from tests.hostile.rawgrpc import RawGrpc
from tests.hostile.wire import (
    H2,
    PREFACE,
    RawSocket,
    RawWebSocket,
    WsOp,
    grpc_request_headers,
    h2_frame,
    ws_frame,
)
from tests.support.timing import seconds

__all__ = [
    "FloodResult",
    "churn_connections",
    "connection_flood",
    "flood_from_one_app",
    "grpc_rapid_reset",
]


# ---------------------------------------------------------------------------
# connection flood


@dataclass
class FloodResult:
    """How long each hostile connection lived, per port, and the engine log
    lines written meanwhile."""

    lifetimes_s: dict[str, list[float]] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)


async def connection_flood(arena: Arena, count: int = 1200) -> FloodResult:
    """From one address, ``count`` connections that never send a byte to the
    gRPC port and ``count`` HTTP requests that never finish their headers to
    the WebSocket port, all held until the engine closes them."""
    engine = arena.engine
    result = FloodResult()
    logged_before = len(arena.log().splitlines())

    async def hold(kind: str, port: int, send: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:  # refused before it was established: it held nothing
            result.lifetimes_s.setdefault(kind, []).append(0.0)
            return
        # From when it is established: a connect the kernel kept waiting (a
        # full accept queue retries its SYN after 1, 3, 7 s) held nothing.
        started = time.monotonic()
        try:
            writer.write(send)
            async with asyncio.timeout(seconds(30)):  # no task per connection
                while await reader.read(1 << 16):
                    pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            result.lifetimes_s.setdefault(kind, []).append(time.monotonic() - started)
            writer.close()

    unfinished = f"GET /message HTTP/1.1\r\nHost: 127.0.0.1:{engine.http_port}\r\n".encode()
    holds: list[asyncio.Task[None]] = []
    # In waves of 100 a few ms apart (all of them open within a second): one
    # burst of 2,400 connects would stall this process's own loop, which
    # also runs the steady clients whose latency the test measures.
    for start in range(0, count, 50):
        for _ in range(start, min(count, start + 50)):
            holds.append(asyncio.create_task(hold("grpc", engine.grpc_port, b"")))
            holds.append(asyncio.create_task(hold("http", engine.http_port, unfinished)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*holds)
    result.log_lines = arena.log().splitlines()[logged_before:]
    return result


# ---------------------------------------------------------------------------
# rapid reset


async def grpc_rapid_reset(
    arena: Arena, method: str = "NoSuchMethod", streams: int = 2000, rounds: int = 5
) -> Findings:
    """HTTP/2 "rapid reset" (CVE-2023-44487): on one connection, open a stream
    and reset it at once, ``streams`` times, in ``rounds`` bursts. An unknown
    method keeps ensync's handlers out of it (whatever happens to other
    clients is the gRPC server's doing); a real one reaches them."""
    findings = Findings()
    port = arena.engine.grpc_port
    block = grpc_request_headers(f"/ensync.EnSyncService/{method}", f"127.0.0.1:{port}")
    burst = PREFACE + h2_frame(H2.SETTINGS, 0, 0, b"")
    burst += b"".join(
        h2_frame(H2.HEADERS, H2.END_HEADERS, stream, block)
        + h2_frame(H2.RST_STREAM, 0, stream, b"\x00\x00\x00\x08")  # CANCEL
        for stream in range(1, 2 * streams, 2)
    )
    for _ in range(rounds):
        sock = await RawSocket.open(port)
        try:
            await sock.send(burst)
            await sock.read_until_closed(seconds(1))
        finally:
            sock.abort()
        arena.sample()
        await asyncio.sleep(0.3)
    findings.notes.append(f"{rounds} bursts of {streams} opened-and-reset {method} streams")
    return findings


# ---------------------------------------------------------------------------
# connection churn


async def churn_connections(
    arena: Arena, *, ws_count: int = 2000, grpc_count: int = 1000, idle_count: int = 100
) -> Findings:
    """Thousands of connections opened and dropped: WebSocket CONN + abrupt
    close, gRPC channels that Connect (some Subscribe) and vanish without a
    word, and idle TCP connections to both ports held meanwhile.

    All come from one address, so they stay well under the engine's cap of
    connections per address (256): the idle ones, the WebSocket ones in
    progress, and those the engine has not seen go yet."""
    findings = Findings()
    engine = arena.engine
    peak_sessions = 0
    failures: dict[str, int] = {}

    def failed(kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        failures[key] = failures.get(key, 0) + 1

    idle = [
        await RawSocket.open(port)
        for port in (engine.grpc_port, engine.http_port)
        for _ in range(idle_count)
    ]

    async def ws_one(n: int) -> None:
        try:
            ws = await RawWebSocket.connect(engine.http_port)
        except (OSError, AssertionError, TimeoutError) as exc:
            failed("ws connect", exc)
            return
        try:
            await ws.send_text(f"CONN;ACCESS_KEY=:{arena.hostile.app_key}")
            if n % 2 == 0:  # half wait for the answer, half drop before it
                reply = await ws.next_text()
                if reply is None or not reply.startswith("+PASS:"):
                    failed("ws CONN", AssertionError(reply))
        finally:
            if n % 4 < 2:
                ws.abort()
            else:
                await ws.close()

    async def grpc_one(n: int) -> None:
        stub = RawGrpc(engine.grpc_port, fresh_connection=True)
        try:
            answer = await stub.call("Connect", pb.ConnectRequest(access_key=arena.hostile.app_key))
            if not answer.success:
                failed("grpc Connect", AssertionError(str(answer)))
                return
            if n % 4 == 0:
                subscribe = pb.SubscribeRequest(
                    client_id=answer.response.client_id, message_name="hostile/churn"
                )
                await stub.call("Subscribe", subscribe, timeout_s=0.05)
        finally:
            await stub.close()  # and never a word again

    async def watch(stop: asyncio.Event) -> None:
        nonlocal peak_sessions
        while not stop.is_set():
            arena.sample()
            peak_sessions = max(peak_sessions, int((await engine.health())["sessions"]))
            await asyncio.sleep(0.25)

    stop = asyncio.Event()
    watcher = asyncio.get_running_loop().create_task(watch(stop))
    started = time.monotonic()
    try:
        await asyncio.gather(
            bounded(48, [partial(ws_one, n) for n in range(ws_count)]),
            bounded(24, [partial(grpc_one, n) for n in range(grpc_count)]),
        )
    finally:
        stop.set()
        await watcher
        for sock in idle:
            sock.abort()
    findings.notes.append(
        f"{ws_count} WebSocket + {grpc_count} gRPC connections and {2 * idle_count} idle "
        f"ones in {time.monotonic() - started:.1f} s; peak {peak_sessions} sessions; "
        f"client-side failures: {failures or 'none'}"
    )
    # The churn must have been real: otherwise the checks afterwards prove nothing.
    if peak_sessions < grpc_count // 4:
        findings.violation(
            f"only {peak_sessions} sessions seen at the peak: the churn did not happen"
        )
    if sum(failures.values()) > (ws_count + grpc_count) // 100:
        findings.violation(f"connections failed on the client side: {failures}")
    return findings


# ---------------------------------------------------------------------------
# flood


async def flood_from_one_app(arena: Arena, duration_s: float = 4.0) -> Findings:
    """One app publishes as fast as it can for ``duration_s``: pipelined
    WebSocket PUBs on two sockets and concurrent gRPC publishes."""
    findings = Findings()
    engine = arena.engine
    hostile, sink = arena.hostile, arena.sink
    counts: dict[str, int] = {"ws +PASS": 0, "ws -FAIL": 0, "grpc ok": 0, "grpc refused": 0}
    stop = asyncio.Event()
    payload = valid_payload(sink)

    async def ws_flood() -> None:
        ws, client_id = await ws_conn(engine.http_port, hostile)
        frame = ws_frame(
            WsOp.TEXT,
            (
                f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:hostile/flood;PAYLOAD=:{payload}"
                f";DELIVERY_TO=:{sink.app_id};METADATA=:{{}}"
            ).encode(),
        )
        sent = 0
        answered = 0
        all_in = asyncio.Event()

        async def reader() -> None:
            nonlocal answered
            try:
                while True:
                    reply = await ws.next_text(10)
                    if reply is None:
                        return
                    answered += 1
                    counts["ws +PASS" if reply.startswith("+PASS:") else "ws -FAIL"] += 1
                    if reply.startswith("-FAIL:") and INTERNAL_ERROR in reply:
                        findings.violation(f"flood PUB: {reply[:120]!r}")
                    if stop.is_set() and answered >= sent:
                        return
            finally:
                all_in.set()

        reading = asyncio.get_running_loop().create_task(reader())
        try:
            while not stop.is_set():
                # Keep a bounded number in flight on our side; the engine caps its own.
                if sent - answered < 2048:
                    if not await ws.send(frame * 64):
                        # Dropping an abuser is a policy the engine may have.
                        findings.notes.append(f"the engine closed a flooding WebSocket ({counts})")
                        return
                    sent += 64
                else:
                    await asyncio.sleep(0.005)
            if answered < sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_in.wait(), seconds(20))
            if answered < sent:
                findings.violation(f"flood: {sent - answered} of {sent} WebSocket PUBs unanswered")
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            ws.abort()

    async def grpc_flood() -> None:
        stub = RawGrpc(engine.grpc_port, fresh_connection=True)
        try:
            client_id = await grpc_conn(stub, hostile)
            request = pb.PublishMessageRequest(
                client_id=client_id,
                message_name="hostile/flood",
                payload=payload,
                delivery_to=sink.app_id,
                metadata="{}",
            ).SerializeToString()

            async def worker() -> None:
                while not stop.is_set():
                    answer = await stub.call("PublishMessage", request, "flood", timeout_s=20)
                    if answer.success:
                        counts["grpc ok"] += 1
                    else:
                        counts["grpc refused"] += 1
                        if not refused_politely(answer):
                            findings.violation(f"flood: {answer}")

            await asyncio.gather(*(worker() for _ in range(64)))
        finally:
            await stub.close()

    health_s: list[float] = []

    async def timer() -> None:
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            arena.sample()
            asked = time.monotonic()
            await engine.health()
            health_s.append(time.monotonic() - asked)
            await asyncio.sleep(0.1)
        stop.set()

    started = time.monotonic()
    await asyncio.gather(timer(), ws_flood(), ws_flood(), grpc_flood())
    elapsed = time.monotonic() - started
    accepted = counts["ws +PASS"] + counts["grpc ok"]
    findings.notes.append(
        f"flood: {counts} in {elapsed:.1f} s ({accepted / elapsed:.0f} accepted publishes/s); "
        f"/healthz answered in {max(health_s) * 1000:.0f} ms at worst"
    )
    if accepted == 0:
        findings.violation(f"the flood never got a publish accepted: {counts}")
    return findings
