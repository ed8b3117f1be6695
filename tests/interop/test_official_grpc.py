"""The official PyPI gRPC client (``ensync-sdk==0.4.4``, "P-grpc") against our
engine, with our SDK on the other side of every message.

The official client runs in a subprocess driver (see ``official_grpc.py``);
every effect it claims is checked against the engine's store. Its documented
bugs (PROTOCOL.md §6) are worked around in the driver, never in the engine.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ensync import EnSyncClient, EnSyncEngine, Message
from ensync.crypto import generate_keypair, seal
from ensync.protocol.headers import IDEMPOTENCY_HEADER
from ensync.server.core.apps import NewApp
from ensync.server.store.base import MessageState, StoredMessage
from ensync.testing import TestServer, run_engine
from tests.interop.official_grpc import ROOT, Subscribe, official_grpc_client
from tests.support.nats import jetstream_store
from tests.support.timing import eventually, seconds

pytestmark = pytest.mark.interop

ACK_DEADLINE_MS = 700
NAME = "orders/created"


def ours_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers as our SDK's caller set them: every SDK publish also carries the
    idempotency key (docs/protocol.md), which official clients pass through."""
    assert IDEMPOTENCY_HEADER in headers
    return {k: v for k, v in headers.items() if k != IDEMPOTENCY_HEADER}


@dataclass
class Setup:
    server: TestServer
    alice: NewApp
    bob: NewApp
    carol: NewApp
    engines: list[EnSyncEngine] = field(default_factory=list)

    async def ours(self, app: NewApp) -> EnSyncClient:
        """A client of our SDK for ``app``."""
        engine = EnSyncEngine(self.server.grpc_url)
        self.engines.append(engine)
        return await engine.create_client(app.app_key, app_secret_key=app.secret_key)

    async def stored(self, idem: str) -> StoredMessage:
        message = await self.server.engine.store.get(idem)
        assert message is not None, f"engine has no message {idem}"
        return message

    async def state_becomes(self, idem: str, state: MessageState) -> StoredMessage:
        seen: list[StoredMessage] = []

        async def poll() -> bool:
            seen[:] = [await self.stored(idem)]
            return seen[0].state is state

        deadline = time.monotonic() + seconds(5)
        while not await poll():
            assert time.monotonic() < deadline, f"{idem} stayed {seen[0].state.name}"
            await asyncio.sleep(0.02)
        return seen[0]


@pytest.fixture(params=["memory", "jetstream"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    # Every official-client test runs on one engine and on a node over NATS JetStream.
    store = "memory:" if request.param == "memory" else jetstream_store(tmp_path)
    async with run_engine(store, ack_deadline_ms=ACK_DEADLINE_MS) as server:
        state = Setup(
            server,
            await server.create_app("alice"),
            await server.create_app("bob"),
            await server.create_app("carol"),
        )
        try:
            yield state
        finally:
            for engine in state.engines:
                await engine.close()


async def deadline_control(setup: Setup, official: Any) -> str:
    """Positive control for "nothing came back after the ack deadline": a
    message the official client leaves unacked is delivered to it again;
    once it has been, the deadline has passed for every earlier one too."""
    alice = await setup.ours(setup.alice)
    seen = len(official.received)
    control = await alice.publish(NAME, [setup.bob.app_id], {"control": True})
    await official.next_message(seen + 2, timeout_s=seconds(5))
    return control


async def later_control(setup: Setup, official: Any) -> str:
    """Positive control for "nothing arrived twice": a message published
    afterwards arrives; a duplicate of an earlier one, on the same stream,
    would have arrived before it."""
    alice = await setup.ours(setup.alice)
    seen = len(official.received)
    control = await alice.publish(NAME, [setup.bob.app_id], {"control": True})
    await official.next_message(seen + 1, timeout_s=seconds(5))
    return control


def collector() -> tuple[list[Message], Callable[[Message], None]]:
    got: list[Message] = []
    return got, got.append


def test_the_official_client_is_installed() -> None:
    # Checked without importing it: its protobuf symbols would clash with ours.
    assert importlib.metadata.version("ensync-sdk") == "0.4.4"
    assert importlib.util.find_spec("ensync_sdk") is not None


async def test_official_publish_is_decrypted_by_our_subscriber(setup: Setup) -> None:
    bob = await setup.ours(setup.bob)
    got, handler = collector()
    (await bob.subscribe(NAME)).on(handler)
    payload = {"orderId": "o-1", "n": 2, "items": [{"sku": "a", "qty": 1.5}], "ok": True}
    async with official_grpc_client(setup.server, setup.alice) as alice:
        result = await alice.ok(
            "publish",
            name=NAME,
            recipients=[setup.bob.app_id],
            payload=payload,
            metadata={"persist": True, "headers": {"source": "p-grpc"}},
        )
        idem = result.value
        await eventually(lambda: len(got) == 1, what="our subscriber to get the message")
    message = got[0]
    assert message.idem == idem
    assert message.payload == payload
    assert message.sender == setup.alice.app_id
    assert message.message_name == NAME
    assert message.block == 1
    assert message.headers == {"source": "p-grpc"}
    stored = await setup.state_becomes(idem, MessageState.ACKED)  # our auto-ack
    assert stored.sender == setup.alice.app_id
    assert stored.recipient == setup.bob.app_id
    # The official client sends payload_metadata (field 6); the engine keeps it.
    assert stored.payload_metadata is not None
    assert json.loads(stored.payload_metadata)["byte_size"] > 0


async def test_official_multi_recipient_publish_is_decrypted_by_our_subscribers(
    setup: Setup,
) -> None:
    # Two recipients make the official client write its hybrid envelope (the
    # "ciphertext" dialect with hex map keys, PROTOCOL.md §4.3): one request
    # per recipient, idems joined by ",".
    bob, carol = await setup.ours(setup.bob), await setup.ours(setup.carol)
    bob_got, bob_handler = collector()
    carol_got, carol_handler = collector()
    (await bob.subscribe(NAME)).on(bob_handler)
    (await carol.subscribe(NAME)).on(carol_handler)
    async with official_grpc_client(setup.server, setup.alice) as alice:
        result = await alice.ok(
            "publish",
            name=NAME,
            recipients=[setup.bob.app_id, setup.carol.app_id],
            payload={"to": "both"},
        )
        bob_idem, carol_idem = str(result.value).split(",")
        await eventually(lambda: len(bob_got) == len(carol_got) == 1, what="both to decrypt")
    assert (bob_got[0].idem, carol_got[0].idem) == (bob_idem, carol_idem)
    assert bob_got[0].payload == carol_got[0].payload == {"to": "both"}
    assert bob_got[0].sender == carol_got[0].sender == setup.alice.app_id


async def test_official_subscriber_decrypts_our_publish_exactly_once(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_grpc_client(setup.server, setup.bob, [Subscribe(NAME)]) as bob:
        # "ready" means both Subscribe calls were started: wait until the
        # engine has both, so that the messages meet two open streams.
        sessions = setup.server.engine.sessions
        await eventually(lambda: len(getattr(sessions[bob.client_id].router, "streams", ())) == 2)
        first = await alice.publish(NAME, [setup.bob.app_id], {"i": 1}, {"headers": {"h": "v"}})
        second = await alice.publish(NAME, [setup.bob.app_id], {"i": 2, "s": "é✓"})
        await bob.next_message(2)
        # Auto-ack (the official default) reached the engine.
        await setup.state_becomes(first, MessageState.ACKED)
        await setup.state_becomes(second, MessageState.ACKED)
        # The client has two Subscribe streams for the name (decorator quirk):
        # the engine must use one, so nothing arrives twice.
        control = await later_control(setup, bob)
        received = list(bob.received)
    assert [(m.idem, m.block, m.payload) for m in received] == [
        (first, 1, {"i": 1}),
        (second, 2, {"i": 2, "s": "é✓"}),
        (control, 3, {"control": True}),
    ]
    assert {m.sender for m in received} == {setup.alice.app_id}
    assert {m.name for m in received} == {NAME}
    assert ours_headers(received[0].metadata["headers"]) == {"h": "v"}


async def test_official_ack_settles_the_message(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_grpc_client(
        setup.server, setup.bob, [Subscribe(NAME, auto_ack=False)]
    ) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": 1})
        message = await bob.next_message(1)
        assert message.idem == idem
        assert (await setup.stored(idem)).state is MessageState.PENDING
        await bob.ok("ack", name=NAME, idem=idem, block=message.block)
        assert (await setup.stored(idem)).state is MessageState.ACKED
        await bob.ok("ack", name=NAME, idem=idem, block=message.block)  # idempotent
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, control, control]
    assert setup.server.engine.stats.acked == 1


async def test_official_defer_redelivers_the_same_message_later(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_grpc_client(
        setup.server, setup.bob, [Subscribe(NAME, auto_ack=False)]
    ) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": 1})
        first = await bob.next_message(1)
        before_ms = time.time_ns() // 1_000_000
        started = time.monotonic()
        # 1000 ms is the smallest delay the official client accepts.
        result = await bob.ok("defer", name=NAME, idem=idem, delay_ms=1000, reason="busy")
        # The client raised after the engine answered success (PROTOCOL.md §6).
        assert result.quirk == "get_message_loop"
        stored = await setup.stored(idem)
        assert stored.state is MessageState.PENDING
        assert stored.visible_at_ms >= before_ms + 1000
        again = await bob.next_message(2, timeout_s=5)
        waited = time.monotonic() - started
        assert (again.idem, again.block, again.payload) == (idem, first.block, {"job": 1})
        assert waited >= 0.9, f"redelivered after {waited:.2f} s, before the 1 s delay"
        await bob.ok("ack", name=NAME, idem=idem, block=again.block)
        await setup.state_becomes(idem, MessageState.ACKED)
    assert setup.server.engine.stats.deferred == 1


async def test_official_discard_dead_letters_the_message(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_grpc_client(
        setup.server, setup.bob, [Subscribe(NAME, auto_ack=False)]
    ) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": "bad"})
        await bob.next_message(1)
        result = await bob.ok("discard", name=NAME, idem=idem, reason="bad job")
        assert result.quirk == "get_message_loop"  # raised after success, as for defer
        stored = await setup.stored(idem)
        assert stored.state is MessageState.DEAD
        assert stored.dead_reason == "discarded: bad job"
        dead = await setup.server.engine.store.list_dead(setup.bob.app_id, 10)
        assert [m.idem for m in dead] == [idem]
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, control, control]


async def test_official_replay_returns_the_decrypted_payload(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    payload = {"orderId": "o-7", "total": 12.5}
    async with official_grpc_client(setup.server, setup.bob, [Subscribe(NAME)]) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], payload)
        await bob.next_message(1)
        await setup.state_becomes(idem, MessageState.ACKED)
        # Acked messages stay replayable; the client decrypts message_data as
        # the bare payload (PROTOCOL.md §2.7).
        replayed = await bob.ok("replay", name=NAME, idem=idem)
        assert replayed.value == {"idem": idem, "messageName": NAME, "payload": payload}
        unknown = await bob.call("replay", name=NAME, idem="01AAAAAAAAAAAAAAAAAAAAAAAA")
        assert not unknown.ok
        assert "not found" in unknown.error
        # Another app's message is just as unknown to bob.
        carol = await setup.ours(setup.carol)
        (await carol.subscribe(NAME)).on(lambda _: None)
        foreign = await alice.publish(NAME, [setup.carol.app_id], {"for": "carol"})
        refused = await bob.call("replay", name=NAME, idem=foreign)
        assert not refused.ok
        assert "not found" in refused.error
    assert len(bob.received) == 1


async def test_official_pause_holds_messages_until_continue(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_grpc_client(setup.server, setup.bob, [Subscribe(NAME)]) as bob:
        await bob.ok("pause", name=NAME, reason="maintenance")
        idem = await alice.publish(NAME, [setup.bob.app_id], {"held": True})
        # Positive control: a message published afterwards, to a client of
        # ours, is delivered; the engine has looked at the held one by then.
        carol = await setup.ours(setup.carol)
        to_carol, collect = collector()
        (await carol.subscribe(NAME)).on(collect)
        await alice.publish(NAME, [setup.carol.app_id], {"control": True})
        await eventually(lambda: len(to_carol) == 1)
        await eventually(lambda: setup.server.engine.quiescent())
        assert bob.received == []
        held = await setup.stored(idem)
        assert held.state is MessageState.PENDING
        assert held.attempts == 0  # never delivered, not delivered and lost
        await bob.ok("continue", name=NAME)
        message = await bob.next_message(1)
        assert (message.idem, message.payload) == (idem, {"held": True})
        await setup.state_becomes(idem, MessageState.ACKED)


async def test_official_heartbeats_are_answered(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    beats: list[tuple[str, bool]] = []
    heartbeat = setup.server.engine.operations.heartbeat

    def spy(client_id: str) -> bool:
        alive = heartbeat(client_id)
        beats.append((client_id, alive))
        return alive

    monkeypatch.setattr(setup.server.engine.operations, "heartbeat", spy)
    async with official_grpc_client(setup.server, setup.bob, heartbeat_ms=150) as bob:
        # The client's loop would stop for good at its first failed call, and
        # a live client must be answered success=true (PROTOCOL.md §2.6).
        await eventually(lambda: len(beats) >= 3, what="three heartbeats")
        assert set(beats) == {(bob.client_id, True)}


async def test_official_publish_to_an_unknown_app_is_refused(setup: Setup) -> None:
    stranger = generate_keypair().app_id  # well formed, never registered
    async with official_grpc_client(setup.server, setup.alice) as alice:
        refused = await alice.call("publish", name=NAME, recipients=[stranger], payload={"a": 1})
        # A semantic refusal (success=false), not a gRPC status the client retries.
        assert not refused.ok
        assert refused.error_type == "EnSyncPublishError"
        assert f"recipient {stranger} is not a registered app" in refused.error
        assert "gRPC" not in refused.error
    assert setup.server.engine.stats.published == 0


async def test_official_client_with_a_wrong_key_is_refused(setup: Setup) -> None:
    async with official_grpc_client(
        setup.server, setup.bob, app_key="ensk_not-a-key", wait_ready=False
    ) as bob:
        # The driver must report and exit on its own (heartbeat task and all).
        await asyncio.wait_for(bob.process.wait(), seconds(10))
    assert bob.process.returncode == 1
    assert len(bob.fatal) == 1
    assert "Authentication failed" in bob.fatal[0]
    assert setup.server.engine.stats.rejected == 1


@pytest.mark.slow
async def test_official_client_with_a_thousand_publishes_in_flight_gets_every_one_answered(
    setup: Setup,
) -> None:
    # One connection, 1,000 calls at once: more than the engine's streams per
    # connection, so the client queues some; none may be refused.
    async with official_grpc_client(setup.server, setup.alice) as alice:
        result = await alice.ok(
            "publish_burst",
            timeout_s=30,
            name=NAME,
            recipients=[setup.bob.app_id],
            payload={"burst": True},
            count=1000,
        )
    assert result.value == {"answered": 1000, "failed": 0, "errors": []}
    assert setup.server.engine.stats.published == 1000
    assert (await setup.server.engine.store.backlog()) == {setup.bob.app_id: 1000}


@pytest.mark.slow
async def test_a_grpc_js_client_with_a_thousand_publishes_in_flight_gets_every_one_answered(
    setup: Setup,
) -> None:
    # The Node gRPC SDK is not on npm; grpc-js with our proto, as that SDK
    # loads it, stands in for it (same library, options and user agent).
    config = {
        "target": f"127.0.0.1:{setup.server.server.grpc_port}",
        "proto": str(ROOT / "proto" / "ensync.proto"),
        "app_key": setup.alice.app_key,
        "name": NAME,
        "recipient": setup.bob.app_id,
        "payload": seal(b'{"burst":true}', setup.bob.app_id),
        "metadata": '{"persist":true,"headers":{}}',
        "count": 1000,
    }
    process = await asyncio.create_subprocess_exec(
        "node",
        str(ROOT / "tests" / "interop" / "drivers" / "n_grpc_burst.js"),
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), seconds(30))
    assert process.returncode == 0, f"{out!r} {err[-2000:]!r}"
    assert json.loads(out) == {"answered": 1000, "failed": 0, "errors": []}
    assert setup.server.engine.stats.published == 1000
    assert (await setup.server.engine.store.backlog()) == {setup.bob.app_id: 1000}
