"""Requests that do not decode: malformed protobuf, invalid UTF-8 on both transports."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Iterable
from functools import partial
from typing import TypeAlias

import grpc

from tests.hostile.common import (
    CLIENT,
    Findings,
    bounded,
    grpc_conn,
    refused_politely,
    session_lost,
    valid_payload,
    ws_conn,
)
from tests.hostile.harness import Arena
from tests.hostile.rawgrpc import METHODS, Answer, RawGrpc
from tests.hostile.wire import RawWebSocket, WsOp, pb_len, pb_tag, pb_varint, ws_frame

__all__ = [
    "invalid_utf8_grpc",
    "invalid_utf8_ws",
    "malformed_bodies",
    "malformed_protobuf",
    "strict_refusals",
]


# ---------------------------------------------------------------------------
# malformed protobuf

_BAD_UTF8 = (
    b"\xff",
    b"\xc0\xaf",  # overlong '/'
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"ok\xe2\x82",  # cut multi-byte sequence at the end
    b"\x80continuation",
)


def malformed_bodies(rng: random.Random) -> dict[str, bytes]:
    """Request bodies that are not valid protobuf, or valid with wrong wire types."""
    bodies = {
        "random 1 byte": rng.randbytes(1),
        "random 7 bytes": rng.randbytes(7),
        "random 64 bytes": rng.randbytes(64),
        "random 4 KiB": rng.randbytes(4096),
        "ten 0xff": b"\xff" * 10,
        "truncated varint": b"\x08\x80\x80\x80",
        "11-byte varint": b"\x08" + b"\xff" * 10 + b"\x01",
        "field number 0": b"\x00\x01",
        "wire type 6": b"\x0e\x01",
        "wire type 7": b"\x0f\x01",
        "unterminated group": b"\x0b",
        "end group without start": b"\x0c",
        "100,000 nested groups": b"\x0b" * 100_000,
        "length 2**32 for 3 bytes": pb_len(1, b"abc", declared=1 << 32),
        "length 2**31-1 for 3 bytes": pb_len(1, b"abc", declared=(1 << 31) - 1),
        "length 2**64-1": pb_len(1, b"abc", declared=(1 << 64) - 1),
        "length -1 (as varint)": pb_len(1, b"abc", declared=-1),
        "length one past the end": pb_len(1, b"abc", declared=4),
        "string field as varint": pb_varint(1, 12345),
        "string field as fixed64": pb_tag(1, 1) + b"\x00" * 8,
        "string field as fixed32": pb_tag(1, 5) + b"\x00" * 4,
        "int64 field as bytes": pb_len(4, b"\x01\x02"),
        "int64 field as fixed32, cut": pb_tag(4, 5) + b"\x00",
        "field 1 repeated 20,000 times": pb_len(1, b"x") * 20_000,
        "unknown field 536870911": pb_len(536_870_911, b"x" * 100),
        "fixed64 cut": pb_tag(2, 1) + b"\x00\x00",
    }
    for n, bad in enumerate(_BAD_UTF8):
        for fieldno in (1, 2, 3):
            bodies[f"invalid UTF-8 #{n} in field {fieldno}"] = pb_len(fieldno, bad)
    return bodies


async def malformed_protobuf(
    arena: Arena, bodies: dict[str, bytes], methods: Iterable[str] = METHODS
) -> tuple[Findings, list[Answer]]:
    """Every body to every method through a real channel; returns the answers too."""
    findings = Findings()
    answers: list[Answer] = []
    stubs = [RawGrpc(arena.engine.grpc_port, fresh_connection=True) for _ in range(4)]
    try:

        async def one(n: int, method: str, label: str, body: bytes) -> None:
            answer = await stubs[n % len(stubs)].call(method, body, label)
            answers.append(answer)
            if not refused_politely(answer):
                findings.violation(str(answer))

        await bounded(
            16,
            [
                partial(one, n, method, label, body)
                for n, (method, (label, body)) in enumerate(
                    (method, item) for method in methods for item in bodies.items()
                )
            ],
        )
    finally:
        for stub in stubs:
            await stub.close()
    return findings, answers


def strict_refusals(answers: list[Answer]) -> Findings:
    """For undecodable bodies, PROTOCOL.md §2.3 / DESIGN.md §7: a clear
    INVALID_ARGUMENT naming the problem (not UNKNOWN, not a retried status)."""
    findings = Findings()
    for answer in answers:
        if answer.code is not grpc.StatusCode.INVALID_ARGUMENT:
            findings.violation(str(answer))
    return findings


async def invalid_utf8_grpc(arena: Arena) -> Findings:
    """Invalid UTF-8 in each string field of otherwise valid requests of a
    connected client, hand-encoded (protobuf-python refuses to build them)."""
    stub = RawGrpc(arena.engine.grpc_port, fresh_connection=True)
    findings = Findings()
    try:
        client_id = (await grpc_conn(stub, arena.hostile)).encode()
        good = {
            1: client_id,
            2: b"hostile/utf8",
            3: valid_payload(arena.sink).encode(),
            4: arena.sink.app_id.encode(),
            5: b"{}",
        }
        for method in ("PublishMessage", "PublishEvent"):
            for fieldno in (1, 2, 3, 4, 5, 6):
                for bad in _BAD_UTF8:
                    fields = dict(good)
                    fields[fieldno] = bad
                    body = b"".join(pb_len(n, value) for n, value in sorted(fields.items()))
                    answer = await stub.call(method, body, f"field {fieldno} = {bad!r}")
                    if not refused_politely(answer) or answer.success:
                        findings.violation(str(answer))
                    if lost := await session_lost(stub, client_id.decode(), answer):
                        findings.violation(lost)
        for method in METHODS:
            if method.startswith("Publish"):
                continue
            for bad in _BAD_UTF8:
                body = pb_len(1, client_id) + pb_len(2, bad) + pb_len(3, bad)
                answer = await stub.call(method, body, f"fields 2, 3 = {bad!r}")
                if not refused_politely(answer):
                    findings.violation(str(answer))
                if lost := await session_lost(stub, client_id.decode(), answer):
                    findings.violation(lost)
    finally:
        await stub.close()
    return findings


# (opcode, payload, fin) of each frame; CLIENT is replaced before masking.
_Frames: TypeAlias = list[tuple[int, bytes, bool]]


async def invalid_utf8_ws(arena: Arena) -> Findings:
    """Invalid UTF-8 in WebSocket text frames, whole or split across fragments:
    the engine closes with 1007 (docs/protocol.md); a valid character split
    across fragments is fine."""
    findings = Findings()
    port = arena.engine.http_port

    async def expect_1007(label: str, authenticate: bool, frames: _Frames) -> None:
        if authenticate:
            ws, client_id = await ws_conn(port, arena.hostile)
        else:
            ws, client_id = await RawWebSocket.connect(port), "x"
        try:
            await ws.send(
                b"".join(
                    ws_frame(opcode, payload.replace(CLIENT.encode(), client_id.encode()), fin=fin)
                    for opcode, payload, fin in frames
                )
            )
            code = await ws.close_code(5)
            if code != 1007:
                findings.violation(f"{label}: expected close 1007, got {code}")
        finally:
            ws.abort()

    publish = (
        f"PUB;CLIENT_ID=:{CLIENT};EVENT_NAME=:n;PAYLOAD=:{valid_payload(arena.sink)}"
        f";DELIVERY_TO=:{arena.sink.app_id};METADATA=:"
    ).encode()
    pause = f"PAUSE;CLIENT_ID=:{CLIENT};EVENT_NAME=:n;REASON=:".encode()
    cases: list[Awaitable[None]] = []
    for n, bad in enumerate(_BAD_UTF8):
        recipes: dict[str, _Frames] = {
            "whole frame": [(WsOp.TEXT, bad, True)],
            "in CONN": [(WsOp.TEXT, b"CONN;ACCESS_KEY=:" + bad, True)],
            "in PUB METADATA": [(WsOp.TEXT, publish + b'{"headers":{"k":"' + bad + b'"}}', True)],
            "in a second fragment": [(WsOp.TEXT, pause, False), (WsOp.CONTINUATION, bad, True)],
        }
        for authenticate in (False, True):
            for where, recipe in recipes.items():
                cases.append(expect_1007(f"#{n} {where}", authenticate, recipe))
    await asyncio.gather(*cases)

    # A valid multi-byte character split across fragments must still work.
    ws, client_id = await ws_conn(port, arena.hostile)
    try:
        text = f"PAUSE;CLIENT_ID=:{client_id};EVENT_NAME=:n;REASON=:caf\u00e9 \u20ac".encode()
        cut_at = len(text) - 2  # inside the euro sign
        await ws.send(
            ws_frame(WsOp.TEXT, text[:cut_at], fin=False)
            + ws_frame(WsOp.CONTINUATION, text[cut_at:])
        )
        reply = await ws.next_text()
        if reply != "+PASS:paused":
            findings.violation(f"valid UTF-8 split across fragments: got {reply!r}")
    finally:
        ws.abort()
    return findings
