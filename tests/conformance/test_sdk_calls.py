"""The SDK calls beyond the seed's API, once per transport.

Settling on the message, pulling with a deadline, loops that give back what
they leave, context managers, and ``publish_many``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from collections.abc import AsyncIterator

import pytest

from ensync import (
    ConnectionState,
    EnSyncAckError,
    EnSyncClient,
    EnSyncConnectionError,
    EnSyncDeferError,
    EnSyncDiscardError,
    EnSyncSubscriptionError,
    EnSyncValidationError,
    Message,
    Subscription,
)
from ensync.client.session import SUBSCRIPTION_CREDIT
from tests.conformance.sdk_setup import TRANSPORTS, Setup, collector, setting_up
from tests.support.timing import eventually, seconds


@pytest.fixture(params=TRANSPORTS)
async def patient(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    """Like ``setup``, with a 30 s ack deadline.

    A redelivery within seconds is then the SDK giving the message back,
    not its lease running out.
    """
    async with setting_up(request.param, ack_deadline_ms=30_000) as state:
        yield state


async def _publish(setup: Setup, name: str, count: int) -> list[str]:
    alice = await setup.connect(setup.alice)
    return [await alice.publish(name, [setup.bob.app_id], {"i": i}) for i in range(count)]


# ---------------------------------------------------------------- settle on the message


async def test_a_delivered_message_acks_defers_and_discards_itself(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs", auto_ack=False)
    got, handler = collector()
    sub.on(handler)
    first = await alice.publish("jobs", [setup.bob.app_id], {"job": 1})
    await eventually(lambda: len(got) == 1)
    when = await got[0].defer(200, "busy")
    assert isinstance(when, int)
    assert when > 0
    await eventually(lambda: len(got) == 2, timeout_s=3)
    assert got[1].idem == first
    assert got[1].attempt == 2
    await got[1].ack()

    second = await alice.publish("jobs", [setup.bob.app_id], {"job": 2})
    await eventually(lambda: len(got) == 3)
    await got[2].discard("bad job")
    dead = await setup.server.engine.store.list_dead(setup.bob.app_id, 10)
    assert [m.dead_reason for m in dead] == ["discarded: bad job"]
    assert setup.server.engine.stats.acked == 1
    # Positive control: an unsettled message comes back after the 600 ms ack
    # deadline; by then the acked and the discarded one would have too.
    control = await alice.publish("jobs", [setup.bob.app_id], {"job": 3})
    await eventually(lambda: [m.idem for m in got].count(control) == 2, timeout_s=5)
    assert [m.idem for m in got] == [first, first, second, control, control]


async def test_a_handler_that_settles_its_message_is_not_auto_acked_after_it(
    setup: Setup,
) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs")  # auto_ack
    seen: list[Message] = []

    async def handler(message: Message) -> None:
        seen.append(message)
        if message.attempt == 1:
            await message.defer(100, "not yet")

    sub.on(handler)
    idem = await alice.publish("jobs", [setup.bob.app_id], {"job": 1})
    # Had auto-ack acked the deferred message, it would not come back.
    await eventually(lambda: len(seen) == 2, timeout_s=3)
    assert [m.idem for m in seen] == [idem, idem]
    await eventually(lambda: setup.server.engine.stats.acked == 1)


async def test_copies_of_a_message_cannot_settle_and_say_why(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs", auto_ack=False)
    got, handler = collector()
    sub.on(handler)
    idem = await alice.publish("jobs", [setup.bob.app_id], {"job": 1})
    await eventually(lambda: len(got) == 1)
    delivered = got[0]

    replayed = await sub.replay(idem)
    with pytest.raises(EnSyncAckError, match=f"cannot ack message {idem}: it is a replayed copy"):
        await replayed.ack()
    copy = dataclasses.replace(delivered)
    assert copy == delivered
    with pytest.raises(EnSyncDeferError, match="it is a copy, not a delivery"):
        await copy.defer(100)
    unpickled = pickle.loads(pickle.dumps(delivered))
    assert unpickled == delivered
    with pytest.raises(EnSyncDiscardError, match="it is a copy"):
        await unpickled.discard()
    # The settler is no field: values stay plain data.
    assert set(dataclasses.asdict(delivered)) == {f.name for f in dataclasses.fields(Message)}
    assert "Subscription" not in repr(delivered)

    await delivered.ack()
    assert setup.server.engine.stats.acked == 1


@pytest.mark.parametrize("transport", ["grpc", "ws", "memory"])
async def test_an_observed_copy_cannot_settle(transport: str) -> None:
    async with setting_up(transport) as setup:
        alice = await setup.connect(setup.alice)
        bob = await setup.connect(setup.bob)
        async with await bob.observe("orders/#") as watching:
            await alice.publish("orders/created", [setup.bob.app_id], {"o": 1})
            async with asyncio.timeout(seconds(5)):
                observed = await anext(aiter(watching))
        with pytest.raises(EnSyncAckError, match="it is an observed copy"):
            await observed.ack()


# ---------------------------------------------------------------- pull with a deadline


async def test_get_and_fetch_pull_with_a_deadline(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs", auto_ack=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"no message of 'jobs' came within 0\.2 s"):
        await sub.get(timeout=0.2)
    assert loop.time() - started >= 0.2
    idems = await _publish(setup, "jobs", 3)

    message = await sub.get(timeout=seconds(5))
    assert message.idem == idems[0]
    await message.ack()
    started = loop.time()
    batch = await sub.fetch(5, timeout=0.5)
    # Two were there: fetch waited out its timeout for more, then returned them.
    assert loop.time() - started >= 0.5
    assert [m.idem for m in batch] == idems[1:]
    for fetched in batch:
        await fetched.ack()
    assert await sub.fetch(3, timeout=0.1) == []
    assert setup.server.engine.stats.acked == 3


async def test_a_full_fetch_returns_without_waiting_out_its_timeout(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs")
    idems = await _publish(setup, "jobs", 4)
    batch = await sub.fetch(2, timeout=seconds(60))
    assert [m.idem for m in batch] == idems[:2]
    assert [m.idem for m in await sub.fetch(2, timeout=seconds(60))] == idems[2:]
    # auto_ack: acked as they were handed over.
    await eventually(lambda: setup.server.engine.stats.acked == 4)


async def test_fetch_fills_past_what_the_engine_sends_ahead(patient: Setup) -> None:
    # (A long ack deadline: none of them is delivered twice on a busy machine.)
    count = SUBSCRIPTION_CREDIT + 88
    alice = await patient.connect(patient.alice)
    bob = await patient.connect(patient.bob)
    sub = await bob.subscribe("bulk")
    results = await alice.publish_many(
        "bulk", [patient.bob.app_id], ({"i": i} for i in range(count))
    )
    assert all(result.ok for result in results)
    batch = await sub.fetch(count, timeout=seconds(30))
    assert {m.idem for m in batch} == {result.idem for result in results}
    assert sorted(m.payload["i"] for m in batch) == list(range(count))
    await eventually(lambda: patient.server.engine.stats.acked == count, timeout_s=10)


async def test_a_pulled_message_left_unsettled_is_delivered_again(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs", auto_ack=False)
    (idem,) = await _publish(setup, "jobs", 1)
    first = await sub.get(timeout=seconds(5))
    # Its lease is not kept alive: after the 600 ms deadline it comes back.
    again = await sub.get(timeout=seconds(5))
    assert first.idem == again.idem == idem
    assert again.attempt == 2


async def test_pulling_is_refused_on_a_subscription_with_handlers(setup: Setup) -> None:
    bob = await setup.connect(setup.bob)
    sub = await bob.subscribe("jobs")
    remove = sub.on(lambda message: None)
    with pytest.raises(EnSyncSubscriptionError, match="has handlers: every message goes to them"):
        await sub.get(timeout=0.1)
    with pytest.raises(EnSyncSubscriptionError, match=r"fetch\(\) would never get one"):
        await sub.fetch(1, timeout=0.1)
    remove()
    with pytest.raises(EnSyncValidationError, match="count must be a positive integer"):
        await sub.fetch(0)
    with pytest.raises(EnSyncValidationError, match="timeout must be seconds"):
        await sub.get(timeout=-1)
    with pytest.raises(TimeoutError):
        await sub.get(timeout=0.05)
    await sub.unsubscribe()
    with pytest.raises(EnSyncSubscriptionError, match="has ended"):
        await sub.get(timeout=0.05)


# ---------------------------------------------------------------- leaving a loop


async def _first_of(sub: Subscription, how: str) -> str:
    """Take one message in an ``async for`` and leave the loop ``how``."""

    async def by_return() -> str:
        async for message in sub:
            return message.idem
        raise AssertionError("the loop ended")

    if how == "return":
        return await by_return()
    taken = ""
    try:
        async for message in sub:
            taken = message.idem
            if how == "break":
                break
            raise RuntimeError("the loop body failed")
    except RuntimeError:
        assert how == "raise"
    return taken


@pytest.mark.parametrize("auto_ack", [False, True], ids=["manual", "auto_ack"])
@pytest.mark.parametrize("how", ["break", "return", "raise"])
async def test_leaving_a_loop_gives_the_message_in_hand_back_at_once(
    patient: Setup, how: str, auto_ack: bool
) -> None:
    bob = await patient.connect(patient.bob)
    sub = await bob.subscribe("jobs", auto_ack=auto_ack)
    (idem,) = await _publish(patient, "jobs", 1)
    assert await _first_of(sub, how) == idem
    # Delivered again long before the 30 s ack deadline would let it go.
    again = await sub.get(timeout=seconds(10))
    assert again.idem == idem
    assert again.attempt == 2
    await again.ack()


# ---------------------------------------------------------------- context managers


async def test_context_managers_close_what_they_opened(setup: Setup) -> None:
    engine = setup.make_engine()
    async with engine as entered:
        assert entered is engine
        async with await engine.create_client(
            setup.alice.app_key, app_secret_key=setup.alice.secret_key
        ) as client:
            await client.publish("x", [setup.bob.app_id], {"i": 1})
        assert client.state is ConnectionState.CLOSED
        other = await engine.create_client(setup.bob.app_key, app_secret_key=setup.bob.secret_key)
        sub = await other.subscribe("x")
        assert (await sub.get(timeout=seconds(5))).payload == {"i": 1}
    assert other.state is ConnectionState.CLOSED
    with pytest.raises(EnSyncConnectionError, match="closed"):
        await engine.create_client(setup.bob.app_key)

    failing = setup.make_engine()
    left: list[EnSyncClient] = []

    async def fail_inside() -> None:
        async with failing:
            left.append(await failing.create_client(setup.bob.app_key))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert left[0].state is ConnectionState.CLOSED


# ---------------------------------------------------------------- publish_many


async def test_publish_many_reports_each_result_in_order(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    got, handler = collector()
    (await bob.subscribe("x")).on(handler)
    results = await alice.publish_many(
        "x", [setup.bob.app_id], [{"i": 0}, {"bad": float("nan")}, {"i": 2}]
    )
    assert [result.ok for result in results] == [True, False, True]
    assert isinstance(results[1].error, EnSyncValidationError)
    assert results[1].idem is None
    await eventually(lambda: len(got) == 2)
    assert {m.idem for m in got} == {results[0].idem, results[2].idem}
    assert sorted(m.payload["i"] for m in got) == [0, 2]
    # Each message has its own idempotency key: none was taken for another.
    keys = {m.headers["ensync-idempotency-key"] for m in got}
    assert len(keys) == 2

    assert await alice.publish_many("x", [setup.bob.app_id], []) == []
    with pytest.raises(EnSyncValidationError, match="publish them one by one"):
        await alice.publish_many(
            "x", [setup.bob.app_id], [{"i": 3}], {"headers": {"ensync-idempotency-key": "k"}}
        )
    with pytest.raises(EnSyncValidationError):
        await alice.publish_many("bad name!", [setup.bob.app_id], [{"i": 4}])
    with pytest.raises(EnSyncValidationError, match="headers"):
        await alice.publish_many("x", [setup.bob.app_id], [{"i": 5}], {"headers": {"k": 1}})
    # Nothing refused above was sent.
    await asyncio.sleep(0.2)
    assert len(got) == 2


async def test_publish_many_to_several_recipients(setup: Setup) -> None:
    alice = await setup.connect(setup.alice)
    bob = await setup.connect(setup.bob)
    a_got, a_handler = collector()
    b_got, b_handler = collector()
    (await alice.subscribe("news")).on(a_handler)
    (await bob.subscribe("news")).on(b_handler)
    results = await alice.publish_many(
        "news", [setup.bob.app_id, setup.alice.app_id], [{"n": 1}, {"n": 2}], hybrid=True
    )
    pairs = [result.idem.split(",") for result in results if result.idem is not None]
    assert len(pairs) == 2
    await eventually(lambda: len(a_got) == len(b_got) == 2)
    assert {m.idem for m in b_got} == {bob_idem for bob_idem, _ in pairs}
    assert {m.idem for m in a_got} == {alice_idem for _, alice_idem in pairs}
