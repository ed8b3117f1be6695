"""The lifecycle table and its decision functions, without a store
(``tests/conformance/test_lifecycle.py`` walks it on every backend)."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from ensync.server.store import DeliveryPolicy, MessageState, lifecycle
from ensync.server.store.lifecycle import STORED, TABLE, Event, Facts, Outcome, Phase
from ensync.server.store.sqlite import rows

__all__: list[str] = []

POLICY = DeliveryPolicy(lease_ms=1_000, max_deliveries=3, backoff_ms=(0, 500, 2_000))
NOW = 10_000
SETTLED = {Phase.ACKED, Phase.DEAD, Phase.EXPIRED}


def grid() -> list[Facts]:
    """Facts around every boundary the decisions look at."""
    return [
        Facts(
            now_ms=NOW,
            attempts=attempts,
            expires_at_ms=expires,
            failure=failure,
            delivered=delivered,
            visible_at_ms=visible_at,
        )
        for attempts, expires, failure, delivered, visible_at in itertools.product(
            (0, 1, 2, 3, 4),
            (None, NOW - 1, NOW, NOW + 1),
            (None, "handler failed"),
            (True, False),
            (NOW - 1, NOW, NOW + 1),
        )
    ]


def test_every_decision_stays_in_its_row_and_reaches_every_target() -> None:
    reached: dict[tuple[Phase, Event], set[Phase]] = {}
    for (phase, event), targets in TABLE.items():
        for facts in grid():
            outcome = lifecycle.step(phase, event, facts, POLICY)  # raises if off the row
            assert outcome is not None
            assert outcome.phase in targets
            reached.setdefault((phase, event), set()).add(outcome.phase)
    assert reached == {row: set(targets) for row, targets in TABLE.items()}


def test_a_pair_off_the_table_is_refused() -> None:
    for phase, event in itertools.product(Phase, Event):
        if (phase, event) not in TABLE:
            assert lifecycle.step(phase, event, Facts(now_ms=NOW), POLICY) is None


# --- the invariants at the top of the module -------------------------------------------


def test_settled_phases_change_only_by_prune_and_redrive() -> None:
    for (phase, event), targets in TABLE.items():
        if phase in SETTLED:
            assert event is Event.PRUNE or (phase, event) == (Phase.DEAD, Event.REDRIVE)
            assert targets <= {Phase.GONE, Phase.PENDING}
    assert not [row for row in TABLE if row[0] is Phase.GONE]


def test_only_a_claim_leases_and_only_a_leased_message_extends_or_releases() -> None:
    for (phase, event), targets in TABLE.items():
        if Phase.LEASED in targets and phase is not Phase.LEASED:
            assert event is Event.CLAIM
        if event in (Event.EXTEND, Event.RELEASE, Event.LAPSE):
            assert phase is Phase.LEASED


def test_every_phase_leads_to_gone() -> None:
    for start in Phase:
        seen = {start}
        queue = deque([start])
        while queue:
            phase = queue.popleft()
            for (source, _), targets in TABLE.items():
                if source is phase:
                    for target in targets - seen:
                        seen.add(target)
                        queue.append(target)
        assert Phase.GONE in seen, start


def test_claims_count_and_redrive_resets() -> None:
    claimed = lifecycle.step(Phase.PENDING, Event.CLAIM, Facts(NOW, attempts=2), POLICY)
    assert claimed == Outcome(Phase.LEASED, 3)
    redriven = lifecycle.step(Phase.DEAD, Event.REDRIVE, Facts(NOW, attempts=3), POLICY)
    assert redriven == Outcome(Phase.PENDING, 0, visible_at_ms=NOW)


# --- the decisions ---------------------------------------------------------------------------


def test_a_claim_expires_before_it_dead_letters() -> None:
    assert lifecycle.on_claim(0, NOW, NOW, POLICY) == (Phase.EXPIRED, lifecycle.TTL_PASSED)
    assert lifecycle.on_claim(3, NOW, NOW, POLICY)[0] is Phase.EXPIRED
    assert lifecycle.on_claim(3, NOW + 1, NOW, POLICY) == (
        Phase.DEAD,
        "delivery limit reached: 3 attempts without a settlement (last: ack deadline passed)",
    )
    assert lifecycle.on_claim(2, None, NOW, POLICY) == (Phase.LEASED, None)


def test_a_release_waits_the_backoff_after_a_failure_only() -> None:
    def release(attempts: int, failure: str | None, delivered: bool = True) -> Outcome:
        return lifecycle.on_release(
            attempts, failure=failure, delivered=delivered, now_ms=NOW, policy=POLICY
        )

    assert release(1, "x") == Outcome(Phase.PENDING, 1, visible_at_ms=NOW)  # backoff 0
    assert release(2, "x") == Outcome(Phase.DEFERRED, 2, visible_at_ms=NOW + 500)
    assert release(2, None) == Outcome(Phase.PENDING, 2, visible_at_ms=NOW)
    assert release(3, "x") == Outcome(
        Phase.DEAD,
        3,
        reason="delivery limit reached: 3 attempts without a settlement (last: x)",
    )


def test_a_release_that_never_reached_a_client_is_not_counted_nor_dead() -> None:
    for attempts in (1, 3, 4):
        outcome = lifecycle.on_release(
            attempts, failure=None, delivered=False, now_ms=NOW, policy=POLICY
        )
        assert outcome == Outcome(Phase.PENDING, attempts - 1, visible_at_ms=NOW)
    zero = lifecycle.on_release(0, failure=None, delivered=False, now_ms=NOW, policy=POLICY)
    assert zero.attempts == 0


def test_a_lapse_is_pending_at_once_or_dead() -> None:
    assert lifecycle.on_lapse(2, NOW, POLICY) == Outcome(Phase.PENDING, 2, visible_at_ms=NOW)
    assert lifecycle.on_lapse(3, NOW, POLICY).phase is Phase.DEAD
    # A silent holder keeps the lease through the backoff after its deadline.
    assert lifecycle.lapse_after_ms(1, POLICY) == 0
    assert lifecycle.lapse_after_ms(2, POLICY) == 500
    assert lifecycle.lapse_after_ms(9, POLICY) == 2_000


def test_a_deferral_to_now_or_before_is_at_once() -> None:
    assert lifecycle.on_defer(NOW - 1, NOW) is Phase.PENDING
    assert lifecycle.on_defer(NOW, NOW) is Phase.PENDING
    assert lifecycle.on_defer(NOW + 1, NOW) is Phase.DEFERRED


# --- what the stores read from the table ----------------------------------------------------


def test_every_phase_has_a_stored_state() -> None:
    assert set(STORED) == set(Phase)
    assert {state for state in STORED.values() if state is not None} == set(MessageState)
    assert STORED[Phase.GONE] is None


def test_guards_name_the_stored_states_an_event_moves_from() -> None:
    pending = frozenset({MessageState.PENDING})
    for event in (Event.CLAIM, Event.DEFER, Event.ACK, Event.DISCARD, Event.EXPIRE):
        assert lifecycle.stored_sources(event) == pending
    assert lifecycle.stored_sources(Event.REDRIVE) == {MessageState.DEAD}
    assert lifecycle.stored_sources(Event.PRUNE) == set(MessageState) - pending
    assert lifecycle.allows(MessageState.DEAD, Event.REDRIVE)
    assert not lifecycle.allows(MessageState.ACKED, Event.REDRIVE)
    assert not lifecycle.allows(MessageState.PENDING, Event.PRUNE)


def test_a_settlement_names_its_event_and_never_pending() -> None:
    assert lifecycle.settling(MessageState.ACKED) is Event.ACK
    assert lifecycle.settling(MessageState.DEAD) is Event.DISCARD
    assert lifecycle.settling(MessageState.EXPIRED) is Event.EXPIRE
    with pytest.raises(ValueError, match="PENDING"):
        lifecycle.settling(MessageState.PENDING)


def test_sqlite_guards_are_literals_its_partial_indexes_match() -> None:
    # messages_settled is "WHERE state != 0": prune must say exactly that.
    assert rows.state_guard(Event.PRUNE) == "state != 0"
    assert rows.state_guard(Event.ACK) == "state IN (0)"
    assert rows.state_guard(Event.DEFER) == "state IN (0)"
    assert rows.state_guard(Event.REDRIVE) == "state IN (2)"
