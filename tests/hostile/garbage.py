"""Bytes that are not the protocol: random garbage, broken, oversized and cut frames."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial

import grpc

from ensync._proto import ensync_pb2 as pb
from tests.hostile.common import Findings, bounded, grpc_conn, ws_conn
from tests.hostile.harness import GRPC_MESSAGE_LIMIT, MAX_PAYLOAD_BYTES, WS_FRAME_LIMIT, Arena
from tests.hostile.rawgrpc import RawGrpc
from tests.hostile.wire import (
    H2,
    PREFACE,
    RawSocket,
    RawWebSocket,
    WsOp,
    grpc_message,
    grpc_request_headers,
    h2_frame,
    pb_len,
    ws_frame,
)
from tests.support.timing import seconds

__all__ = [
    "garbage_bytes",
    "grpc_frame_abuse",
    "ws_frame_abuse",
]


# ---------------------------------------------------------------------------
# random bytes


async def garbage_bytes(arena: Arena, rng: random.Random) -> Findings:
    """Random bytes on both ports, alone and behind a valid HTTP/2 preface or a
    valid WebSocket handshake, some connections read to the end, others dropped."""
    findings = Findings()
    grpc_port = arena.engine.grpc_port
    http_port = arena.engine.http_port
    closed_by_server = 0
    total = 0

    def noise(max_len: int = 8192) -> bytes:
        return rng.randbytes(rng.randint(1, max_len))

    def random_h2_frames(count: int) -> bytes:
        return b"".join(
            h2_frame(rng.randrange(256), rng.randrange(256), rng.randrange(1 << 31), noise(256))
            for _ in range(count)
        )

    def random_ws_frames(count: int) -> bytes:
        return b"".join(
            ws_frame(
                rng.randrange(16),
                noise(512),
                fin=rng.random() < 0.5,
                masked=rng.random() < 0.8,
                rsv=rng.randrange(8) if rng.random() < 0.3 else 0,
            )
            for _ in range(count)
        )

    scenarios: list[tuple[int, Callable[[], bytes], bool]] = []  # (port, bytes, handshake first)
    for _ in range(30):
        scenarios.append((grpc_port, noise, False))
        scenarios.append((http_port, noise, False))
    for _ in range(15):
        scenarios.append((grpc_port, lambda: PREFACE + noise(), False))
        scenarios.append(
            (
                grpc_port,
                lambda: PREFACE + h2_frame(H2.SETTINGS, 0, 0, b"") + random_h2_frames(20),
                False,
            )
        )
        scenarios.append(
            (
                grpc_port,
                lambda: (
                    PREFACE
                    + h2_frame(H2.SETTINGS, 0, 0, b"")
                    + h2_frame(H2.HEADERS, H2.END_HEADERS | H2.END_STREAM, 1, noise(300))
                ),
                False,
            )
        )
        scenarios.append(
            (http_port, lambda: b"GET /message HTTP/1.1\r\n" + noise() + b"\r\n\r\n", False)
        )
        scenarios.append((http_port, noise, True))
        scenarios.append((http_port, lambda: random_ws_frames(20), True))
    scenarios.append(
        (http_port, lambda: b"GET / HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n", False)
    )
    scenarios.append(
        (http_port, lambda: b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n", False)
    )
    rng.shuffle(scenarios)

    async def one(port: int, make: Callable[[], bytes], handshake: bool, read: bool) -> None:
        nonlocal closed_by_server, total
        sock = await RawSocket.open(port)
        try:
            if handshake:
                await sock.send(RawWebSocket.handshake(port))
                head = await sock.read_some(seconds(5))
                if not head or not head.startswith(b"HTTP/1.1 101"):
                    findings.violation(f"WebSocket handshake refused: {head!r:.200}")
                    return
            await sock.send(make())
            total += 1
            if read and await sock.read_until_closed(seconds(3)):
                closed_by_server += 1
        finally:
            sock.abort()

    await bounded(
        32,
        [
            partial(one, port, make, handshake, i % 2 == 0)
            for i, (port, make, handshake) in enumerate(scenarios)
        ],
    )
    findings.notes.append(
        f"{total} garbage connections; of those read to the end, {closed_by_server} were "
        "closed by the engine within 3 s"
    )
    return findings


# ---------------------------------------------------------------------------
# frames: truncated, oversized, cut


async def grpc_frame_abuse(arena: Arena) -> Findings:
    """gRPC messages over the limit, truncated and lying length prefixes, cut
    HTTP/2 frames, a CONTINUATION flood."""
    findings = Findings()
    port = arena.engine.grpc_port
    authority = f"127.0.0.1:{port}"

    stub = RawGrpc(port, fresh_connection=True)
    try:
        client_id = await grpc_conn(stub, arena.hostile)
        # Over the payload limit but under the transport limit: a semantic refusal.
        big = pb.PublishMessageRequest(
            client_id=client_id,
            message_name="hostile/big",
            payload="A" * (MAX_PAYLOAD_BYTES + 1024),
            delivery_to=arena.sink.app_id,
            metadata="{}",
        )
        answer = await stub.call("PublishMessage", big, "payload over the limit")
        if answer.code is not grpc.StatusCode.OK or answer.success:
            findings.violation(f"payload over the limit not refused with success=false: {answer}")
        # Over the transport limit: grpcio refuses it before the engine sees it.
        for size in (GRPC_MESSAGE_LIMIT + 1, 4 * 1024 * 1024):
            body = pb_len(1, client_id.encode()) + pb_len(3, b"A" * size)
            for method in ("PublishMessage", "Connect", "Subscribe"):
                answer = await stub.call(method, body, f"{size} bytes")
                if answer.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    findings.violation(f"no answer to an oversized message: {answer}")
                findings.notes.append(f"oversized message: {answer}")
        # The channel still works afterwards. (Not a Heartbeat: the refused
        # messages never reached the engine, so with the short session timeout
        # the session may have expired meanwhile.)
        after = await stub.call("Connect", pb.ConnectRequest(access_key=arena.hostile.app_key))
        if not after.success:
            findings.violation(f"channel unusable after oversized messages: {after}")
    finally:
        await stub.close()

    def request(method: str = "Connect", stream: int = 1, end_headers: bool = True) -> bytes:
        flags = H2.END_HEADERS if end_headers else 0
        block = grpc_request_headers(f"/ensync.EnSyncService/{method}", authority)
        return h2_frame(H2.HEADERS, flags, stream, block)

    settings = h2_frame(H2.SETTINGS, 0, 0, b"")
    start = PREFACE + settings
    connect_body = pb_len(1, arena.hostile.app_key.encode())
    cases: dict[str, bytes] = {
        "length prefix 0xFFFFFFFF, 1 KiB sent": start
        + request()
        + h2_frame(H2.DATA, 0, 1, grpc_message(b"\x0a" * 1024, declared=0xFFFFFFFF)),
        "length prefix 100, 10 bytes, END_STREAM": start
        + request()
        + h2_frame(H2.DATA, H2.END_STREAM, 1, grpc_message(b"\x0a\x03abc" * 2, declared=100)),
        "length prefix cut in half": start
        + request()
        + h2_frame(H2.DATA, H2.END_STREAM, 1, b"\x00\x00"),
        "compressed flag without grpc-encoding": start
        + request()
        + h2_frame(H2.DATA, H2.END_STREAM, 1, grpc_message(connect_body, compressed=True)),
        "DATA beyond the flow-control window": start
        + request("PublishMessage")
        + b"".join(h2_frame(H2.DATA, 0, 1, b"\x00" * 16384) for _ in range(200)),
        "frame longer than SETTINGS_MAX_FRAME_SIZE": start
        + request()
        + h2_frame(H2.DATA, 0, 1, b"\x00" * 1000, length=(1 << 24) - 1),
        "frame cut mid-way": start
        + request()
        + h2_frame(H2.DATA, 0, 1, b"\x00" * 500, length=1000),
        "frame header cut": start + request() + b"\x00\x00",
        "HEADERS cut mid-way": start
        + h2_frame(H2.HEADERS, H2.END_HEADERS, 1, b"\x00" * 10, length=400),
        "CONTINUATION flood": start
        + request(end_headers=False)
        + b"".join(
            h2_frame(H2.CONTINUATION, 0, 1, grpc_request_headers("/x", "y") * 8)
            for _ in range(3000)
        ),
        "stream id 0 DATA": start + h2_frame(H2.DATA, 0, 0, b"\x00" * 10),
        "WINDOW_UPDATE overflow": start
        + request()
        + h2_frame(H2.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff")
        + h2_frame(H2.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"),
    }

    async def one(label: str, data: bytes, drop_at_once: bool) -> None:
        sock = await RawSocket.open(port)
        try:
            await sock.send(data)
            if not drop_at_once:
                await sock.read_until_closed(seconds(2))
        finally:
            sock.abort()

    started = time.monotonic()
    await bounded(
        8,
        [
            partial(one, label, data, drop)
            for label, data in cases.items()
            for drop in (True, False)
        ],
    )
    findings.notes.append(
        f"{2 * len(cases)} raw HTTP/2 abuses in {time.monotonic() - started:.1f} s"
    )
    return findings


async def ws_frame_abuse(arena: Arena) -> Findings:
    """WebSocket frames over the limit, lying lengths, fragments, protocol
    violations, frames cut mid-way and the socket dropped."""
    findings = Findings()
    port = arena.engine.http_port
    too_big = WS_FRAME_LIMIT + 1024

    async def expect_close(label: str, frames: bytes, codes: set[int]) -> None:
        ws = await RawWebSocket.connect(port)
        try:
            await ws.send(frames)
            code = await ws.close_code(5)
            if code is None or (codes and code not in codes):
                findings.violation(f"{label}: expected close {sorted(codes)}, got {code}")
        finally:
            ws.abort()

    huge_header = ws_frame(WsOp.TEXT, b"", declared=(1 << 63) - 1)
    cases: list[Awaitable[None]] = [
        expect_close("text frame over the limit", ws_frame(WsOp.TEXT, b"A" * too_big), {1009}),
        expect_close("binary frame over the limit", ws_frame(WsOp.BINARY, b"A" * too_big), {1009}),
        # The engine must refuse from the header alone, without waiting for 2**63 bytes.
        expect_close("header promising 2**63-1 bytes", huge_header + b"x" * 100, {1009}),
        expect_close(
            "fragments adding up over the limit",
            ws_frame(WsOp.TEXT, b"A" * (WS_FRAME_LIMIT // 2), fin=False)
            + ws_frame(WsOp.CONTINUATION, b"A" * (WS_FRAME_LIMIT // 2), fin=False)
            + ws_frame(WsOp.CONTINUATION, b"A" * 4096),
            {1009},
        ),
        expect_close("unmasked client frame", ws_frame(WsOp.TEXT, b"PONG", masked=False), {1002}),
        expect_close("ping longer than 125 bytes", ws_frame(WsOp.PING, b"p" * 200), {1002}),
        expect_close("reserved bits set", ws_frame(WsOp.TEXT, b"PONG", rsv=7), {1002}),
        expect_close("unknown opcode", ws_frame(0x3, b"PONG"), {1002}),
        expect_close("continuation without a start", ws_frame(WsOp.CONTINUATION, b"PONG"), {1002}),
        expect_close("fragmented ping", ws_frame(WsOp.PING, b"p", fin=False), {1002}),
        expect_close("close code 999", ws_frame(WsOp.CLOSE, b"\x03\xe7"), {1002}),
        expect_close("close frame of one byte", ws_frame(WsOp.CLOSE, b"\x03"), {1002}),
        expect_close(
            "10,000 one-byte fragments then over the limit",
            ws_frame(WsOp.TEXT, b"P", fin=False)
            + ws_frame(WsOp.CONTINUATION, b"A", fin=False) * 10_000
            + ws_frame(WsOp.CONTINUATION, b"A" * too_big),
            {1009},
        ),
    ]
    await asyncio.gather(*cases)

    # A binary frame is a command of its own, answered -FAIL:, and the socket stays usable.
    ws, client_id = await ws_conn(port, arena.hostile)
    try:
        await ws.send(ws_frame(WsOp.BINARY, b"\x00\x01binary"))
        reply = await ws.next_text()
        if reply is None or not reply.startswith("-FAIL:"):
            findings.violation(f"binary frame: expected -FAIL:, got {reply!r}")
        await ws.send_text(f"ACK;CLIENT_ID=:{client_id};EVENT_IDEM=:nope;BLOCK=:1")
        reply = await ws.next_text()
        if reply is None or not reply.startswith("-FAIL:"):
            findings.violation(f"socket unusable after a binary frame: {reply!r}")
    finally:
        ws.abort()

    # Frames cut mid-way, then the socket dropped: before and after CONN.
    async def cut(authenticate: bool, data: bytes, rst: bool) -> None:
        if authenticate:
            ws, _ = await ws_conn(port, arena.hostile)
        else:
            ws = await RawWebSocket.connect(port)
        await ws.send(data)
        if rst:
            ws.abort()
        else:
            await ws.close()

    pub = ws_frame(WsOp.TEXT, b"PUB;CLIENT_ID=:x;EVENT_NAME=:y;PAYLOAD=:" + b"A" * 60_000)
    cuts = [
        pub[: len(pub) // 2],  # in the payload
        pub[:1],  # in the header
        pub[:6],  # in the masking key
        ws_frame(WsOp.TEXT, b"PONG", fin=False),  # a message never finished
    ]
    await bounded(
        16,
        [
            partial(cut, authenticate, data, rst)
            for authenticate in (False, True)
            for data in cuts
            for rst in (False, True)
            for _ in range(5)
        ],
    )

    # The opening handshake itself cut mid-way.
    async def cut_handshake(size: int) -> None:
        sock = await RawSocket.open(port)
        await sock.send(RawWebSocket.handshake(port)[:size])
        sock.abort()

    await asyncio.gather(*(cut_handshake(size) for size in (1, 10, 50, 100, 150)))
    return findings
