"""Every SDK verb through a real engine, once per transport.

Over loopback for the network transports, and once more over the in-memory
transport of ``ensync.testing`` (the engine in this process, no socket).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import pydantic
import pytest

from ensync import (
    EnSyncAuthError,
    EnSyncConnectionError,
    EnSyncEngine,
    EnSyncError,
    EnSyncReplayError,
    EnSyncSubscriptionError,
    EnSyncValidationError,
    Message,
)
from ensync.client.engine import BaseEngine
from ensync.server.core.calls import Settle, SettleKind
from ensync.server.runtime.engine import Engine
from ensync.server.store.base import StoredMessage
from ensync.server.store.memory import MemoryStore
from ensync.testing import MemoryEngine, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.conformance.sdk_setup import Setup, collector
from tests.support.timing import eventually, seconds


async def test_publish_and_receive_with_a_handler(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("orders/created")
    got, handler = collector()
    sub.on(handler)
    idem = await alice.publish(
        "orders/created", [setup.bob.app_id], {"orderId": "o-1", "n": 2}, {"headers": {"k": "v"}}
    )
    await eventually(lambda: len(got) == 1)
    message = got[0]
    assert message.idem == idem
    assert message.message_name == "orders/created"
    assert message.payload == {"orderId": "o-1", "n": 2}
    assert message.sender == setup.alice.app_id
    assert message.block == 1
    assert message.headers["k"] == "v"
    assert len(message.headers["ensync-idempotency-key"]) >= 16
    assert message.metadata["persist"] is True
    assert isinstance(message.timestamp, int)
    # auto_ack (the default) acked it once the handler returned.
    await eventually(lambda: setup.server.engine.stats.acked == 1)
    replay = await sub.replay(idem)
    assert replay.replay_info is not None
    assert replay.replay_info.was_acknowledged
    assert replay.payload == message.payload


async def test_several_recipients_get_comma_joined_idems(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    a_got, a_handler = collector()
    b_got, b_handler = collector()
    (await alice.subscribe("news")).on(a_handler)
    (await bob.subscribe("news")).on(b_handler)
    for hybrid in (False, True):
        joined = await alice.publish(
            "news", [setup.bob.app_id, setup.alice.app_id], {"h": hybrid}, hybrid=hybrid
        )
        bob_idem, alice_idem = joined.split(",")
        await eventually(lambda h=hybrid: len(a_got) == len(b_got) == 1 + h)  # type: ignore[misc]
        assert b_got[-1].idem == bob_idem
        assert a_got[-1].idem == alice_idem
        assert a_got[-1].payload == b_got[-1].payload == {"h": hybrid}


async def test_sync_and_async_handlers_and_the_remover(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    sync_got, sync_handler = collector()
    async_got: list[Message] = []

    async def async_handler(message: Message) -> None:
        await asyncio.sleep(0)
        async_got.append(message)

    acks: list[str] = []
    ops = setup.server.engine.operations
    real_settle = ops.settle

    # Every transport's acks pass through the operations' settle.
    def counting_settle(calls: Sequence[Settle]) -> list[asyncio.Future[int | None]]:
        acks.extend(call.idem for call in calls if call.kind is SettleKind.ACK)
        return real_settle(calls)

    ops.settle = counting_settle  # type: ignore[method-assign]
    remove = sub.on(sync_handler)
    sub.on(async_handler)
    first = await alice.publish("x", [setup.bob.app_id], {"i": 1})
    await eventually(lambda: len(sync_got) == len(async_got) == 1)
    remove()
    second = await alice.publish("x", [setup.bob.app_id], {"i": 2})
    await eventually(lambda: len(async_got) == 2)
    assert len(sync_got) == 1
    # Positive control: a third message's ack has arrived, so every ack the
    # first two would get (handled before it, in order) has arrived too.
    third = await alice.publish("x", [setup.bob.app_id], {"i": 3})
    await eventually(lambda: third in acks)
    # Acked once per message, not once per handler.
    assert acks == [first, second, third]


async def test_handlers_and_iteration_on_one_subscription_are_refused(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    handled = await bob.subscribe("handled")
    handled.on(lambda message: None)
    with pytest.raises(EnSyncSubscriptionError, match="not both"):
        async for _ in handled:
            pass
    iterated = await bob.subscribe("iterated")
    started = asyncio.Event()

    async def iterate() -> None:
        started.set()
        async for _ in iterated:
            pass

    task = asyncio.get_running_loop().create_task(iterate())
    await started.wait()
    await asyncio.sleep(0)
    with pytest.raises(EnSyncSubscriptionError, match="not both"):
        iterated.on(lambda message: None)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_async_iteration_acks_after_the_loop_body(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    for i in range(3):
        await alice.publish("x", [setup.bob.app_id], {"i": i})
    seen = []
    async for message in sub:
        seen.append(message.payload["i"])
        if len(seen) == 3:
            break
    assert seen == [0, 1, 2]
    # The first two bodies finished (acked); the third was left by `break`.
    await eventually(lambda: setup.server.engine.stats.acked == 2)


async def test_a_failing_handler_leaves_the_message_unacked_and_reports(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob_engine = setup.make_engine()
    setup.engines.append(bob_engine)
    errors: list[EnSyncError] = []
    bob_engine.on("error", errors.append)
    bob = await bob_engine.create_client(setup.bob.app_key, app_secret_key=setup.bob.secret_key)
    sub = await bob.subscribe("x")
    attempts: list[Message] = []

    def flaky(message: Message) -> None:
        attempts.append(message)
        if len(attempts) == 1:
            raise RuntimeError("database down")

    sub.on(flaky)
    idem = await alice.publish("x", [setup.bob.app_id], {"i": 1})
    # Redelivered after the 600 ms ack deadline, then handled and acked.
    await eventually(lambda: len(attempts) == 2, timeout_s=5)
    assert [m.idem for m in attempts] == [idem, idem]
    assert len(errors) == 1
    assert "database down" in str(errors[0])
    await eventually(lambda: setup.server.engine.stats.acked == 1)


async def test_manual_ack_defer_discard_and_replay(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs", auto_ack=False)
    got, handler = collector()
    sub.on(handler)
    first = await alice.publish("jobs", [setup.bob.app_id], {"job": 1})
    await eventually(lambda: len(got) == 1)
    when = await sub.defer(first, 200, "busy")
    assert isinstance(when, int)
    await eventually(lambda: len(got) == 2, timeout_s=3)
    assert got[1].idem == first
    await sub.ack(got[1].idem, got[1].block)
    await sub.ack(got[1].idem, got[1].block)  # idempotent

    second = await alice.publish("jobs", [setup.bob.app_id], {"job": 2})
    await eventually(lambda: len(got) == 3)
    await sub.discard(second, "bad job")
    replay = await sub.replay(second)
    assert replay.payload == {"job": 2}
    assert replay.replay_info is not None
    assert not replay.replay_info.was_acknowledged
    dead = await setup.server.engine.store.list_dead(setup.bob.app_id, 10)
    assert [m.dead_reason for m in dead] == ["discarded: bad job"]
    # Positive control: an unsettled message comes back after the ack
    # deadline; by then the acked and the discarded one would have too.
    control = await alice.publish("jobs", [setup.bob.app_id], {"job": 3})
    await eventually(lambda: [m.idem for m in got].count(control) == 2, timeout_s=5)
    assert [m.idem for m in got] == [first, first, second, control, control]


async def test_pause_and_resume(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    got, handler = collector()
    sub.on(handler)
    control, control_handler = collector()
    (await bob.subscribe("control")).on(control_handler)
    await sub.pause("maintenance")
    await alice.publish("x", [setup.bob.app_id], {"i": 1})
    # Positive control: a later message to the same client arrives.
    await alice.publish("control", [setup.bob.app_id], {"i": 2})
    await eventually(lambda: len(control) == 1)
    assert got == []
    await sub.resume()
    await eventually(lambda: len(got) == 1)


async def test_unsubscribe_stops_deliveries(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    got, handler = collector()
    sub.on(handler)
    control, control_handler = collector()
    (await bob.subscribe("control")).on(control_handler)
    await sub.unsubscribe()
    await alice.publish("x", [setup.bob.app_id], {"i": 1})
    # Positive control: a later message to the same client arrives.
    await alice.publish("control", [setup.bob.app_id], {"i": 2})
    await eventually(lambda: len(control) == 1)
    assert got == []
    again = await bob.subscribe("x")
    again.on(handler)
    await eventually(lambda: len(got) == 1)


async def test_subscribing_twice_to_a_name_is_refused(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    await bob.subscribe("x")
    with pytest.raises(EnSyncSubscriptionError) as caught:
        await bob.subscribe("x")
    assert caught.value.name == "EnSyncSubscriptionError"


async def test_replay_of_unknown_idem_is_not_found(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    with pytest.raises(EnSyncReplayError) as caught:
        await sub.replay("01AAAAAAAAAAAAAAAAAAAAAAAA")
    assert "not found" in caught.value.message
    assert caught.value.name == "EnSyncReplayError"


@pytest.mark.parametrize(
    ("name", "recipients", "payload", "metadata", "words"),
    [
        ("bad name;", None, {"a": 1}, None, "malformed message name"),
        ("x", [], {"a": 1}, None, "recipients is empty"),
        ("x", "not-a-list", {"a": 1}, None, "list of app ids"),
        ("x", ["nope"], {"a": 1}, None, "not an app id"),
        ("x", ["A" * 43 + "="] * 1001, {"a": 1}, None, "limit of 1000"),
        ("x", None, [1, 2], None, "JSON object"),
        ("x", None, {"a": object()}, None, "not JSON-serialisable"),
        ("x", None, {"a": 1}, {"persist": "yes"}, "persist"),
        ("x", None, {"a": 1}, {"headers": {"a": 1}}, "headers"),
    ],
)
async def test_publish_validation_errors(
    setup: Setup,
    name: str,
    recipients: object,
    payload: object,
    metadata: object,
    words: str,
) -> None:
    alice = await setup.connect(setup.alice)
    targets = [setup.bob.app_id] if recipients is None else recipients
    with pytest.raises(EnSyncValidationError) as caught:
        await alice.publish(name, targets, payload, metadata)  # type: ignore[arg-type]
    assert words in caught.value.message
    assert caught.value.name == "EnSyncValidationError"


async def test_defer_validation(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("x")
    for delay in (-1, 86_400_001):
        with pytest.raises(EnSyncValidationError):
            await sub.defer("01AAAAAAAAAAAAAAAAAAAAAAAA", delay)


async def test_wrong_key_and_missing_engine(setup: Setup) -> None:
    engine = setup.make_engine()
    setup.engines.append(engine)
    with pytest.raises(EnSyncAuthError) as caught:
        await engine.create_client("ensk_not-a-key")
    assert caught.value.name == "EnSyncAuthError"
    await setup.server.engine.apps.revoke("bob")
    with pytest.raises(EnSyncAuthError):
        await engine.create_client(setup.bob.app_key)
    nowhere: BaseEngine
    if setup.transport == "memory":
        # In memory, "no engine there" is a core that is not running.
        nowhere = MemoryEngine(Engine(MemoryStore()), call_timeout=2000)
    elif isinstance(engine, WsEngine):
        nowhere = WsEngine("ws://127.0.0.1:1", call_timeout=2000)
    else:
        nowhere = EnSyncEngine("grpc://127.0.0.1:1", call_timeout=2000)
    with pytest.raises(EnSyncConnectionError) as failed:
        await nowhere.create_client(setup.alice.app_key)
    assert failed.value.name in ("EnSyncConnectionError", "EnSyncTimeoutError")


async def test_close_and_async_with(setup: Setup) -> None:
    engine = setup.make_engine()
    setup.engines.append(engine)
    async with await engine.create_client(
        setup.alice.app_key, app_secret_key=setup.alice.secret_key
    ) as client:
        await client.subscribe("x")
    with pytest.raises(EnSyncConnectionError):
        await client.publish("x", [setup.bob.app_id], {"a": 1})
    other = await engine.create_client(setup.alice.app_key)
    await other.close(True)
    with pytest.raises(EnSyncConnectionError):
        await engine.create_client(setup.alice.app_key)


async def test_subscribe_needs_a_secret_key(setup: Setup) -> None:
    engine = setup.make_engine()
    setup.engines.append(engine)
    client = await engine.create_client(setup.bob.app_key)
    with pytest.raises(EnSyncValidationError):
        await client.subscribe("x")
    sub = await client.subscribe("x", app_secret_key=setup.bob.secret_key)
    assert sub.name == "x"


async def test_a_secret_key_of_another_app_is_refused_naming_both_app_ids(setup: Setup) -> None:
    # Accepted, every message would fail to open ("not sealed for this key")
    # and stay pending.
    engine = setup.make_engine()
    setup.engines.append(engine)
    with pytest.raises(EnSyncValidationError) as refused:
        await engine.create_client(setup.alice.app_key, app_secret_key=setup.bob.secret_key)
    text = str(refused.value)
    assert setup.bob.app_id in text
    assert setup.alice.app_id in text
    assert setup.bob.secret_key not in text
    assert setup.alice.app_key not in text
    client = await engine.create_client(setup.alice.app_key)
    with pytest.raises(EnSyncValidationError, match=re.escape(setup.bob.app_id)):
        await client.subscribe("x", app_secret_key=setup.bob.secret_key)
    sub = await client.subscribe("x", app_secret_key=setup.alice.secret_key)
    assert sub.name == "x"


async def test_messages_cross_transports() -> None:
    async with run_engine() as server:
        alice = await server.create_app("alice")
        bob = await server.create_app("bob")
        over_grpc = EnSyncEngine(server.grpc_url)
        over_ws = WsEngine(server.ws_url)
        try:
            g = await over_grpc.create_client(alice.app_key, app_secret_key=alice.secret_key)
            w = await over_ws.create_client(bob.app_key, app_secret_key=bob.secret_key)
            to_ws, on_ws = collector()
            to_grpc, on_grpc = collector()
            (await w.subscribe("x")).on(on_ws)
            (await g.subscribe("x")).on(on_grpc)
            sent_to_bob = await g.publish("x", [bob.app_id], {"via": "grpc"})
            sent_to_alice = await w.publish("x", [alice.app_id], {"via": "ws"})
            await eventually(lambda: len(to_ws) == len(to_grpc) == 1)
            assert (to_ws[0].idem, to_ws[0].payload) == (sent_to_bob, {"via": "grpc"})
            assert (to_grpc[0].idem, to_grpc[0].payload) == (sent_to_alice, {"via": "ws"})
            assert to_ws[0].sender == alice.app_id
            assert to_grpc[0].sender == bob.app_id
        finally:
            await over_grpc.close()
            await over_ws.close()


async def test_long_handler_is_not_delivered_twice(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("slow")
    seen: list[Message] = []

    async def slow(message: Message) -> None:
        seen.append(message)
        await asyncio.sleep(seconds(1.5))  # well past the 600 ms ack deadline

    sub.on(slow)
    await alice.publish("slow", [setup.bob.app_id], {"i": 1})
    await eventually(lambda: setup.server.engine.stats.acked == 1, timeout_s=5)
    assert len(seen) == 1
    assert setup.server.engine.stats.redelivered == 0


async def test_poison_message_backs_off_then_is_dead_lettered(setup: Setup) -> None:
    engine = setup.server.engine
    engine.config = dataclasses.replace(
        engine.config, max_deliveries=3, redelivery_backoff_ms=(100, 400)
    )
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("poison")
    arrivals: list[tuple[float, Message]] = []

    def always_fails(message: Message) -> None:
        arrivals.append((time.monotonic(), message))
        raise ValueError("cannot parse order")

    sub.on(always_fails)
    idem = await alice.publish("poison", [setup.bob.app_id], {"bad": True})

    async def dead() -> list[StoredMessage]:
        return await engine.store.list_dead(setup.bob.app_id, 10)

    for _ in range(int(seconds(100))):
        if await dead():
            break
        await asyncio.sleep(0.05)
    (letter,) = await dead()
    assert letter.idem == idem
    assert letter.dead_reason is not None
    assert "3 attempts" in letter.dead_reason
    assert "cannot parse order" in letter.dead_reason
    assert [m.attempt for _, m in arrivals] == [1, 2, 3]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrivals)]
    assert gaps[0] >= 0.09
    assert gaps[1] >= 0.39  # the delay grows
    # Positive control: a message published after the letter arrives alone.
    control = await alice.publish("poison", [setup.bob.app_id], {"bad": "control"})
    await eventually(lambda: arrivals[-1][1].idem == control)
    assert [m.idem for _, m in arrivals] == [idem, idem, idem, control]


async def test_close_lets_running_handlers_finish_and_ack(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("work")
    started = asyncio.Event()
    finished: list[int] = []

    async def handler(message: Message) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(message.payload["i"])

    sub.on(handler)
    first = await alice.publish("work", [setup.bob.app_id], {"i": 1})
    second = await alice.publish("work", [setup.bob.app_id], {"i": 2})
    await asyncio.wait_for(started.wait(), seconds(5))
    await bob.close()
    assert finished == [1]  # the running handler finished; the next was not taken up
    stored = await setup.server.engine.store.get(first)
    assert stored is not None
    assert stored.state.name == "ACKED"
    # The message that was not handled goes to the app's next client.
    other = await setup.connect(setup.bob)
    got, collect = collector()
    (await other.subscribe("work")).on(collect)
    await eventually(lambda: [m.idem for m in got] == [second])


async def test_close_cancels_a_handler_that_overruns_the_drain_timeout(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("stuck")
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(message: Message) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sub.on(handler)
    await alice.publish("stuck", [setup.bob.app_id], {"i": 1})
    await asyncio.wait_for(started.wait(), seconds(5))
    await asyncio.wait_for(bob.close(drain_timeout_s=0.2), seconds(5))
    assert cancelled.is_set()


async def test_messages_waiting_behind_a_slow_handler_are_not_delivered_twice(
    setup: Setup,
) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("queue")
    seen: list[int] = []

    async def slow(message: Message) -> None:
        await asyncio.sleep(0.3)
        seen.append(message.payload["i"])

    sub.on(slow)
    for i in range(6):  # ~1.8 s of work, three times the 600 ms ack deadline
        await alice.publish("queue", [setup.bob.app_id], {"i": i})
    await eventually(lambda: len(seen) == 6, timeout_s=10)
    await eventually(lambda: setup.server.engine.stats.acked == 6)
    assert seen == list(range(6))
    assert setup.server.engine.stats.redelivered == 0


async def test_a_reused_sender_key_pair_is_opened_like_any_other(setup: Setup) -> None:
    alice = await setup.connect(setup.alice, sender_key_reuse_ms=60_000)
    bob = await setup.connect(setup.bob)
    got, handler = collector()
    (await bob.subscribe("reuse")).on(handler)
    for i in range(3):
        await alice.publish("reuse", [setup.bob.app_id], {"i": i})
    await eventually(lambda: len(got) == 3)
    assert [m.payload for m in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    stored = [await setup.server.engine.store.get(m.idem) for m in got]
    keys = {json.loads(base64.b64decode(s.payload))["ephemeralPublicKey"] for s in stored if s}
    assert len(keys) == 1  # one key pair for the window
    with pytest.raises(EnSyncValidationError, match="sender_key_reuse_ms"):
        setup.make_engine(sender_key_reuse_ms=-1)


@dataclasses.dataclass
class Order:
    order_id: str
    quantity: int


class Shipment(pydantic.BaseModel):
    order_id: str
    quantity: int


async def test_typed_payloads_in_and_out(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    errors_seen: list[EnSyncError] = []
    setup.engines[-1].on("error", errors_seen.append)
    orders = await bob.subscribe("orders", model=Order)
    shipments = await bob.subscribe("shipments", model=Shipment)
    await alice.publish("orders", [setup.bob.app_id], Order("o-1", 2))
    await alice.publish("shipments", [setup.bob.app_id], Shipment(order_id="o-2", quantity=3))
    # (get, not a loop left with break: that would give the message back.)
    assert (await orders.get(timeout=seconds(5))).payload == Order("o-1", 2)
    assert (await shipments.get(timeout=seconds(5))).payload == Shipment(order_id="o-2", quantity=3)
    # A payload that does not fit goes to the dead letters at once, with why
    # (handlers keep the subscriptions consuming).
    handled: list[Message] = []
    orders.on(handled.append)
    shipments.on(handled.append)
    wrong = await alice.publish("shipments", [setup.bob.app_id], {"order_id": "o-3"})
    odd = await alice.publish("orders", [setup.bob.app_id], {"order_id": "o-4", "colour": "red"})
    store = setup.server.engine.store
    await eventually(lambda: len(errors_seen) == 2)

    async def dead() -> dict[str, str]:
        return {m.idem: m.dead_reason or "" for m in await store.list_dead(setup.bob.app_id, 10)}

    for _ in range(100):
        reasons = await dead()
        if len(reasons) == 2:
            break
        await asyncio.sleep(0.02)
    assert reasons[wrong].startswith("discarded: payload does not fit Shipment")
    assert "quantity" in reasons[wrong]
    assert reasons[odd].startswith("discarded: payload does not fit Order")
    stored = await store.get(odd)
    assert stored is not None
    assert stored.attempts <= 1  # never delivered again
    assert handled == []  # no handler saw a payload that did not fit
    with pytest.raises(EnSyncValidationError, match="dataclass or a pydantic model"):
        await bob.subscribe("untyped", model=dict)
    with pytest.raises(EnSyncValidationError, match="dataclass or a pydantic model"):
        await alice.publish("orders", [setup.bob.app_id], Order)  # the class, not an order


async def test_settling_in_a_handler_is_not_undone_by_auto_ack(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("orders/created")  # auto_ack, the default
    seen: list[Message] = []

    async def handle(message: Message) -> None:
        seen.append(message)
        if message.payload["n"] == 1 and message.attempt == 1:
            await sub.defer(message.idem, 200, "later")
        elif message.payload["n"] == 2:
            await sub.discard(message.idem, "never")

    sub.on(handle)
    await alice.publish("orders/created", [setup.bob.app_id], {"n": 1})
    discarded = await alice.publish("orders/created", [setup.bob.app_id], {"n": 2})
    # The deferral stands: the message comes back, and is then auto-acked.
    await eventually(lambda: len(seen) == 3)
    assert sorted((m.payload["n"], m.attempt) for m in seen) == [(1, 1), (1, 2), (2, 1)]
    await eventually(lambda: setup.server.engine.stats.acked == 1)
    # The discard stands: a dead letter with its reason, not an ack.
    dead = await setup.server.engine.store.list_dead(setup.bob.app_id, 10)
    assert [(m.idem, m.dead_reason) for m in dead] == [(discarded, "discarded: never")]


async def test_settling_in_a_loop_body_is_not_undone_by_auto_ack(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("orders/created")
    await alice.publish("orders/created", [setup.bob.app_id], {"n": 1})
    attempts: list[int] = []
    async for message in sub:
        attempts.append(message.attempt)
        if message.attempt == 1:
            await sub.defer(message.idem, 200, "later")
            continue
        break
    assert attempts == [1, 2]


def _sdk_code(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` runs the SDK's code (the client, or the in-memory transport)."""
    code = getattr(task.get_coro(), "cr_code", None)
    filename = code.co_filename if code is not None else ""
    return "/ensync/client/" in filename or filename.endswith("/ensync/testing/memory.py")


async def test_closing_an_engine_leaves_no_task_behind(setup: Setup) -> None:
    before = asyncio.all_tasks()
    engine = setup.make_engine()
    heard: list[EnSyncError] = []

    async def listener(error: EnSyncError) -> None:  # runs as a task of the engine
        heard.append(error)
        await asyncio.sleep(60)

    engine.on("error", listener)
    alice = await engine.create_client(setup.alice.app_key, app_secret_key=setup.alice.secret_key)
    bob = await engine.create_client(setup.bob.app_key, app_secret_key=setup.bob.secret_key)
    handled, iterated = await bob.subscribe("handled"), await bob.subscribe("iterated")
    started = asyncio.Event()

    async def slow(message: Message) -> None:  # holds its message past the ack deadline
        started.set()
        if message.payload["i"] == 0 and message.attempt == 1:
            raise ValueError("handler failed")  # reported, and the message given back
        await asyncio.sleep(60)

    handled.on(slow)
    for i in range(2):
        await alice.publish("handled", [setup.bob.app_id], {"i": i})
    await alice.publish("iterated", [setup.bob.app_id], {"i": 0})
    async for _ in iterated:
        break
    await asyncio.wait_for(started.wait(), seconds(5))
    await eventually(lambda: bool(heard))
    # Something of everything runs now: connections, links, the handler, the
    # lease keeper, a listener of the engine's.
    assert any(_sdk_code(task) for task in asyncio.all_tasks() - before)
    await bob.close(drain_timeout_s=0.1)  # the handler in hand is cancelled
    await engine.close()  # closes alice, and the listener
    left = [task for task in asyncio.all_tasks() - before if not task.done() and _sdk_code(task)]
    assert left == []
