"""Well-formed requests with absurd values: numbers, sizes, nesting, non-finite JSON."""

from __future__ import annotations

import base64
import json
from functools import partial

from google.protobuf.message import Message as ProtoMessage

from ensync._proto import ensync_pb2 as pb
from tests.faults.engine_process import AppKeys
from tests.hostile.common import (
    CLIENT,
    INTERNAL_ERROR,
    MAX_REPLY_CHARS,
    Findings,
    bounded,
    grpc_conn,
    refused_politely,
    session_lost,
    valid_payload,
    ws_conn,
)
from tests.hostile.harness import MAX_PAYLOAD_BYTES, Arena
from tests.hostile.rawgrpc import RawGrpc
from tests.hostile.wire import RawWebSocket

__all__ = [
    "absurd_grpc_requests",
    "absurd_publish_cases",
    "absurd_ws_commands",
    "non_finite_metadata",
]


def _deep(levels: int) -> str:
    """A JSON object nested ``levels`` deep: {"a":{"a":...1...}}."""
    return '{"a":' * levels + "1" + "}" * levels


def _publish_fields(client_id: str, sink: AppKeys) -> dict[str, str | None]:
    """The fields of a valid publish to ``sink``, by name."""
    return {
        "client_id": client_id,
        "name": "hostile/absurd",
        "payload": valid_payload(sink),
        "delivery_to": sink.app_id,
        "metadata": "{}",
        "payload_metadata": None,
    }


def absurd_publish_cases(sink: AppKeys) -> list[tuple[str, dict[str, str | None]]]:
    """(label, overrides of a valid publish's fields) for both transports."""
    payload = valid_payload(sink)
    deep_payload = base64.b64encode(b"[" * 20_000 + b"]" * 20_000).decode()
    cases: list[tuple[str, dict[str, str | None]]] = [
        ("metadata ttl_ms 2**63-1", {"metadata": json.dumps({"ttl_ms": 2**63 - 1})}),
        ("metadata ttl_ms 10**30", {"metadata": json.dumps({"ttl_ms": 10**30})}),
        ("metadata ttl_ms 2**62", {"metadata": json.dumps({"ttl_ms": 2**62})}),
        ("metadata ttl_ms -1", {"metadata": json.dumps({"ttl_ms": -1})}),
        ("metadata ttl_ms 1e308", {"metadata": '{"ttl_ms":1e308}'}),
        ("metadata with a 4,000-digit number", {"metadata": '{"n":' + "9" * 4000 + "}"}),
        ("metadata with a 5,000-digit number", {"metadata": '{"n":' + "9" * 5000 + "}"}),
        ("metadata 100,000 levels of [", {"metadata": "[" * 100_000}),
        ("metadata 60,000 levels of [", {"metadata": "[" * 60_000}),
        ("metadata object 10,000 levels deep", {"metadata": _deep(10_000)}),
        ("metadata headers 10,000 levels deep", {"metadata": '{"headers":' + _deep(10_000) + "}"}),
        (
            "metadata 100 KB header value",
            {"metadata": json.dumps({"headers": {"k": "v" * 100_000}})},
        ),
        ("metadata 60 KB header value", {"metadata": json.dumps({"headers": {"k": "v" * 60_000}})}),
        (
            "idempotency key of 10 KB",
            {"metadata": json.dumps({"headers": {"ensync-idempotency-key": "k" * 10_000}})},
        ),
        ("payload_metadata 100,000 levels of [", {"payload_metadata": "[" * 100_000}),
        ("payload_metadata 30,000 levels of {", {"payload_metadata": _deep(30_000)}),
        ("payload base64 of 20,000 levels of [", {"payload": deep_payload}),
        ("payload over the limit", {"payload": payload * (MAX_PAYLOAD_BYTES // len(payload) + 2)}),
        ("message name of 10 KB", {"name": "n" * 10_000}),
        ("recipient of 10 KB", {"delivery_to": "A" * 10_000}),
        ("client_id of 10 KB", {"client_id": "c" * 10_000}),
    ]
    return cases


async def absurd_ws_commands(arena: Arena) -> Findings:
    """Absurd numbers and sizes in every WebSocket command, each on a fresh
    connection: the engine must answer ``-FAIL:``/``+PASS:`` (never
    ``internal error``), briefly, and keep the connection usable."""
    findings = Findings()
    port = arena.engine.http_port
    hostile, sink = arena.hostile, arena.sink
    setup, setup_id = await ws_conn(port, hostile)
    try:
        # A message of the hostile app's own, so settle commands find something.
        await setup.send_text(
            f"PUB;CLIENT_ID=:{setup_id};EVENT_NAME=:hostile/own;PAYLOAD=:{valid_payload(hostile)}"
            f";DELIVERY_TO=:{hostile.app_id};METADATA=:{{}}"
        )
        reply = await setup.next_text()
        assert reply is not None, "no answer to PUB"
        assert reply.startswith("+PASS:"), reply
        idem = reply.removeprefix("+PASS:")
    finally:
        setup.abort()

    def pub(fields: dict[str, str | None]) -> str:
        values = _publish_fields(CLIENT, sink) | fields
        text = (
            f"PUB;CLIENT_ID=:{values['client_id']};EVENT_NAME=:{values['name']}"
            f";PAYLOAD=:{values['payload']};DELIVERY_TO=:{values['delivery_to']}"
            f";METADATA=:{values['metadata']}"
        )
        if values["payload_metadata"] is not None:
            text += f";PAYLOAD_METADATA=:{values['payload_metadata']}"
        return text

    big_reason = "r" * 150_000
    long_idem = "I" * 10_000
    own = f"EVENT_IDEM=:{idem};EVENT_NAME=:hostile/own"
    # (label, frame with CLIENT for the client id, expected reply prefix or "" for either)
    commands = [(label, pub(fields), "") for label, fields in absurd_publish_cases(sink)]
    for delay in ("-1", str(-(2**63)), str(2**62), str(2**63 - 1), "9" * 5000, "1e3", "86400001"):
        commands.append(
            (
                f"DEFER delay {delay[:20]}",
                f"DEFER;CLIENT_ID=:{CLIENT};{own};DELAY=:{delay}",
                "-FAIL:",
            )
        )
    for block in ("-1", "0", str(2**63 - 1), str(2**64), "9" * 5000, "-" + "9" * 30):
        commands += [
            (
                f"ACK block {block[:20]}",
                f"ACK;CLIENT_ID=:{CLIENT};EVENT_IDEM=:nope;BLOCK=:{block};EVENT_NAME=:x",
                "-FAIL:",
            ),
            (
                f"ROLLBACK block {block[:20]}",
                f"ROLLBACK;CLIENT_ID=:{CLIENT};EVENT_IDEM=:{idem};BLOCK=:{block}",
                "",
            ),
        ]
    commands += [
        (
            "DEFER 150 KB reason",
            f"DEFER;CLIENT_ID=:{CLIENT};{own};DELAY=:0;REASON=:{big_reason}",
            "",
        ),
        (
            "DISCARD 150 KB reason, 10 KB idem",
            f"DISCARD;CLIENT_ID=:{CLIENT};EVENT_IDEM=:{long_idem};REASON=:{big_reason}",
            "-FAIL:",
        ),
        (
            "PAUSE 150 KB reason",
            f"PAUSE;CLIENT_ID=:{CLIENT};EVENT_NAME=:hostile/own;REASON=:{big_reason}",
            "+PASS:",
        ),
        ("REPLAY 10 KB idem", f"REPLAY;CLIENT_ID=:{CLIENT};EVENT_IDEM=:{long_idem}", "-FAIL:"),
        ("EXTEND 10 KB idem", f"EXTEND;CLIENT_ID=:{CLIENT};EVENT_IDEM=:{long_idem}", "-FAIL:"),
        ("ACK 10 KB idem", f"ACK;CLIENT_ID=:{CLIENT};EVENT_IDEM=:{long_idem};BLOCK=:1", "-FAIL:"),
        ("SUB 10 KB name", f"SUB;CLIENT_ID=:{CLIENT};EVENT_NAME=:{'n' * 10_000}", "-FAIL:"),
        ("SUB 150 KB client id", f"SUB;CLIENT_ID=:{'c' * 150_000};EVENT_NAME=:n", "-FAIL:"),
        ("unknown 150 KB command", "X" * 150_000, "-FAIL:"),
        ("3,000 keys", "ACK" + f";CLIENT_ID=:{CLIENT}" * 3_000, "-FAIL:"),
        ("100,000 semicolons", f"ACK;CLIENT_ID=:{CLIENT};EVENT_IDEM=:a" + ";" * 100_000, "-FAIL:"),
    ]

    async def one(label: str, frame: str, expected: str) -> None:
        ws, client_id = await ws_conn(port, hostile)
        try:
            await ws.send_text(frame.replace(CLIENT, client_id))
            reply = await ws.next_text(10)
            if reply is None:
                closed = ws.close_received
                why = f"the engine closed the connection ({closed})" if closed else "silence"
                findings.violation(f"{label}: no reply but {why}")
                return
            if not reply.startswith(("+PASS:", "-FAIL:", "+REPLAY:")):
                findings.violation(f"{label}: unexpected reply {reply[:120]!r}")
            elif expected and not reply.startswith(expected):
                findings.violation(f"{label}: expected {expected}, got {reply[:160]!r}")
            if INTERNAL_ERROR in reply.lower():
                findings.violation(f"{label}: {reply[:160]!r}")
            if len(reply) > MAX_REPLY_CHARS:
                findings.violation(f"{label}: a {len(reply)}-character reply echoes the input")
            await ws.send_text(f"ACK;CLIENT_ID=:{client_id};EVENT_IDEM=:probe;BLOCK=:1")
            probe = await ws.next_text(10)
            if probe is None or not probe.startswith("-FAIL:"):
                findings.violation(f"{label}: connection unusable afterwards (probe got {probe!r})")
        finally:
            ws.abort()

    await bounded(8, [partial(one, *command) for command in commands])
    # A CONN with an absurd key.
    ws = await RawWebSocket.connect(port)
    try:
        await ws.send_text("CONN;ACCESS_KEY=:" + "k" * 150_000)
        reply = await ws.next_text()
        if reply is None or not reply.startswith("-FAIL:") or len(reply) > MAX_REPLY_CHARS:
            findings.violation(f"CONN with a 150 KB key: got {reply and reply[:160]!r}")
    finally:
        ws.abort()
    return findings


async def absurd_grpc_requests(arena: Arena) -> Findings:
    """The same absurdities over gRPC, plus int64 extremes in the integer fields."""
    findings = Findings()
    hostile, sink = arena.hostile, arena.sink
    stub = RawGrpc(arena.engine.grpc_port, fresh_connection=True)
    try:
        client_id = await grpc_conn(stub, hostile)
        own = await stub.call(
            "PublishMessage",
            pb.PublishMessageRequest(
                client_id=client_id,
                message_name="hostile/own",
                payload=valid_payload(hostile),
                delivery_to=hostile.app_id,
                metadata="{}",
            ),
        )
        assert own.success, own
        idem = str(own.response.message_idem)
        big = "r" * 300_000
        long_idem = "I" * 10_000
        # (method, label, request, "refused" if it must fail, else "")
        requests: list[tuple[str, str, bytes | ProtoMessage, str]] = []
        for label, fields in absurd_publish_cases(sink):
            values = _publish_fields(client_id, sink) | fields
            request = pb.PublishMessageRequest(
                client_id=values["client_id"] or "",
                message_name=values["name"] or "",
                payload=values["payload"] or "",
                delivery_to=values["delivery_to"] or "",
                metadata=values["metadata"] or "",
            )
            if values["payload_metadata"] is not None:
                request.payload_metadata = values["payload_metadata"]
            requests.append(("PublishMessage", label, request, ""))
        for delay in (-1, -(2**63), 2**62, 2**63 - 1, 86_400_001):
            requests.append(
                (
                    "DeferMessage",
                    f"delay_ms {delay}",
                    pb.DeferRequest(client_id=client_id, message_idem=idem, delay_ms=delay),
                    "refused",
                )
            )
        for priority in (-(2**31), 2**31 - 1):
            requests.append(
                (
                    "DeferMessage",
                    f"priority {priority}, 300 KB reason",
                    pb.DeferRequest(
                        client_id=client_id,
                        message_idem=idem,
                        delay_ms=0,
                        priority=priority,
                        reason=big,
                    ),
                    "",
                )
            )
        for block in (-1, 0, 2**63 - 1, -(2**63)):
            requests.append(
                (
                    "AcknowledgeMessage",
                    f"block {block}",
                    pb.AcknowledgeRequest(
                        client_id=client_id, message_idem="nope", partition_block=block
                    ),
                    "refused",
                )
            )
        requests += [
            ("Connect", "300 KB access key", pb.ConnectRequest(access_key=big), "refused"),
            ("Heartbeat", "300 KB client id", pb.HeartbeatRequest(client_id=big), "refused"),
            (
                "DiscardMessage",
                "10 KB idem, 300 KB reason",
                pb.DiscardRequest(client_id=client_id, message_idem=long_idem, reason=big),
                "refused",
            ),
            (
                "ReplayMessage",
                "10 KB idem",
                pb.ReplayRequest(client_id=client_id, message_idem=long_idem),
                "refused",
            ),
            (
                "ExtendMessage",
                "10 KB idem",
                pb.ExtendRequest(client_id=client_id, message_idem=long_idem),
                "refused",
            ),
            (
                "ReleaseMessage",
                "300 KB reason",
                pb.ReleaseRequest(client_id=client_id, message_idem=idem, reason=big),
                "",
            ),
            (
                "PauseMessages",
                "10 KB name, 300 KB reason",
                pb.PauseRequest(client_id=client_id, message_name="n" * 10_000, reason=big),
                "refused",
            ),
            (
                "PauseMessages",
                "300 KB reason",
                pb.PauseRequest(client_id=client_id, message_name="hostile/own", reason=big),
                "",
            ),
            (
                "Subscribe",
                "10 KB name",
                pb.SubscribeRequest(client_id=client_id, message_name="n" * 10_000),
                "refused",
            ),
            (
                "Unsubscribe",
                "10 KB name",
                pb.UnsubscribeRequest(client_id=client_id, message_name="n" * 10_000),
                "",
            ),
        ]
        for method, label, body, expect in requests:
            answer = await stub.call(method, body, label, timeout_s=10)
            if not refused_politely(answer):
                findings.violation(str(answer))
            elif expect == "refused" and answer.success:
                findings.violation(f"accepted: {answer}")
            if len(answer.text) > MAX_REPLY_CHARS:
                findings.violation(f"{method} [{label}]: a {len(answer.text)}-character answer")
            if lost := await session_lost(stub, client_id, answer):
                findings.violation(lost)
    finally:
        await stub.close()
    return findings


async def non_finite_metadata(arena: Arena) -> Findings:
    """NaN and Infinity are not JSON (RFC 8259), yet Python's json accepts them;
    1e999 is JSON, but Python reads it as inf and writes it back as Infinity.
    The engine must refuse the former and forward only strict JSON: official
    clients (Node's JSON.parse, Go's encoding/json) cannot read the rest."""
    findings = Findings()
    port = arena.engine.http_port
    hostile = arena.hostile
    ws, client_id = await ws_conn(port, hostile)
    stub = RawGrpc(arena.engine.grpc_port, fresh_connection=True)
    try:
        grpc_client = await grpc_conn(stub, hostile)
        for n, number in enumerate(("NaN", "Infinity", "-Infinity", "1e999", "-1e999")):
            name = f"hostile/number/{n}"
            metadata = f'{{"persist":true,"headers":{{}},"x":{number}}}'
            await ws.send_text(
                f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name};PAYLOAD=:{valid_payload(hostile)}"
                f";DELIVERY_TO=:{hostile.app_id};METADATA=:{metadata}"
            )
            reply = await ws.next_text()
            answer = await stub.call(
                "PublishMessage",
                pb.PublishMessageRequest(
                    client_id=grpc_client,
                    message_name=name,
                    payload=valid_payload(hostile),
                    delivery_to=hostile.app_id,
                    metadata=metadata,
                ),
                number,
            )
            strict_json = number.endswith("999")
            if not strict_json:
                if reply is None or not reply.startswith("-FAIL:"):
                    findings.violation(f"WS PUB with metadata {metadata}: accepted ({reply!r})")
                if answer.success:
                    findings.violation(f"gRPC publish with metadata {metadata}: accepted")
                continue
            # Valid JSON: whatever reaches a WebSocket subscriber must be strict JSON.
            await ws.send_text(f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name}")
            delivered: list[str] = []
            for _ in range(3):
                frame = await ws.next_text(2)
                if frame is None:
                    break
                if frame.startswith("+RECORD:"):
                    delivered.append(frame.removeprefix("+RECORD:"))
                if len(delivered) == 2:  # one from each publish
                    break
            for record in delivered:
                try:
                    json.loads(record, parse_constant=_reject_constant)
                except ValueError as exc:
                    findings.violation(
                        f"metadata {metadata} (valid JSON) reached a WebSocket subscriber as "
                        f"invalid JSON ({exc}): ...{record[-90:]}"
                    )
    finally:
        ws.abort()
        await stub.close()
    return findings


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
