"""The delivery contract (DESIGN.md §2), driven on the engine without a
transport, on a fake clock: time moves only when a test says so, and every
"nothing happened" is checked once the engine is quiet (``quiet``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.store import SqliteStore
from ensync.server.store.base import Claim, MessageState, StoreError
from tests.support.clock import FakeClock
from tests.support.engine_calls import Calls
from tests.support.timing import eventually
from tests.unit.server.engine_support import Factory, World, make_engine, quiet, world
from tests.unit.server.fakes import FakeRouter, FakeSink, envelope

__all__ = ["make_engine", "world"]  # fixtures, re-exported for pytest

DEADLINE = 300  # the world's ack deadline


async def test_publish_reaches_the_recipient_with_engine_set_sender(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, bob_router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idems = [await world.publish(alice, world.bob) for _ in range(3)]
    await eventually(lambda: len(bob_router.received) == 3)
    got = bob_router.received
    assert [d.idem for d in got] == idems
    assert [d.block for d in got] == [1, 2, 3]
    assert {d.sender for d in got} == {world.alice.app_id}
    assert all(d.attempt == 1 for d in got)


async def test_messages_route_by_recipient_app_only(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, bob_router = await world.client(world.bob)
    carol, carol_router = await world.client(world.carol)
    Calls(world.engine).subscribe(bob, "orders/created")
    Calls(world.engine).subscribe(carol, "orders/created")
    await world.publish(alice, world.bob)
    await world.publish(alice, world.carol)
    await world.publish(alice, world.carol)
    await quiet(world.engine)
    assert len(carol_router.received) == 2
    assert len(bob_router.received) == 1


async def test_clients_of_one_app_compete(world: World) -> None:
    alice, _ = await world.client(world.alice)
    first, r1 = await world.client(world.bob)
    second, r2 = await world.client(world.bob)
    Calls(world.engine).subscribe(first, "orders/created")
    Calls(world.engine).subscribe(second, "orders/created")
    idems = {await world.publish(alice, world.bob) for _ in range(10)}
    await quiet(world.engine)
    one = {d.idem for d in r1.received}
    two = {d.idem for d in r2.received}
    assert one | two == idems
    assert not one & two
    assert len(one) == len(two) == 5  # round robin


async def test_ack_is_idempotent_and_stops_redelivery(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    acked = await world.publish(alice, world.bob)
    control = await world.publish(alice, world.bob)
    await quiet(world.engine)
    await Calls(world.engine).ack(bob, acked)
    await Calls(world.engine).ack(bob, acked)
    await world.advance(DEADLINE)
    # The unacked one came back after the deadline; the acked one did not.
    assert [d.idem for d in router.received] == [acked, control, control]
    stored = await world.engine.store.get(acked)
    assert stored is not None
    assert stored.state is MessageState.ACKED
    assert world.engine.stats.acked == 1


async def test_acks_of_one_loop_turn_settle_together_each_with_its_own_answer(
    world: World,
) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    carol, _ = await world.client(world.carol)
    Calls(world.engine).subscribe(bob, "orders/created")
    first = await world.publish(alice, world.bob)
    second = await world.publish(alice, world.bob)
    await quiet(world.engine)
    settle = world.engine.store.settle
    writes = 0

    async def counting_settle(*args: Any, **kwargs: Any) -> Any:
        nonlocal writes
        writes += 1
        return await settle(*args, **kwargs)

    world.engine.store.settle = counting_settle  # type: ignore[method-assign]
    outcomes = await asyncio.gather(
        Calls(world.engine).ack(bob, first),
        Calls(world.engine).ack(carol, second),  # not carol's: refused alone
        Calls(world.engine).ack(bob, second),
        Calls(world.engine).ack(bob, first),  # twice in one batch is still fine
        return_exceptions=True,
    )
    assert [outcomes[0], outcomes[2], outcomes[3]] == [None, None, None]
    assert isinstance(outcomes[1], ServiceError)
    assert outcomes[1].code is ErrorCode.NOT_FOUND
    assert writes == 1
    assert world.engine.stats.acked == 2
    for idem in (first, second):
        stored = await world.engine.store.get(idem)
        assert stored is not None
        assert stored.state is MessageState.ACKED
    await world.advance(DEADLINE)
    assert len(router.received) == 2  # neither came back


async def test_settling_unknown_or_foreign_messages_is_not_found(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    carol, _ = await world.client(world.carol)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: len(router.received) == 1)
    texts = set()
    for target in (idem, "01NOSUCHMESSAGE00000000000", "bad idem;="):
        for call in (
            Calls(world.engine).ack(carol, target),
            Calls(world.engine).discard(carol, target, "x"),
            Calls(world.engine).defer(carol, target, 10, "x"),
            Calls(world.engine).replay(carol, target),
            Calls(world.engine).extend(carol, target),
            Calls(world.engine).release(carol, target, "x"),
        ):
            with pytest.raises(ServiceError) as caught:
                await call
            assert caught.value.code is ErrorCode.NOT_FOUND
            texts.add(caught.value.message.replace(repr(target[:64]), "<idem>"))
    # The same words whether the message exists for someone else or not at all.
    assert len(texts) == 1
    stored = await world.engine.store.get(idem)
    assert stored is not None
    assert stored.state is MessageState.PENDING


async def test_unsettled_delivery_comes_back_after_the_deadline(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await world.advance(DEADLINE - 1)
    assert len(router.received) == 1
    await world.advance(1)
    assert [d.idem for d in router.received] == [idem, idem]
    assert [d.attempt for d in router.received] == [1, 2]
    assert world.engine.stats.redelivered == 1


async def test_disconnect_returns_in_flight_messages_to_other_clients(world: World) -> None:
    alice, _ = await world.client(world.alice)
    first, r1 = await world.client(world.bob)
    Calls(world.engine).subscribe(first, "orders/created")
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: len(r1.received) == 1)
    second, r2 = await world.client(world.bob)
    Calls(world.engine).subscribe(second, "orders/created")
    Calls(world.engine).disconnect(first)
    await eventually(lambda: len(r2.received) == 1)
    assert r2.received[0].idem == idem
    assert r2.received[0].attempt == 2
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).ack(first, idem)
    assert caught.value.code is ErrorCode.UNAUTHENTICATED


async def test_defer_redelivers_the_same_idem_after_the_delay(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await quiet(world.engine)
    when = await Calls(world.engine).defer(bob, idem, 150, "busy")
    assert when == world.clock.now_ms() + 150
    await world.advance(149)
    assert len(router.received) == 1  # invisible while deferred
    await world.advance(1)
    assert [d.idem for d in router.received] == [idem, idem]
    assert world.engine.stats.deferred == 1


@pytest.mark.parametrize("delay", [-1, 86_400_001])
async def test_defer_refuses_delays_outside_a_day(world: World, delay: int) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: len(router.received) == 1)
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).defer(bob, idem, delay, "x")
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert str(delay) in caught.value.message


async def test_defer_zero_delivers_again_at_once(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await quiet(world.engine)
    await Calls(world.engine).defer(bob, idem, 0, "again")
    await quiet(world.engine)
    assert [d.idem for d in router.received] == [idem, idem]


async def test_discard_dead_letters_with_the_reason(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    control = await world.publish(alice, world.bob)
    await quiet(world.engine)
    await Calls(world.engine).discard(bob, idem, "malformed order")
    await Calls(world.engine).discard(bob, idem, "again")  # answers success, changes nothing
    await world.advance(DEADLINE)
    assert [d.idem for d in router.received] == [idem, control, control]
    dead = await world.engine.store.list_dead(world.bob.app_id, 10)
    assert [m.idem for m in dead] == [idem]
    assert dead[0].dead_reason == "discarded: malformed order"
    assert world.engine.stats.discarded == 1


async def test_poison_message_is_dead_lettered_after_max_deliveries(make_engine: Factory) -> None:
    engine = await make_engine(ack_deadline_ms=50, max_deliveries=3, redelivery_backoff_ms=(0,))
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    router = FakeRouter()
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")
    idem = await Calls(engine).publish(
        alice, "jobs", envelope(bob_app.app_id), bob_app.app_id, "{}"
    )
    for _ in range(3):
        await quiet(engine)
        clock.advance(50)
    await quiet(engine)
    assert [d.attempt for d in router.received] == [1, 2, 3]
    (letter,) = await engine.store.list_dead(bob_app.app_id, 10)
    assert letter.idem == idem
    assert letter.dead_reason == (
        "delivery limit reached: 3 attempts without a settlement (last: ack deadline passed)"
    )
    assert engine.stats.dead_lettered == 1


async def test_replay_returns_any_own_message_with_replay_info(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: len(router.received) == 1)
    pending = await Calls(world.engine).replay(bob, idem)
    assert pending.delivery.idem == idem
    assert pending.delivery.payload == router.received[0].payload
    assert not pending.was_acknowledged
    await Calls(world.engine).ack(bob, idem)
    world.clock.advance(5)
    acked = await Calls(world.engine).replay(bob, idem)
    assert acked.was_acknowledged
    assert acked.replayed_at_ms == pending.replayed_at_ms + 5


async def test_pause_hands_unsettled_messages_to_other_clients(world: World) -> None:
    alice, _ = await world.client(world.alice)
    first, r1 = await world.client(world.bob)
    Calls(world.engine).subscribe(first, "orders/created")
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: len(r1.received) == 1)
    Calls(world.engine).pause(first, "orders/created", "maintenance")
    second, r2 = await world.client(world.bob)
    Calls(world.engine).subscribe(second, "orders/created")
    await eventually(lambda: len(r2.received) == 1)
    assert r2.received[0].idem == idem
    await Calls(world.engine).ack(second, idem)
    Calls(world.engine).disconnect(second)
    later = await world.publish(alice, world.bob)
    await quiet(world.engine)
    assert len(r1.received) == 1  # paused: nothing new
    Calls(world.engine).resume(first, "orders/created")
    await quiet(world.engine)
    assert [d.idem for d in r1.received] == [idem, later]


async def test_in_flight_window_bounds_unsettled_deliveries(make_engine: Factory) -> None:
    engine = await make_engine(window=2)
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    router = FakeRouter()
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")
    for _ in range(5):
        await Calls(engine).publish(alice, "jobs", envelope(bob_app.app_id), bob_app.app_id, "{}")
    await quiet(engine)
    assert len(router.received) == 2
    await Calls(engine).ack(bob, router.received[0].idem)
    await quiet(engine)
    assert [d.block for d in router.received] == [1, 2, 3]
    assert engine.statistics().in_flight == 2


async def test_client_credits_bound_claims_and_cost_no_delivery_attempt(
    make_engine: Factory,
) -> None:
    # A client granting fewer credits than the window: the engine claims no
    # more than it may push, so nothing is claimed and given back over and
    # over (which used up delivery attempts and dead-lettered messages that
    # never reached anyone).
    engine = await make_engine(max_deliveries=2)
    store = engine.store
    claim = store.claim
    claimed = 0

    async def counting_claim(*args: Any, **kwargs: Any) -> Claim:
        nonlocal claimed
        result = await claim(*args, **kwargs)
        claimed += len(result.leases)
        return result

    store.claim = counting_claim  # type: ignore[method-assign]
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    router = FakeRouter(FakeSink(credits=3))
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")
    for _ in range(20):
        await Calls(engine).publish(alice, "jobs", envelope(bob_app.app_id), bob_app.app_id, "{}")
    await quiet(engine)
    assert len(router.received) == 3
    for _ in range(6):
        for delivery in router.received[-3:]:
            await Calls(engine).ack(bob, delivery.idem)
        router.sink.credits = 3
        Calls(engine).routes_changed(bob)
        await quiet(engine)
    assert [d.block for d in router.received] == list(range(1, 21))
    assert claimed == 20
    assert engine.stats.dead_lettered == 0
    assert engine.stats.redelivered == 0


async def test_expired_message_is_dropped_not_delivered_late(world: World) -> None:
    alice, _ = await world.client(world.alice)
    idem = await world.publish(alice, world.bob, metadata='{"ttl_ms": 50}')
    await world.advance(50)
    bob, router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")
    fresh = await world.publish(alice, world.bob)
    await quiet(world.engine)
    assert [d.idem for d in router.received] == [fresh]
    assert world.engine.stats.expired == 1
    stored = await world.engine.store.get(idem)
    assert stored is not None
    assert stored.state is MessageState.EXPIRED


async def test_backlog_is_delivered_in_block_order_across_pages(make_engine: Factory) -> None:
    engine = await make_engine(window=8)
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    payload = envelope(bob_app.app_id)
    for _ in range(600):
        await Calls(engine).publish(alice, "jobs", payload, bob_app.app_id, "{}")
    router = FakeRouter()
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")

    async def publish_more() -> None:
        for _ in range(100):
            await Calls(engine).publish(alice, "jobs", payload, bob_app.app_id, "{}")

    publisher = asyncio.create_task(publish_more())
    acked = 0
    while acked < 700:
        await eventually(lambda n=acked: len(router.received) > n, timeout_s=5)  # type: ignore[misc]
        await Calls(engine).ack(bob, router.received[acked].idem)
        acked += 1
    await publisher
    assert [d.block for d in router.received] == list(range(1, 701))


async def test_silent_detached_sessions_expire(make_engine: Factory) -> None:
    engine = await make_engine(session_timeout_ms=150)
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    app = await engine.apps.create("alice")
    kept_router = FakeRouter(attached=True)
    kept = (await Calls(engine).connect(app.app_key, kept_router)).client_id
    gone_router = FakeRouter(attached=False)
    gone = (await Calls(engine).connect(app.app_key, gone_router)).client_id
    await quiet(engine)
    clock.advance(150)
    await quiet(engine)
    assert not gone_router.closed  # silent for exactly the timeout: still alive
    clock.advance(50)
    await quiet(engine)
    assert gone_router.closed
    assert not Calls(engine).heartbeat(gone)
    assert Calls(engine).heartbeat(kept)
    assert not kept_router.closed


async def test_heartbeats_keep_a_detached_session_alive(make_engine: Factory) -> None:
    engine = await make_engine(session_timeout_ms=200)
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    app = await engine.apps.create("alice")
    router = FakeRouter(attached=False)
    client = (await Calls(engine).connect(app.app_key, router)).client_id
    for _ in range(8):
        clock.advance(60)
        await quiet(engine)
        assert Calls(engine).heartbeat(client)
    assert not router.closed
    clock.advance(300)  # and without them it goes
    await quiet(engine)
    assert router.closed


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("name", "", "empty"),
        ("name", "orders//x", "malformed message name"),
        ("name", "orders;x", "malformed message name"),
        ("recipient", "not-base64!", "not base64"),
        ("recipient", "AAAA", "not an app id"),
        ("payload", "", "payload is empty"),
        ("payload", "@@@", "not a base64-encoded JSON envelope"),
        ("payload", "eyJhIjoxfQ==", "lacks"),  # {"a":1}
        ("metadata", "[1]", "must be a JSON object"),
        ("metadata", "{nope", "not valid JSON"),
        ("metadata", '{"persist":"yes"}', "persist"),
    ],
)
async def test_bad_publish_input_is_refused_and_stores_nothing(
    world: World, field: str, value: str, words: str
) -> None:
    alice, _ = await world.client(world.alice)
    args = {
        "name": "orders/created",
        "payload": envelope(world.bob.app_id),
        "recipient": world.bob.app_id,
        "metadata": "{}",
    }
    args[field] = value
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).publish(
            alice, args["name"], args["payload"], args["recipient"], args["metadata"]
        )
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert words in caught.value.message
    assert await world.engine.store.backlog() == {}
    # The engine still works for the same client.
    assert await world.publish(alice, world.bob)


async def test_publish_to_an_unregistered_app_is_refused(world: World) -> None:
    from ensync.crypto import generate_keypair

    alice, _ = await world.client(world.alice)
    stranger = generate_keypair().app_id
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).publish(alice, "x", envelope(stranger), stranger, "{}")
    assert "not a registered app" in caught.value.message


async def test_oversized_payload_is_refused(make_engine: Factory) -> None:
    engine = await make_engine(max_payload_bytes=1000)
    alice_app = await engine.apps.create("alice")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    big = envelope(alice_app.app_id, b'{"x":"' + b"a" * 2000 + b'"}')
    with pytest.raises(ServiceError) as caught:
        await Calls(engine).publish(alice, "x", big, alice_app.app_id, "{}")
    assert caught.value.code is ErrorCode.LIMIT_EXCEEDED
    assert "1000" in caught.value.message


async def test_unknown_client_and_bad_keys_are_refused(world: World) -> None:
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).publish("nobody", "x", "", "", "")
    assert caught.value.code is ErrorCode.UNAUTHENTICATED
    for key in ("", "ensk_wrong"):
        with pytest.raises(ServiceError) as caught:
            await Calls(world.engine).connect(key, FakeRouter())
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
    await world.engine.apps.revoke("carol")
    with pytest.raises(ServiceError):
        await Calls(world.engine).connect(world.carol.app_key, FakeRouter())


async def test_persist_false_lives_in_memory_only(make_engine: Factory, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "e.db")
    await store.open()
    engine = await make_engine(store)
    alice_app = await engine.apps.create("alice")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    target = alice_app.app_id
    kept = await Calls(engine).publish(alice, "x", envelope(target), target, '{"persist":true}')
    fleeting = await Calls(engine).publish(
        alice, "x", envelope(target), target, '{"persist":false}'
    )
    async with SqliteStore(tmp_path / "e.db") as on_disk:
        assert await on_disk.get(kept) is not None
        assert await on_disk.get(fleeting) is None
    router = FakeRouter()
    bob = (await Calls(engine).connect(alice_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "x")
    await eventually(lambda: len(router.received) == 2)
    assert [d.block for d in router.received] == [1, 2]
    await Calls(engine).ack(bob, fleeting)
    stored = await engine.store.get(fleeting)
    assert stored is not None
    assert stored.state is MessageState.ACKED


async def test_restart_keeps_messages_blocks_and_deferrals(tmp_path: Path) -> None:
    from ensync.server.runtime.engine import Engine

    clock = FakeClock()

    async def boot() -> Engine:
        store = SqliteStore(tmp_path / "e.db")
        await store.open()
        engine = Engine(store, clock=clock)
        await engine.start()
        return engine

    async def shut(engine: Engine) -> None:
        await engine.stop()
        await engine.store.close()

    engine = await boot()
    app = await engine.apps.create("alice")
    client = (await Calls(engine).connect(app.app_key, FakeRouter())).client_id
    first = await Calls(engine).publish(client, "x", envelope(app.app_id), app.app_id, "{}")
    second = await Calls(engine).publish(client, "x", envelope(app.app_id), app.app_id, "{}")
    router = FakeRouter()
    reader = (await Calls(engine).connect(app.app_key, router)).client_id
    Calls(engine).subscribe(reader, "x")
    await eventually(lambda: len(router.received) == 2)
    await Calls(engine).defer(reader, second, 300, "later")
    await shut(engine)

    engine = await boot()
    try:
        client = (await Calls(engine).connect(app.app_key, FakeRouter())).client_id
        third = await Calls(engine).publish(client, "x", envelope(app.app_id), app.app_id, "{}")
        router = FakeRouter()
        reader = (await Calls(engine).connect(app.app_key, router)).client_id
        Calls(engine).subscribe(reader, "x")
        await quiet(engine)
        assert [(d.idem, d.block) for d in router.received] == [(first, 1), (third, 3)]
        clock.advance(300)
        await quiet(engine)
        assert [d.idem for d in router.received][2:] == [second]
    finally:
        await shut(engine)


async def test_extend_pushes_back_the_ack_deadline(world: World) -> None:
    alice, _ = await world.client(world.alice)
    bob, router = await world.client(world.bob)
    carol, _ = await world.client(world.carol)
    Calls(world.engine).subscribe(bob, "orders/created")
    idem = await world.publish(alice, world.bob)
    await quiet(world.engine)
    for _ in range(4):  # 4 x 150 ms, twice the 300 ms deadline
        await world.advance(150)
        deadline = await Calls(world.engine).extend(bob, idem)
        assert deadline == world.clock.now_ms() + DEADLINE
    assert len(router.received) == 1
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).extend(carol, idem)
    assert caught.value.code is ErrorCode.NOT_FOUND
    await Calls(world.engine).ack(bob, idem)
    with pytest.raises(ServiceError) as caught:
        await Calls(world.engine).extend(bob, idem)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION


async def test_release_waits_out_the_backoff_schedule(make_engine: Factory) -> None:
    engine = await make_engine(redelivery_backoff_ms=(0, 250), max_deliveries=4)
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    router = FakeRouter()
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")
    idem = await Calls(engine).publish(
        alice, "jobs", envelope(bob_app.app_id), bob_app.app_id, "{}"
    )
    await quiet(engine)
    first = await Calls(engine).release(bob, idem, "boom")
    assert first == clock.now_ms()  # the first failure retries at once
    await quiet(engine)
    assert len(router.received) == 2
    second = await Calls(engine).release(bob, idem, "boom")
    assert second == clock.now_ms() + 250
    clock.advance(249)
    await quiet(engine)
    assert len(router.received) == 2  # still waiting
    clock.advance(1)
    await quiet(engine)
    assert [d.attempt for d in router.received] == [1, 2, 3]
    with pytest.raises(ServiceError) as caught:
        await Calls(engine).release(bob, "01NOSUCHMESSAGE00000000000", "x")
    assert caught.value.code is ErrorCode.NOT_FOUND


def keyed(key: str) -> str:
    return json.dumps({"persist": True, "headers": {"ensync-idempotency-key": key}})


async def test_a_repeated_idempotency_key_returns_the_original_idem(world: World) -> None:
    alice, _ = await world.client(world.alice)
    again, _ = await world.client(world.alice)  # another session of the same app
    first = await world.publish(alice, world.bob, metadata=keyed("k-1"))
    # A retry, even on a new connection, and even while the first still commits.
    retry, concurrent = await asyncio.gather(
        world.publish(again, world.bob, metadata=keyed("k-1")),
        world.publish(alice, world.bob, metadata=keyed("k-2")),
    )
    assert retry == first
    assert concurrent != first
    to_carol = await world.publish(alice, world.carol, metadata=keyed("k-1"))
    assert to_carol != first  # the key is per recipient
    assert await world.engine.store.backlog() == {world.bob.app_id: 2, world.carol.app_id: 1}
    assert world.engine.stats.deduplicated == 1
    with pytest.raises(ServiceError) as caught:
        await world.publish(alice, world.bob, metadata=keyed(""))
    assert "ensync-idempotency-key" in caught.value.message


async def test_idempotency_keys_expire_and_survive_restarts(tmp_path: Path) -> None:
    from ensync.server.config import EngineConfig
    from ensync.server.runtime.engine import Engine

    clock = FakeClock()

    async def boot() -> Engine:
        store = SqliteStore(tmp_path / "e.db")
        await store.open()
        engine = Engine(store, EngineConfig(dedupe_window_ms=1_000), clock=clock)
        await engine.start()
        return engine

    async def shut(engine: Engine) -> None:
        await engine.stop()
        await engine.store.close()

    engine = await boot()
    app = await engine.apps.create("alice")
    client = (await Calls(engine).connect(app.app_key, FakeRouter())).client_id
    target = app.app_id
    first = await Calls(engine).publish(client, "x", envelope(target), target, keyed("k"))
    await shut(engine)

    engine = await boot()
    try:
        client = (await Calls(engine).connect(app.app_key, FakeRouter())).client_id
        clock.advance(1_000)  # the last moment the key is remembered
        assert (
            await Calls(engine).publish(client, "x", envelope(target), target, keyed("k")) == first
        )
        clock.advance(1)
        assert (
            await Calls(engine).publish(client, "x", envelope(target), target, keyed("k")) != first
        )
    finally:
        await shut(engine)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_backed_off_redelivery_comes_with_nothing_else_happening(
    make_engine: Factory, tmp_path: Path, backend: str
) -> None:
    # The engine must wake itself when a backoff ends: no publish, ack or
    # subscribe comes along to make it look at the partition again.
    store = SqliteStore(tmp_path / "e.db") if backend == "sqlite" else None
    if store is not None:
        await store.open()
    engine = await make_engine(store, ack_deadline_ms=300, redelivery_backoff_ms=(0, 1_000))
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    alice_app = await engine.apps.create("alice")
    bob_app = await engine.apps.create("bob")
    alice = (await Calls(engine).connect(alice_app.app_key, FakeRouter())).client_id
    router = FakeRouter()
    bob = (await Calls(engine).connect(bob_app.app_key, router)).client_id
    Calls(engine).subscribe(bob, "jobs")
    await Calls(engine).publish(alice, "jobs", envelope(bob_app.app_id), bob_app.app_id, "{}")
    for step, attempts in ((300, 2), (300, 2), (999, 2), (1, 3)):
        await quiet(engine)
        clock.advance(step)
        await quiet(engine)
        assert [d.attempt for d in router.received][-1] == attempts, step


async def test_a_store_failure_fails_the_publishes_of_its_batch(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, _ = await world.client(world.alice)

    def broken(*_args: Any, done: Any, **_kwargs: Any) -> None:
        done(StoreError("disk on fire"))

    monkeypatch.setattr(world.engine.store, "append_soon", broken)
    with pytest.raises(ServiceError) as refused:
        await world.publish(alice, world.bob)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    monkeypatch.undo()
    assert await world.publish(alice, world.bob)


async def test_a_bug_in_the_append_fails_its_batch_and_the_engine_goes_on(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, _ = await world.client(world.alice)
    bob, bob_router = await world.client(world.bob)
    Calls(world.engine).subscribe(bob, "orders/created")

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(world.engine.store, "append_soon", broken)
    with pytest.raises(ServiceError, match="internal error"):
        await world.publish(alice, world.bob)
    monkeypatch.undo()
    idem = await world.publish(alice, world.bob)
    await eventually(lambda: [d.idem for d in bob_router.received] == [idem])
    await quiet(world.engine)
