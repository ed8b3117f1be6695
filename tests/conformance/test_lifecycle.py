"""The lifecycle table (:mod:`ensync.server.store.lifecycle`), walked on every
backend through the Store API only.

The cases come from the table itself: for every row, every combination of
the facts its event's decision reads (at the delivery limit or not, TTL
passed or not, a failed or undelivered release, a deferral to now or later);
for every (phase, event) pair that is not a row, the event once. Each case
puts one message in the row's phase, applies the event, checks what the
call answered, and then what the store shows: ``get(idem).state``, whether
and when a claim returns it, its attempt count on the next lease, whether
its lease still extends. What :func:`lifecycle.step` says is the expected
outcome, so a row added to the table fails here until every store honours
it.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import assert_never

import pytest

from ensync.server.store import (
    DeliveryPolicy,
    Lease,
    MessageState,
    Release,
    Released,
    Settlement,
    Store,
    lifecycle,
)
from ensync.server.store.lifecycle import TABLE, Event, Facts, Outcome, Phase
from tests.conformance.stores import (
    BACKENDS,
    RECIPIENT,
    T0,
    Location,
    append,
    claim,
    location_of,
    new,
)

__all__: list[str] = []

# Backoff above 0 after the first failure, so a failed release is DEFERRED.
WALK = DeliveryPolicy(lease_ms=1_000, max_deliveries=3, backoff_ms=(500, 2_000))
# For counting deliveries up to WALK's limit without reaching its own.
COUNTING = dataclasses.replace(WALK, max_deliveries=100)
# Setting a phase up happens at T0; the event comes at AT (a lease taken at
# T0 is still live then).
AT = T0 + 100
TTL_AT = T0 + 50
DEFER_MS = 700
# A DEFERRED message waits past any lease's lapse, so time that ends a lease
# does not end its wait.
DEFERRED_UNTIL = T0 + 60_000
IDEM = "walked"
SETTLED_BY: dict[Event, MessageState] = {
    Event.ACK: MessageState.ACKED,
    Event.DISCARD: MessageState.DEAD,
    Event.EXPIRE: MessageState.EXPIRED,
}


# Stored after the walked message before a prune: a store may keep the
# newest message of a partition, settled, for its numbering (JetStream does).
TRAILER = "walked-trailer"


@dataclass(frozen=True)
class Knobs:
    """The facts a case sets up for the event's decision."""

    at_limit: bool = False  # delivered max_deliveries times already
    ttl_passed: bool = False  # its TTL passed before the event
    failure: bool = False  # RELEASE: the delivery failed
    delivered: bool = True  # RELEASE: the claim reached a client
    later: bool = False  # DEFER: to a time after now

    def label(self) -> str:
        changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
        return "+".join(changed) or "plain"


# The facts each decision function reads (see lifecycle.on_*).
VARIED: dict[Event, tuple[str, ...]] = {
    Event.CLAIM: ("at_limit", "ttl_passed"),
    Event.RELEASE: ("at_limit", "failure", "delivered"),
    Event.LAPSE: ("at_limit",),
    Event.DEFER: ("later",),
}


def knob_grid(event: Event) -> list[Knobs]:
    """Every combination of the knobs the event's decision reads, the
    defaults first."""
    names = VARIED.get(event, ())
    defaults = Knobs()
    return [
        dataclasses.replace(
            defaults,
            **{
                name: getattr(defaults, name) is not flipped
                for name, flipped in zip(names, flips, strict=True)
            },
        )
        for flips in itertools.product((False, True), repeat=len(names))
    ]


def cases() -> list[tuple[Phase, Event, Knobs]]:
    rows = [(phase, event, knobs) for (phase, event) in TABLE for knobs in knob_grid(event)]
    refused = [
        (phase, event, Knobs()) for phase in Phase for event in Event if (phase, event) not in TABLE
    ]
    return rows + refused


@dataclass
class Subject:
    """The walked message, as the test knows it."""

    phase: Phase
    attempts: int = 0
    expires_at_ms: int | None = None
    token: int = 0
    deadline_ms: int = 0
    visible_at_ms: int = 0


def planned(phase: Phase, knobs: Knobs) -> Subject:
    """What :func:`enter` sets up (but the lease's token, which the store picks)."""
    subject = Subject(phase, expires_at_ms=TTL_AT if knobs.ttl_passed else None)
    if phase is Phase.PENDING and knobs.at_limit:
        subject.attempts = WALK.max_deliveries
        subject.deadline_ms = T0 + COUNTING.lease_ms  # of the last lease
    if phase in (Phase.LEASED, Phase.DEFERRED):
        subject.attempts = WALK.max_deliveries if knobs.at_limit else 1
        subject.deadline_ms = T0 + WALK.lease_ms
    if phase is Phase.DEFERRED:
        subject.visible_at_ms = DEFERRED_UNTIL
    return subject


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
async def location(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[Location]:
    async for place in location_of(request, tmp_path):
        yield place


@pytest.fixture
async def store(location: Location) -> Store:
    return await location.open()


# --- putting a message in a phase ------------------------------------------------------


async def lease(store: Store, subject: Subject, policy: DeliveryPolicy = WALK) -> None:
    (taken,) = (await claim(store, now_ms=T0, policy=policy)).leases
    assert taken.message.idem == IDEM
    subject.token, subject.deadline_ms = taken.token, taken.deadline_ms
    subject.attempts = taken.message.attempts


async def count_up(store: Store, subject: Subject, deliveries: int) -> None:
    """Deliver the message ``deliveries`` times, each given back at once."""
    for _ in range(deliveries):
        await lease(store, subject, COUNTING)
        (back,) = await store.release([Release(IDEM, subject.token)], now_ms=T0, policy=COUNTING)
        assert back == Released(visible_at_ms=T0)


async def enter(store: Store, phase: Phase, knobs: Knobs) -> Subject:
    expires = TTL_AT if knobs.ttl_passed else None
    (appended,) = await append(store, new(IDEM, expires_at_ms=expires))
    assert appended.error is None
    subject = Subject(Phase.PENDING, expires_at_ms=expires)
    match phase:
        case Phase.PENDING:
            if knobs.at_limit:
                await count_up(store, subject, WALK.max_deliveries)
        case Phase.LEASED:
            if knobs.at_limit:
                await count_up(store, subject, WALK.max_deliveries - 1)
            await lease(store, subject)
        case Phase.DEFERRED:
            await lease(store, subject)
            assert await store.defer(IDEM, DEFERRED_UNTIL, T0)
            subject.visible_at_ms = DEFERRED_UNTIL
        case Phase.ACKED | Phase.DEAD | Phase.EXPIRED:
            state = lifecycle.STORED[phase]
            assert state is not None
            assert await store.settle([Settlement(IDEM, state)], now_ms=T0) == [True]
        case Phase.GONE:
            assert await store.settle([Settlement(IDEM, MessageState.ACKED)], now_ms=T0) == [True]
            await append(store, new(TRAILER))
            assert await store.prune(T0 + 1) == 1
    subject.phase = phase
    return subject


# --- the event ---------------------------------------------------------------------------


def instant(subject: Subject, event: Event) -> int:
    """When the event comes: time events at the time they name."""
    if event is Event.LAPSE:
        if subject.phase is Phase.LEASED:
            return subject.deadline_ms + lifecycle.lapse_after_ms(subject.attempts, WALK)
        return AT + WALK.lease_ms + max(WALK.backoff_ms)
    if event is Event.WAIT_ENDS and subject.phase is Phase.DEFERRED:
        return subject.visible_at_ms
    return AT


def facts_of(subject: Subject, event: Event, knobs: Knobs, now_ms: int) -> Facts:
    visible_at = subject.visible_at_ms
    if event is Event.DEFER:
        visible_at = now_ms + DEFER_MS if knobs.later else now_ms
    return Facts(
        now_ms=now_ms,
        attempts=subject.attempts,
        expires_at_ms=subject.expires_at_ms,
        failure="walked" if knobs.failure else None,
        delivered=knobs.delivered,
        visible_at_ms=visible_at,
    )


async def apply(
    store: Store, subject: Subject, event: Event, facts: Facts, expected: Outcome | None
) -> None:
    """Make the store call of ``event`` and check its answer: what the row
    says, or the refusal (``expected is None``)."""
    now = facts.now_ms
    match event:
        case Event.CLAIM:
            claimed = await claim(store, now_ms=now, policy=WALK)
            leased = {lease.message.idem: lease for lease in claimed.leases}
            phase = expected.phase if expected is not None else None
            assert (IDEM in leased, claimed.dead, claimed.expired) == (
                phase is Phase.LEASED,
                (IDEM,) if phase is Phase.DEAD else (),
                (IDEM,) if phase is Phase.EXPIRED else (),
            )
            if expected is not None and IDEM in leased:
                taken = leased[IDEM]
                assert taken.message.attempts == expected.attempts
                subject.token, subject.deadline_ms = taken.token, taken.deadline_ms
        case Event.EXTEND:
            deadline = now + WALK.lease_ms
            assert await store.extend(IDEM, subject.token or 1, deadline) is (expected is not None)
        case Event.RELEASE:
            release = Release(IDEM, subject.token or 1, facts.failure, facts.delivered)
            (answer,) = await store.release([release], now_ms=now, policy=WALK)
            if expected is None:
                assert answer == Released(stale=True)
            elif expected.phase is Phase.DEAD:
                assert answer == Released(dead=True)
            else:
                assert answer == Released(visible_at_ms=expected.visible_at_ms)
        case Event.LAPSE | Event.WAIT_ENDS:
            pass  # time passes; the next claim (below, in observe) notices
        case Event.DEFER:
            changed = await store.defer(IDEM, facts.visible_at_ms, now)
            assert changed is (expected is not None)
        case Event.ACK | Event.DISCARD | Event.EXPIRE:
            settlement = Settlement(IDEM, SETTLED_BY[event], facts.failure)
            assert await store.settle([settlement], now_ms=now) == [expected is not None]
        case Event.REDRIVE:
            assert await store.redrive(IDEM, now) is (expected is not None)
        case Event.PRUNE:
            await append(store, new(TRAILER), now_ms=now)
            assert await store.prune(now + 1) == (1 if expected is not None else 0)
        case _:
            assert_never(event)


async def observe(store: Store, subject: Subject, outcome: Outcome, now_ms: int) -> None:
    """Check that the store shows the message in ``outcome``'s phase at ``now_ms``."""
    claimed = await claim(store, now_ms=now_ms, policy=WALK)
    leased = {lease.message.idem: lease for lease in claimed.leases}
    stored = await store.get(IDEM)
    if outcome.phase is Phase.GONE:
        assert stored is None
        assert IDEM not in leased
        return
    assert stored is not None
    assert stored.state is lifecycle.STORED[outcome.phase]
    if outcome.phase is Phase.PENDING:
        # Claimable now, with its count: the claim counts one more.
        assert leased[IDEM].message.attempts == outcome.attempts + 1
        return
    assert IDEM not in leased
    match outcome.phase:
        case Phase.LEASED:
            assert await store.extend(IDEM, subject.token, now_ms + WALK.lease_ms)
        case Phase.DEFERRED:
            visible_at = outcome.visible_at_ms
            assert IDEM not in [lease.message.idem for lease in (await wake(store, visible_at - 1))]
            (again,) = await wake(store, visible_at)
            assert (again.message.idem, again.message.attempts) == (IDEM, outcome.attempts + 1)
        case Phase.DEAD:
            assert IDEM in [ref.idem for ref in await store.list_dead_refs(RECIPIENT)]
    if outcome.reason is not None:
        assert stored.dead_reason == outcome.reason


async def wake(store: Store, now_ms: int) -> tuple[Lease, ...]:
    return (await claim(store, now_ms=now_ms, policy=WALK)).leases


# --- the walk ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "event", "knobs"),
    [
        pytest.param(*case, id=f"{case[0].value}-{case[1].value}-{case[2].label()}")
        for case in cases()
    ],
)
async def test_the_store_follows_the_table(
    store: Store,
    phase: Phase,
    event: Event,
    knobs: Knobs,
) -> None:
    subject = await enter(store, phase, knobs)
    assert dataclasses.replace(subject, token=0) == planned(phase, knobs)
    unchanged = Outcome(phase, subject.attempts, visible_at_ms=subject.visible_at_ms)
    now = instant(subject, event)
    facts = facts_of(subject, event, knobs, now)
    expected = lifecycle.step(phase, event, facts, WALK)
    await apply(store, subject, event, facts, expected)
    await observe(store, subject, expected or unchanged, now)


def test_the_cases_reach_every_outcome_of_every_row() -> None:
    reached: dict[tuple[Phase, Event], set[Phase]] = {}
    for phase, event, knobs in cases():
        subject = planned(phase, knobs)
        now = instant(subject, event)
        outcome = lifecycle.step(phase, event, facts_of(subject, event, knobs, now), WALK)
        if outcome is not None:
            reached.setdefault((phase, event), set()).add(outcome.phase)
    assert reached == {row: set(targets) for row, targets in TABLE.items()}


async def test_a_pruned_partitions_newest_message_is_never_delivered_again(store: Store) -> None:
    # A store may keep it for its numbering, but settled: a claim must not
    # take it for pending (JetStream did, once prune took its state away).
    (appended,) = await append(store, new(IDEM))
    assert appended.error is None
    assert await store.settle([Settlement(IDEM, MessageState.ACKED)], now_ms=T0) == [True]
    await store.prune(T0 + 1)
    assert IDEM not in [lease.message.idem for lease in await wake(store, AT)]
    stored = await store.get(IDEM)
    assert stored is None or stored.state is MessageState.ACKED
    assert await store.settle([Settlement(IDEM, MessageState.DEAD)], now_ms=AT) == [False]
