"""The official WebSocket clients against our engine's WebSocket endpoint, with
our SDK on the other side of every message.

* P-ws: PyPI ``ensync-sdk-ws==0.4.3`` - connect (and a refused key), publish,
  receive and redelivery, ack, defer, discard, replay, pause and continue,
  unsubscribe;
* N-ws-0018: npm ``ensync-client-sdk@0.0.18`` (``websocket.js``) - connect
  (and a refused key), publish, receive (live and backlog), ack (explicit and
  its auto-ack, which names no message).

Each official client runs in a subprocess driver (``official_ws.py``); every
effect it claims is checked against the engine's store. Our side is our SDK
over gRPC or over WebSocket (the basic flows run with both). The clients'
documented bugs (PROTOCOL.md §6) are worked around in the drivers, never in
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from ensync import EnSyncClient, Message
from ensync import EnSyncEngine as GrpcEngine
from ensync.client.engine import BaseEngine
from ensync.protocol.headers import IDEMPOTENCY_HEADER
from ensync.server.core.apps import NewApp
from ensync.server.store.base import MessageState, StoredMessage
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.interop.official_ws import (
    N_WS_0018,
    NODE_PROJECT,
    P_WS,
    WsSubscribe,
    official_ws_client,
)
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


UNKNOWN_IDEM = "01AAAAAAAAAAAAAAAAAAAAAAAA"
# Header values an unescaped ``;KEY=:value`` line cannot protect (PROTOCOL.md
# §3.4): the engine must still store the publisher's metadata unchanged.
TRICKY_HEADERS = {
    "x-tricky": 'semi;colon=:eq,comma "quoted"',
    "x-keys": "a;EVENT_NAME=:b;DELIVERY_TO=:c;PAYLOAD_METADATA=:{}",
}

Transport = Literal["grpc", "ws"]
OUR_TRANSPORTS = pytest.mark.parametrize("ours", ["grpc", "ws"], ids=["ours-grpc", "ours-ws"])


@dataclass
class Setup:
    server: TestServer
    alice: NewApp
    bob: NewApp
    carol: NewApp
    engines: list[BaseEngine] = field(default_factory=list)

    async def ours(self, app: NewApp, transport: Transport = "ws") -> EnSyncClient:
        """A client of our SDK for ``app`` over ``transport``."""
        engine: BaseEngine = (
            GrpcEngine(self.server.grpc_url)
            if transport == "grpc"
            else WsEngine(self.server.ws_url)
        )
        self.engines.append(engine)
        return await engine.create_client(app.app_key, app_secret_key=app.secret_key)

    async def stored(self, idem: str) -> StoredMessage:
        message = await self.server.engine.store.get(idem)
        assert message is not None, f"engine has no message {idem}"
        return message

    async def state_becomes(self, idem: str, state: MessageState) -> StoredMessage:
        deadline = time.monotonic() + seconds(5)
        while (message := await self.stored(idem)).state is not state:
            assert time.monotonic() < deadline, f"{idem} stayed {message.state.name}"
            await asyncio.sleep(0.02)
        return message


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
    afterwards arrives; a duplicate of an earlier one, on the same socket,
    would have arrived before it."""
    alice = await setup.ours(setup.alice)
    seen = len(official.received)
    control = await alice.publish(NAME, [setup.bob.app_id], {"control": True})
    await official.next_message(seen + 1, timeout_s=seconds(5))
    return control


async def elsewhere_control(setup: Setup) -> None:
    """Positive control for "held back": a message published afterwards to a
    client of ours arrives, and the engine has nothing left to do."""
    alice, carol = await setup.ours(setup.alice), await setup.ours(setup.carol)
    got: list[Message] = []
    (await carol.subscribe(NAME)).on(got.append)
    await alice.publish(NAME, [setup.carol.app_id], {"control": True})
    await eventually(lambda: len(got) == 1)
    await eventually(setup.server.engine.quiescent)


@contextlib.asynccontextmanager
async def engine_with_apps(
    ack_deadline_ms: int = ACK_DEADLINE_MS, store: str = "memory:"
) -> AsyncIterator[Setup]:
    """An engine with apps alice, bob and carol; closes our clients at the end."""
    async with run_engine(store, ack_deadline_ms=ack_deadline_ms) as server:
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


@pytest.fixture(params=["memory", "jetstream"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    # Every official-client test runs on one engine and on a node over NATS JetStream.
    store = "memory:" if request.param == "memory" else jetstream_store(tmp_path)
    async with engine_with_apps(store=store) as state:
        yield state


def collector() -> tuple[list[Message], Callable[[Message], None]]:
    got: list[Message] = []
    return got, got.append


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_the_official_ws_clients_are_installed() -> None:
    # Not imported here: the driver runs it in its own process.
    assert importlib.metadata.version("ensync-sdk-ws") == "0.4.3"
    assert importlib.util.find_spec("ensync_sdk_ws") is not None
    assert shutil.which("node") is not None, "node is not installed"
    package = NODE_PROJECT / "node_modules" / "ensync-client-sdk" / "package.json"
    assert package.is_file(), f"{package} is missing: run `npm ci` in {NODE_PROJECT}"
    assert json.loads(package.read_text())["version"] == "0.0.18"


# --------------------------------------------------------------------------- P-ws


@OUR_TRANSPORTS
async def test_p_ws_publish_is_decrypted_by_our_subscribers(setup: Setup, ours: Transport) -> None:
    bob, carol = await setup.ours(setup.bob, ours), await setup.ours(setup.carol, ours)
    bob_got, bob_handler = collector()
    carol_got, carol_handler = collector()
    (await bob.subscribe(NAME)).on(bob_handler)
    (await carol.subscribe(NAME)).on(carol_handler)
    payload = {"orderId": "o-1", "n": 2, "items": [{"sku": "a", "qty": 1.5}], "s": "é✓"}
    metadata = {"persist": True, "headers": TRICKY_HEADERS}
    async with official_ws_client(P_WS, setup.server, setup.alice) as alice:
        (idem,) = await alice.publish(NAME, [setup.bob.app_id], payload, metadata)
        # Two recipients: P-ws writes its hybrid envelope ("ciphertext" dialect,
        # PROTOCOL.md §4.3), one PUB per recipient, replies joined by ",".
        both = await alice.publish(NAME, [setup.bob.app_id, setup.carol.app_id], {"to": "both"})
        await eventually(lambda: len(bob_got) == 2 and len(carol_got) == 1, what="decryption")
    first = bob_got[0]
    assert (first.idem, first.block, first.message_name) == (idem, 1, NAME)
    assert first.payload == payload
    assert first.sender == setup.alice.app_id
    assert first.headers == TRICKY_HEADERS
    assert [bob_got[1].idem, carol_got[0].idem] == both
    assert bob_got[1].payload == carol_got[0].payload == {"to": "both"}
    stored = await setup.state_becomes(idem, MessageState.ACKED)  # our auto-ack
    assert (stored.sender, stored.recipient, stored.name) == (
        setup.alice.app_id,
        setup.bob.app_id,
        NAME,
    )
    # Unescaped metadata (P-ws writes it with ", " separators) arrived whole.
    assert json.loads(stored.metadata) == metadata
    await setup.state_becomes(both[0], MessageState.ACKED)
    await setup.state_becomes(both[1], MessageState.ACKED)


@OUR_TRANSPORTS
async def test_p_ws_decrypts_our_publish_and_gets_it_again_until_acked(
    setup: Setup, ours: Transport
) -> None:
    alice = await setup.ours(setup.alice, ours)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        before_ms = now_ms()
        idem = await alice.publish(
            NAME, [setup.bob.app_id], {"i": 1, "s": "é✓"}, {"headers": {"h": "v"}}
        )
        first = await bob.next_message(1)
        assert (first.name, first.idem, first.block, first.payload) == (
            NAME,
            idem,
            1,
            {"i": 1, "s": "é✓"},
        )
        assert first.sender == setup.alice.app_id
        assert first.metadata["persist"] is True
        assert ours_headers(first.metadata["headers"]) == {"h": "v"}
        # The record's block is a decimal string, loggedAt a number (§3.7).
        assert first.raw_block == "1"
        assert isinstance(first.timestamp, int)
        assert before_ms - 1_000 <= first.timestamp <= now_ms() + 1_000
        # Not acked (auto-ack is off): delivered again after the ack deadline.
        again = await bob.next_message(2, timeout_s=3)
        assert (again.idem, again.block, again.payload) == (idem, 1, {"i": 1, "s": "é✓"})
        assert setup.server.engine.stats.redelivered == 1
        await bob.ok("ack", name=NAME, idem=idem, block=again.raw_block)
        await setup.state_becomes(idem, MessageState.ACKED)
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, idem, control, control]


async def test_p_ws_ack_settles_the_message(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": 1})
        message = await bob.next_message(1)
        assert message.idem == idem
        assert (await setup.stored(idem)).state is MessageState.PENDING
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)
        assert (await setup.stored(idem)).state is MessageState.ACKED
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)  # idempotent
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, control, control]
    assert setup.server.engine.stats.acked == 1


async def test_p_ws_defer_redelivers_the_same_message_later(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": 1})
        first = await bob.next_message(1)
        before_ms = now_ms()
        started = time.monotonic()
        # 1000 ms is the smallest delay the official client accepts.
        result = await bob.ok("defer", name=NAME, idem=idem, delay_ms=1000, reason="busy")
        # The client raised after the engine answered +PASS (PROTOCOL.md §6).
        assert result.quirk == "get_message_loop"
        stored = await setup.stored(idem)
        assert stored.state is MessageState.PENDING
        assert stored.visible_at_ms >= before_ms + 1000
        again = await bob.next_message(2, timeout_s=5)
        waited = time.monotonic() - started
        assert (again.idem, again.block, again.payload) == (idem, first.block, {"job": 1})
        assert waited >= 0.9, f"redelivered after {waited:.2f} s, before the 1 s delay"
        await bob.ok("ack", name=NAME, idem=idem, block=again.raw_block)
        await setup.state_becomes(idem, MessageState.ACKED)
    assert setup.server.engine.stats.deferred == 1


async def test_p_ws_discard_dead_letters_the_message(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], {"job": "bad"})
        await bob.next_message(1)
        result = await bob.ok("discard", name=NAME, idem=idem, reason="bad; job=:x")
        assert result.quirk == "get_message_loop"  # raised after +PASS, as for defer
        stored = await setup.stored(idem)
        assert stored.state is MessageState.DEAD
        # REASON is the rest of the line, ";" and "=:" included (§3.4 rule 4).
        assert stored.dead_reason == "discarded: bad; job=:x"
        dead = await setup.server.engine.store.list_dead(setup.bob.app_id, 10)
        assert [m.idem for m in dead] == [idem]
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, control, control]
    assert setup.server.engine.stats.discarded == 1


async def test_p_ws_replay_returns_the_decrypted_message(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    payload = {"orderId": "o-7", "total": 12.5}
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        idem = await alice.publish(NAME, [setup.bob.app_id], payload, {"headers": {"k": "v"}})
        message = await bob.next_message(1)
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)
        await setup.state_becomes(idem, MessageState.ACKED)
        # Acked messages stay replayable; +REPLAY: carries a record (§3.5, §3.7).
        replayed = (await bob.ok("replay", name=NAME, idem=idem)).value
        assert isinstance(replayed, dict)
        assert replayed["idem"] == idem
        assert replayed["messageName"] == NAME
        assert replayed["payload"] == payload
        assert replayed["sender"] == setup.alice.app_id
        assert int(replayed["block"]) == 1
        assert ours_headers(replayed["metadata"]["headers"]) == {"k": "v"}
        unknown = await bob.call("replay", name=NAME, idem=UNKNOWN_IDEM)
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


async def test_p_ws_pause_holds_messages_until_continue(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        await bob.ok("pause", name=NAME, reason="maintenance")
        idem = await alice.publish(NAME, [setup.bob.app_id], {"held": True})
        await elsewhere_control(setup)
        assert bob.received == []
        held = await setup.stored(idem)
        assert held.state is MessageState.PENDING
        assert held.attempts == 0  # never delivered, not delivered and lost
        await bob.ok("continue", name=NAME)
        message = await bob.next_message(1)
        assert (message.idem, message.payload) == (idem, {"held": True})
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)
        await setup.state_becomes(idem, MessageState.ACKED)


async def test_p_ws_unsubscribe_stops_deliveries(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(P_WS, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        await bob.ok("unsubscribe", name=NAME)
        delivered = setup.server.engine.stats.delivered
        idem = await alice.publish(NAME, [setup.bob.app_id], {"after": "unsub"})
        await elsewhere_control(setup)
        # Checked at the engine: the client forgets its handlers on UNSUB, so
        # a delivery would not show up in ``received``. (One delivery: the control's.)
        assert setup.server.engine.stats.delivered == delivered + 1
        stored = await setup.stored(idem)
        assert (stored.state, stored.attempts) == (MessageState.PENDING, 0)
    assert bob.received == []


async def test_p_ws_with_a_wrong_key_is_refused(setup: Setup) -> None:
    async with official_ws_client(
        P_WS, setup.server, setup.bob, app_key="ensk_not-a-key", wait_ready=False
    ) as bob:
        # -FAIL: rejects create_client; the driver reports and exits on its own.
        await asyncio.wait_for(bob.process.wait(), seconds(10))
    assert bob.process.returncode == 1
    assert len(bob.fatal) == 1
    assert bob.fatal[0].startswith("EnSyncConnectionError")
    assert "app key is not valid" in bob.fatal[0]  # the -FAIL: text reached the user
    assert setup.server.engine.stats.rejected == 1


# ---------------------------------------------------------------------- N-ws-0018


@OUR_TRANSPORTS
async def test_n_ws_0018_publish_is_decrypted_by_our_subscribers(
    setup: Setup, ours: Transport
) -> None:
    bob, carol = await setup.ours(setup.bob, ours), await setup.ours(setup.carol, ours)
    bob_got, bob_handler = collector()
    carol_got, carol_handler = collector()
    (await bob.subscribe(NAME)).on(bob_handler)
    (await carol.subscribe(NAME)).on(carol_handler)
    payload = {"orderId": "o-2", "qty": 3, "price": 9.99, "tags": ["a"], "s": "é✓"}
    metadata = {"persist": True, "headers": TRICKY_HEADERS}
    async with official_ws_client(N_WS_0018, setup.server, setup.alice) as alice:
        (idem,) = await alice.publish(NAME, [setup.bob.app_id], payload, metadata)
        # Several recipients: one single envelope and one PUB each, in turn.
        both = await alice.publish(NAME, [setup.bob.app_id, setup.carol.app_id], {"to": "both"})
        await eventually(lambda: len(bob_got) == 2 and len(carol_got) == 1, what="decryption")
    first = bob_got[0]
    assert (first.idem, first.block, first.message_name) == (idem, 1, NAME)
    assert first.payload == payload
    assert first.sender == setup.alice.app_id
    assert first.headers == TRICKY_HEADERS
    assert [bob_got[1].idem, carol_got[0].idem] == both
    assert bob_got[1].payload == carol_got[0].payload == {"to": "both"}
    stored = await setup.state_becomes(idem, MessageState.ACKED)  # our auto-ack
    assert (stored.sender, stored.recipient) == (setup.alice.app_id, setup.bob.app_id)
    assert json.loads(stored.metadata) == metadata
    assert stored.payload_metadata is None  # this client sends none (§4.7)


async def test_n_ws_0018_publish_without_metadata_sends_its_default(setup: Setup) -> None:
    bob = await setup.ours(setup.bob)
    got, handler = collector()
    (await bob.subscribe(NAME)).on(handler)
    async with official_ws_client(N_WS_0018, setup.server, setup.alice) as alice:
        (idem,) = await alice.publish(NAME, [setup.bob.app_id], {"k": 1})
        await eventually(lambda: len(got) == 1, what="decryption")
    assert (got[0].idem, got[0].payload, got[0].headers) == (idem, {"k": 1}, {})
    stored = await setup.state_becomes(idem, MessageState.ACKED)
    assert json.loads(stored.metadata) == {"persist": True, "headers": {}}


@OUR_TRANSPORTS
async def test_n_ws_0018_decrypts_our_publish_and_acks_it(setup: Setup, ours: Transport) -> None:
    alice = await setup.ours(setup.alice, ours)
    async with official_ws_client(N_WS_0018, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        before_ms = now_ms()
        idem = await alice.publish(
            NAME, [setup.bob.app_id], {"i": 1, "s": "é✓"}, {"headers": {"h": "v"}}
        )
        message = await bob.next_message(1)
        # This client takes the idem from the record's "id" only (§3.7).
        assert (message.name, message.idem, message.block, message.payload) == (
            NAME,
            idem,
            1,
            {"i": 1, "s": "é✓"},
        )
        assert message.metadata["persist"] is True
        assert ours_headers(message.metadata["headers"]) == {"h": "v"}
        assert message.raw_block == "1"
        assert isinstance(message.timestamp, int)
        assert before_ms - 1_000 <= message.timestamp <= now_ms() + 1_000
        assert (await setup.stored(idem)).state is MessageState.PENDING
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)
        assert (await setup.stored(idem)).state is MessageState.ACKED
        await bob.ok("ack", name=NAME, idem=idem, block=message.raw_block)  # idempotent
        control = await deadline_control(setup, bob)
        assert [m.idem for m in bob.received] == [idem, control, control]
    assert setup.server.engine.stats.acked == 1


async def test_n_ws_0018_gets_its_backlog_through_redelivery(setup: Setup) -> None:
    alice = await setup.ours(setup.alice)
    # Published while bob has no client at all: they wait in the store.
    idems = [await alice.publish(NAME, [setup.bob.app_id], {"i": i}) for i in (1, 2)]
    async with official_ws_client(N_WS_0018, setup.server, setup.bob, [WsSubscribe(NAME)]) as bob:
        # Records pushed right after the SUB reply can reach this client before
        # it has attached a handler; it drops them unacked and the ack deadline
        # brings them back (PROTOCOL.md §3.8, §7.15).
        await eventually(
            lambda: {m.idem for m in bob.received} == set(idems),
            timeout_s=3 * ACK_DEADLINE_MS / 1000 + 2,
            what="the backlog at N-ws-0018",
        )
        firsts = {m.idem: m for m in reversed(bob.received)}
        for idem in idems:
            await bob.ok("ack", name=NAME, idem=idem, block=firsts[idem].raw_block)
            await setup.state_becomes(idem, MessageState.ACKED)
        assert [(firsts[i].block, firsts[i].payload) for i in idems] == [
            (1, {"i": 1}),
            (2, {"i": 2}),
        ]


async def test_n_ws_0018_rollback_hands_the_message_back_at_once() -> None:
    # A long ack deadline: a redelivery within the test can only be the rollback.
    async with engine_with_apps(ack_deadline_ms=30_000) as setup:
        alice = await setup.ours(setup.alice)
        async with official_ws_client(
            N_WS_0018, setup.server, setup.bob, [WsSubscribe(NAME)]
        ) as bob:
            idem = await alice.publish(NAME, [setup.bob.app_id], {"job": 1})
            first = await bob.next_message(1)
            await bob.ok("rollback", name=NAME, idem=idem, block=first.raw_block)
            again = await bob.next_message(2)
            assert (again.idem, again.block, again.payload) == (idem, 1, {"job": 1})
            assert (await setup.stored(idem)).state is MessageState.PENDING
            await bob.ok("ack", name=NAME, idem=idem, block=again.raw_block)
            await setup.state_becomes(idem, MessageState.ACKED)
        assert setup.server.engine.stats.redelivered == 1


async def test_n_ws_0018_auto_ack_with_an_undefined_name_settles_the_message(
    setup: Setup,
) -> None:
    alice = await setup.ours(setup.alice)
    async with official_ws_client(
        N_WS_0018, setup.server, setup.bob, [WsSubscribe(NAME, auto_ack=True)]
    ) as bob:
        # One at a time: two auto-acks in the same millisecond would collide in
        # the client's request map (§3.8) - harmless on the wire, but noisy.
        idems = [await alice.publish(NAME, [setup.bob.app_id], {"i": 1})]
        await bob.next_message(1)
        idems.append(await alice.publish(NAME, [setup.bob.app_id], {"i": 2}))
        await bob.next_message(2)
        # Its auto-ack sends EVENT_NAME=:undefined: acks go by idem alone (§5).
        for idem in idems:
            await setup.state_becomes(idem, MessageState.ACKED)
        control = await later_control(setup, bob)
        assert [(m.idem, m.payload) for m in bob.received] == [
            (idems[0], {"i": 1}),
            (idems[1], {"i": 2}),
            (control, {"control": True}),
        ]
    await eventually(lambda: setup.server.engine.stats.acked == 3)


async def test_n_ws_0018_with_a_wrong_key_is_refused(setup: Setup) -> None:
    async with official_ws_client(
        N_WS_0018, setup.server, setup.bob, app_key="ensk_not-a-key", wait_ready=False
    ) as bob:
        await asyncio.wait_for(bob.process.wait(), seconds(10))
    assert bob.process.returncode == 1
    assert len(bob.fatal) == 1
    assert bob.fatal[0].startswith("EnSyncError")
    assert "app key is not valid" in bob.fatal[0]  # the -FAIL: text reached the user
    assert setup.server.engine.stats.rejected == 1
