"""Hostile input against a live engine process, over both transports (DESIGN.md §6-7).

Every test starts its own ``ensync serve`` (sqlite store, 2 s session
timeout, 64 KiB payload limit) with two well-behaved publisher/subscriber
pairs of our SDK running beside the attack, then checks that the engine
came through: alive and answering ``/healthz``, every confirmed steady
publish delivered, the attackers' sessions gone, memory and descriptors back
near the baseline, no traceback in its log (:meth:`Arena.verify`), and that
each hostile input got a sane answer (the attack's *violations*).

``ENSYNC_HOSTILE_SEED`` fixes the random bytes of the garbage tests.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ensync import EnSyncEngine as GrpcEngine
from ensync import EnSyncError
from ensync.server.config import EngineConfig
from ensync.websocket import EnSyncEngine as WsEngine
from tests.hostile import absurd, garbage, load, malformed
from tests.hostile.common import Findings
from tests.hostile.harness import Arena, LoggedTraceback, grpc_decode_error
from tests.hostile.rawgrpc import decodes
from tests.support.timing import seconds

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ENSYNC_HOSTILE_SEED", str(random.randrange(1 << 32))))


def _nothing(traceback: LoggedTraceback) -> bool:
    return False


async def conclude(
    arena: Arena,
    findings: Findings,
    tolerate: Callable[[LoggedTraceback], bool] = _nothing,
    *,
    steady_reconnects_allowed: bool = False,
) -> None:
    """Run the arena's checks, then fail with everything that went wrong."""
    problems: list[str] = []
    if findings.violations:
        problems.append(f"{len(findings.violations)} bad answer(s) to hostile input:\n{findings}")
    try:
        await arena.verify(tolerate=tolerate, steady_reconnects_allowed=steady_reconnects_allowed)
    except AssertionError as exc:
        problems.append(f"engine checks:\n{exc}")
    notes = "\n".join(findings.notes + arena.notes)
    print(notes)  # shown with -rP: what the attack did and how the engine fared
    assert not problems, f"seed {SEED}\n" + "\n".join(problems) + f"\nnotes:\n{notes}"


@pytest.mark.timeout(seconds(60))
async def test_random_bytes_on_both_ports(arena: Arena) -> None:
    """Raw TCP garbage on both ports, behind a valid HTTP/2 preface, and behind
    a valid WebSocket handshake."""
    findings = await garbage.garbage_bytes(arena, random.Random(SEED))
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
async def test_grpc_frames_oversized_truncated_and_cut(arena: Arena) -> None:
    """Messages over the limit, lying length prefixes, cut HTTP/2 frames,
    CONTINUATION flood."""
    findings = await garbage.grpc_frame_abuse(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
@pytest.mark.parametrize("method", ["NoSuchMethod", "PublishMessage", "Subscribe"])
async def test_grpc_rapid_reset_leaves_other_clients_alone(arena: Arena, method: str) -> None:
    """Streams opened and reset at once, thousands on one connection: the
    well-behaved clients on their own connections must not notice (their
    calls cancelled, their sessions lost)."""
    findings = await load.grpc_rapid_reset(arena, method)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
async def test_websocket_frames_oversized_truncated_and_cut(arena: Arena) -> None:
    """Frames over the limit (1009), lying lengths, protocol violations, frames
    cut mid-way and the socket dropped, with and without a session."""
    findings = await garbage.ws_frame_abuse(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
async def test_malformed_protobuf_is_survived(arena: Arena) -> None:
    """Bytes that are not the request type (random, wrong wire types, huge
    lengths, deep groups, invalid UTF-8) to every method: each call is answered
    promptly with a status clients do not retry, and nothing breaks.

    grpcio's own log of an undecodable request is tolerated here; whether the
    engine should produce it is the next test's business."""
    bodies = malformed.malformed_bodies(random.Random(SEED))
    findings, _ = await malformed.malformed_protobuf(arena, bodies)
    await conclude(arena, findings, tolerate=grpc_decode_error)


@pytest.mark.timeout(seconds(60))
async def test_malformed_protobuf_is_refused_as_invalid_argument(arena: Arena) -> None:
    """An undecodable request is the client's fault: INVALID_ARGUMENT with a
    clear reason (PROTOCOL.md §2.3, DESIGN.md §7), and no traceback in the
    engine's log per request (which would let anyone flood the log)."""
    bodies = {
        label: body
        for label, body in malformed.malformed_bodies(random.Random(SEED)).items()
        if not decodes("Connect", body)
    }
    methods = ("Connect", "PublishMessage", "AcknowledgeEvent", "Subscribe")
    _, answers = await malformed.malformed_protobuf(arena, bodies, methods)
    undecodable = [a for a in answers if not decodes(a.method, bodies[a.label])]
    assert undecodable, "no undecodable body was sent"
    await conclude(arena, malformed.strict_refusals(undecodable))


@pytest.mark.timeout(seconds(60))
async def test_invalid_utf8_in_protobuf_strings_and_websocket_text(arena: Arena) -> None:
    """Invalid UTF-8 in every string field of real gRPC requests, and in
    WebSocket text frames whole or split across fragments (close 1007)."""
    findings = await malformed.invalid_utf8_grpc(arena)
    ws_findings = await malformed.invalid_utf8_ws(arena)
    findings.violations += ws_findings.violations
    await conclude(arena, findings, tolerate=grpc_decode_error)


@pytest.mark.timeout(seconds(60))
async def test_absurd_numbers_and_sizes_over_websocket(arena: Arena) -> None:
    """Negative and huge delays and blocks, 2**63-1 TTLs, 150 KB reasons and
    metadata, 100,000-level JSON, 10 KB idems: refused or accepted with a
    clear answer, never ``internal error``, the connection kept."""
    findings = await absurd.absurd_ws_commands(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
async def test_absurd_numbers_and_sizes_over_grpc(arena: Arena) -> None:
    """The same absurdities over gRPC, plus int64 and int32 extremes."""
    findings = await absurd.absurd_grpc_requests(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(60))
async def test_non_finite_numbers_never_reach_subscribers_as_invalid_json(arena: Arena) -> None:
    """NaN / Infinity in metadata are refused; a valid 1e999 is forwarded as
    strict JSON (official clients cannot parse anything else)."""
    findings = await absurd.non_finite_metadata(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(120))
async def test_thousands_of_connections_opened_and_dropped(arena: Arena) -> None:
    """2,000 WebSocket CONN + abrupt close, 1,000 gRPC channels that Connect
    and vanish, 200 idle connections: afterwards every session is collected
    and memory and descriptors are back near the baseline."""
    findings = await load.churn_connections(arena)
    await conclude(arena, findings)


@pytest.mark.timeout(seconds(90))
async def test_flood_from_one_app(arena: Arena) -> None:
    """One app publishes as fast as it can for 4 s over both transports while
    the steady pairs keep going: every confirmed steady publish arrives.

    The flood delays other clients' gRPC calls, heartbeats included, by
    seconds (there is no per-app fairness yet), which with this test's 2 s
    session timeout can expire the steady gRPC publisher's session; the SDK
    heals that without losing a message, so it is noted, not failed."""
    findings = await load.flood_from_one_app(arena)
    await conclude(arena, findings, steady_reconnects_allowed=True)


# The engine's default handshake deadline (ensync serve --handshake-timeout-ms).
HANDSHAKE_S = EngineConfig().handshake_timeout_ms / 1000
ENGINE_OPEN_FILES = 1024
FLOOD = 1200


@pytest.mark.timeout(seconds(120))
async def test_a_connection_flood_holds_no_descriptors_the_clients_need(tmp_path: Path) -> None:
    """With 1,024 open files, 1,200 silent gRPC connections and 1,200
    unfinished HTTP requests from one address: the steady pairs lose nothing
    and each publish is answered within 1 s, the flood is closed within the
    handshake deadline, the log stays short, and new clients connect at once
    afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * FLOOD + 512  # this process holds the flood's ends
    if soft < wanted:
        assert hard >= wanted, f"the test needs {wanted} open files here; the hard limit is {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    arena = await Arena.open(tmp_path, open_files=ENGINE_OPEN_FILES)
    try:
        await arena.take_baseline()
        flood = await load.connection_flood(arena, FLOOD)
        findings = Findings()
        for kind, lifetimes in sorted(flood.lifetimes_s.items()):
            findings.notes.append(
                f"{kind}: {len(lifetimes)} closed, {sum(t < 0.5 for t in lifetimes)} at once,"
                f" the last after {max(lifetimes):.1f} s"
            )
            late = [t for t in lifetimes if t > HANDSHAKE_S + 2]
            if late:
                findings.violation(f"{len(late)} {kind} connections lived past the deadline")
        if len(flood.log_lines) >= 100:
            findings.violation(f"the flood wrote {len(flood.log_lines)} log lines")
        findings.notes += [line[:200] for line in flood.log_lines[:10]]
        slowest = max(arena.steady.latencies_s)
        if slowest >= 1.0:
            findings.violation(f"a steady publish took {slowest:.2f} s")
        for make in (GrpcEngine, WsEngine):
            sdk = make(arena.engine.grpc_url if make is GrpcEngine else arena.engine.ws_url)
            started = time.monotonic()
            try:
                await asyncio.wait_for(sdk.create_client(arena.hostile.app_key), 1.0)
            except (TimeoutError, EnSyncError) as exc:
                findings.violation(f"a new {make.__module__} client could not connect: {exc!r}")
            else:
                findings.notes.append(f"new client in {time.monotonic() - started:.3f} s")
            finally:
                await sdk.close()
        await conclude(arena, findings)
    finally:
        await arena.close()
