"""What every hostile attack shares: its findings, client set-up, and limits.

An attack function takes a running :class:`~tests.hostile.harness.Arena`
and returns :class:`Findings`: the *violations* it saw in the engine's
answers (a hang, a status that clients retry, ``internal error``, a dropped
connection where the protocol keeps it open) and notes for the report. The
arena's own checks (alive, steady traffic, leaks, tracebacks) come
afterwards in the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ensync._proto import ensync_pb2 as pb
from ensync.crypto import seal
from tests.faults.engine_process import AppKeys
from tests.hostile.harness import Arena
from tests.hostile.rawgrpc import METHODS, RETRIED_BY_CLIENTS, Answer, RawGrpc
from tests.hostile.wire import PREFACE, RawSocket, RawWebSocket

__all__ = [
    "CLIENT",
    "INTERNAL_ERROR",
    "MAX_REPLY_CHARS",
    "Findings",
    "bounded",
    "grpc_conn",
    "refused_politely",
    "session_lost",
    "touch_hostile_paths",
    "valid_payload",
    "ws_conn",
]

INTERNAL_ERROR = "internal error"
# Stands for the connection's client id in frames written before it is known.
CLIENT = "\x00client\x00"
# A refusal that echoes a huge input back would turn the engine into an amplifier.
MAX_REPLY_CHARS = 4096


@dataclass
class Findings:
    """Violations seen by an attack, and notes for the report."""

    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def violation(self, text: str) -> None:
        self.violations.append(text)

    def __str__(self) -> str:
        shown = self.violations[:25]
        more = len(self.violations) - len(shown)
        return "\n".join(shown) + (f"\n... and {more} more" if more > 0 else "")


async def bounded(limit: int, jobs: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` with at most ``limit`` at a time."""
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(run(job) for job in jobs))


def valid_payload(recipient: AppKeys) -> str:
    return seal(b'{"hostile":true}', recipient.app_id)


# ---------------------------------------------------------------------------
# set-up helpers


async def ws_conn(port: int, app: AppKeys) -> tuple[RawWebSocket, str]:
    """A raw WebSocket with an accepted CONN: ``(socket, client id)``."""
    ws = await RawWebSocket.connect(port)
    await ws.send_text(f"CONN;ACCESS_KEY=:{app.app_key}")
    reply = await ws.next_text()
    assert reply is not None, "no answer to CONN"
    assert reply.startswith("+PASS:{clientId="), reply
    return ws, reply.split("clientId=", 1)[1].split(",", 1)[0].rstrip("}")


async def grpc_conn(stub: RawGrpc, app: AppKeys) -> str:
    answer = await stub.call("Connect", pb.ConnectRequest(access_key=app.app_key))
    assert answer.success, answer
    return str(answer.response.client_id)


async def touch_hostile_paths(arena: Arena) -> None:
    """Exercise each attacked path once before the baseline is taken, leaving
    no session behind (so nothing needs to expire)."""
    engine = arena.engine
    for _ in range(5):
        ws, client_id = await ws_conn(engine.http_port, arena.hostile)
        await ws.send_text(f"ACK;CLIENT_ID=:{client_id};EVENT_IDEM=:x;BLOCK=:1")
        await ws.next_text()
        ws.abort()
    stub = RawGrpc(engine.grpc_port, fresh_connection=True)
    try:
        for method in METHODS:
            await stub.call(method, b"\x0a\x04nope", timeout_s=1)
    finally:
        await stub.close()
    sock = await RawSocket.open(engine.grpc_port)
    await sock.send(PREFACE + b"garbage")
    sock.abort()


def refused_politely(answer: Answer) -> bool:
    """A status the clients do not retry, or an OK response (``success=false`` or not)."""
    return answer.code not in RETRIED_BY_CLIENTS and INTERNAL_ERROR not in answer.text.lower()


async def session_lost(stub: RawGrpc, client_id: str, after: Answer) -> str | None:
    """Whether the engine still knows ``client_id`` (a Heartbeat, which also
    keeps the session from expiring while undecodable requests never reach
    the engine); a violation naming the request just answered if not."""
    alive = await stub.call("Heartbeat", pb.HeartbeatRequest(client_id=client_id))
    return None if alive.success else f"the client's session was lost after {after}: {alive}"
