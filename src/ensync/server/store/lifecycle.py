"""A message's life as data: its phases, the events that move it, one table.

A delivery (a message as addressed to one recipient app) is always in one
:class:`Phase`. What a store keeps on disk is coarser
(:class:`~ensync.server.store.base.MessageState`): three phases share the
stored state PENDING, and the stores tell them apart by what they hold in
memory (leases) or by times (``visible_at_ms``).

=========  ============  =====================================================
phase      stored state  what it means
=========  ============  =====================================================
PENDING    PENDING       claimable now: visible and not leased
LEASED     PENDING       claimed: the lease's token is live until its deadline
                         plus the redelivery backoff
DEFERRED   PENDING       claimable at ``visible_at_ms``: deferred, or waiting
                         out the backoff after a failed delivery
ACKED      ACKED         done; kept for replay until retention ends
DEAD       DEAD          discarded, or dead-lettered at the delivery limit
EXPIRED    EXPIRED       its TTL passed before a claim reached it
GONE       (no record)   pruned after retention: ``get`` answers ``None``
=========  ============  =====================================================

:data:`TABLE` maps ``(phase, event)`` to the phases the event can lead to.
A row with one target is unconditional. A row with several is decided by
the event's decision function, beside the table (:func:`on_claim`,
:func:`on_release`, :func:`on_lapse`, :func:`on_defer`), from the facts of
that moment; :func:`step` is the whole table as one function. A pair that
is not in the table is refused or changes nothing, as the contract says of
each call: ``claim`` does not return the message, ``extend``, ``defer``,
``redrive`` answer ``False``, ``settle`` answers ``False`` for it,
``release`` answers ``Released(stale=True)``, ``prune`` leaves it, and time
passing leaves it where it is.

TTL and the delivery limit are not events: nothing moves a message the
moment its TTL passes or its count reaches ``max_deliveries``. They are
facts the decisions read when an event reaches the message.

Invariants (``tests/unit/server/store/test_lifecycle.py`` checks them on
the table; ``tests/conformance/test_lifecycle.py`` walks every row, and
every pair that is not a row, on every backend):

* ACKED, DEAD and EXPIRED change only by PRUNE (to GONE) and, for DEAD, by
  REDRIVE (to PENDING, attempts back to 0). GONE never changes.
* Only a claim leases, and each claim counts one attempt. A release of a
  claim that never reached a client takes that attempt back; only a
  redrive resets the count.
* A message is never delivered after its TTL: a claim that reaches it
  expires it instead.
* A message delivered ``max_deliveries`` times is never leased again: it is
  dead-lettered when its lease ends (released or lapsed), or by the claim
  that reaches it if its count is already there.
* A lease ends once: settled, deferred, released or lapsed. Its token is
  stale from then on, and only a LEASED message can be extended or
  released.
* Nothing stays forever once settled: every phase leads to GONE (by an
  ack and a prune at the latest).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from ensync.server.store.base import DeliveryPolicy, MessageState

__all__ = [
    "DEADLINE_PASSED",
    "STORED",
    "TABLE",
    "TTL_PASSED",
    "Event",
    "Facts",
    "Outcome",
    "Phase",
    "allows",
    "claimed_attempts",
    "lapse_after_ms",
    "limit_reason",
    "on_claim",
    "on_defer",
    "on_lapse",
    "on_release",
    "redriven",
    "settling",
    "step",
    "stored_sources",
]


class Phase(enum.Enum):
    """Where a message stands (finer than the stored :class:`MessageState`)."""

    PENDING = "pending"
    LEASED = "leased"
    DEFERRED = "deferred"
    ACKED = "acked"
    DEAD = "dead"
    EXPIRED = "expired"
    GONE = "gone"


class Event(enum.Enum):
    """What can happen to a message: a store call, or time passing."""

    CLAIM = "claim"  # claim()
    EXTEND = "extend"  # extend() with the lease's token
    RELEASE = "release"  # release() with the lease's token
    LAPSE = "lapse"  # the lease's deadline plus backoff passed without news
    DEFER = "defer"  # defer()
    WAIT_ENDS = "wait ends"  # time reaches visible_at_ms
    ACK = "ack"  # settle(ACKED)
    DISCARD = "discard"  # settle(DEAD, reason)
    EXPIRE = "expire"  # settle(EXPIRED)
    REDRIVE = "redrive"  # redrive()
    PRUNE = "prune"  # prune() with a cutoff after the settlement


def _to(*phases: Phase) -> frozenset[Phase]:
    return frozenset(phases)


_SETTLED_BY_CALL = {
    Event.ACK: _to(Phase.ACKED),
    Event.DISCARD: _to(Phase.DEAD),
    Event.EXPIRE: _to(Phase.EXPIRED),
}

TABLE: Final[Mapping[tuple[Phase, Event], frozenset[Phase]]] = MappingProxyType(
    {
        (Phase.PENDING, Event.CLAIM): _to(Phase.LEASED, Phase.EXPIRED, Phase.DEAD),
        (Phase.PENDING, Event.DEFER): _to(Phase.PENDING, Phase.DEFERRED),
        **{(Phase.PENDING, event): to for event, to in _SETTLED_BY_CALL.items()},
        (Phase.LEASED, Event.EXTEND): _to(Phase.LEASED),
        (Phase.LEASED, Event.RELEASE): _to(Phase.PENDING, Phase.DEFERRED, Phase.DEAD),
        (Phase.LEASED, Event.LAPSE): _to(Phase.PENDING, Phase.DEAD),
        (Phase.LEASED, Event.DEFER): _to(Phase.PENDING, Phase.DEFERRED),
        **{(Phase.LEASED, event): to for event, to in _SETTLED_BY_CALL.items()},
        (Phase.DEFERRED, Event.WAIT_ENDS): _to(Phase.PENDING),
        (Phase.DEFERRED, Event.DEFER): _to(Phase.PENDING, Phase.DEFERRED),
        **{(Phase.DEFERRED, event): to for event, to in _SETTLED_BY_CALL.items()},
        (Phase.ACKED, Event.PRUNE): _to(Phase.GONE),
        (Phase.DEAD, Event.REDRIVE): _to(Phase.PENDING),
        (Phase.DEAD, Event.PRUNE): _to(Phase.GONE),
        (Phase.EXPIRED, Event.PRUNE): _to(Phase.GONE),
    }
)
"""``(phase, event) -> the phases it may lead to``; a missing pair is refused
or a no-op."""

STORED: Final[Mapping[Phase, MessageState | None]] = MappingProxyType(
    {
        Phase.PENDING: MessageState.PENDING,
        Phase.LEASED: MessageState.PENDING,
        Phase.DEFERRED: MessageState.PENDING,
        Phase.ACKED: MessageState.ACKED,
        Phase.DEAD: MessageState.DEAD,
        Phase.EXPIRED: MessageState.EXPIRED,
        Phase.GONE: None,
    }
)
"""The stored state of each phase (``None``: no record left)."""

_SOURCES: Final = MappingProxyType(
    {
        event: frozenset(
            state
            for (phase, on), _ in TABLE.items()
            if on is event and (state := STORED[phase]) is not None
        )
        for event in Event
    }
)

_SETTLING: Final = MappingProxyType(
    {
        MessageState.ACKED: Event.ACK,
        MessageState.DEAD: Event.DISCARD,
        MessageState.EXPIRED: Event.EXPIRE,
    }
)


def stored_sources(event: Event) -> frozenset[MessageState]:
    """The stored states a message may be in for ``event`` to move it (the
    guard of a store's write: ``WHERE state = ...``)."""
    return _SOURCES[event]


def allows(state: MessageState, event: Event) -> bool:
    """Whether ``event`` may move a message stored in ``state``."""
    return state in _SOURCES[event]


def settling(state: MessageState) -> Event:
    """The event a ``Settlement`` to ``state`` is.

    Raises:
        ValueError: ``state`` is PENDING (settling never returns a message
            to the queue; redrive does).
    """
    event = _SETTLING.get(state)
    if event is None:
        raise ValueError("settle() moves a message out of PENDING; use redrive()")
    return event


# --- the decisions of conditional rows ------------------------------------------

DEADLINE_PASSED: Final = "ack deadline passed"
"""The failure of a delivery whose lease ran out."""
TTL_PASSED: Final = "ttl expired"
"""The reason of a message expired by a claim."""

_LEASES: Final = (Phase.LEASED, None)
_EXPIRES: Final = (Phase.EXPIRED, TTL_PASSED)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where an event took a message.

    ``attempts`` counts its deliveries from now on; ``visible_at_ms`` is when
    it is claimable (PENDING, DEFERRED; 0 otherwise); ``reason`` why it was
    settled (DEAD, EXPIRED), when the store chose it.
    """

    phase: Phase
    attempts: int
    visible_at_ms: int = 0
    reason: str | None = None


def limit_reason(attempts: int, failure: str | None) -> str:
    """The dead-letter reason when the delivery limit is reached."""
    reason = f"delivery limit reached: {attempts} attempts without a settlement"
    return reason + (f" (last: {failure})" if failure else "")


def claimed_attempts(attempts: int) -> int:
    """The count of a message a claim leases, which had ``attempts``: every
    claim counts one delivery."""
    return attempts + 1


def lapse_after_ms(attempts: int, policy: DeliveryPolicy) -> int:
    """How long past its deadline a lease lapses (LAPSE): the backoff after
    ``attempts`` deliveries. A holder that is alive releases at the deadline
    and the message waits out that backoff; one that stays silent is
    presumed gone once both passed."""
    return policy.backoff_after(attempts)


def on_claim(
    attempts: int, expires_at_ms: int | None, now_ms: int, policy: DeliveryPolicy
) -> tuple[Phase, str | None]:
    """(PENDING, CLAIM): where a claim that reaches the message takes it, and
    the reason if it settles it.

    EXPIRED if its TTL passed (it is never delivered late), DEAD if it was
    delivered ``max_deliveries`` times already, else LEASED (counted with
    :func:`claimed_attempts`). Allocates nothing on the common path.
    """
    if expires_at_ms is not None and expires_at_ms <= now_ms:
        return _EXPIRES
    if attempts >= policy.max_deliveries:
        return Phase.DEAD, limit_reason(attempts, DEADLINE_PASSED)
    return _LEASES


def on_release(
    attempts: int,
    *,
    failure: str | None,
    delivered: bool,
    now_ms: int,
    policy: DeliveryPolicy,
) -> Outcome:
    """(LEASED, RELEASE): a lease with ``attempts`` given back unsettled.

    A claim that never reached a client (``delivered=False``) is not
    counted. At the delivery limit the message is DEAD; after a failure it
    waits out the backoff (DEFERRED, or PENDING when the backoff is 0);
    without one (client gone, paused) it is PENDING at once.
    """
    counted = attempts if delivered else max(0, attempts - 1)
    if delivered and counted >= policy.max_deliveries:
        return Outcome(Phase.DEAD, counted, reason=limit_reason(counted, failure))
    wait_ms = policy.backoff_after(counted) if failure is not None else 0
    phase = Phase.DEFERRED if wait_ms > 0 else Phase.PENDING
    return Outcome(phase, counted, visible_at_ms=now_ms + wait_ms)


def on_lapse(attempts: int, now_ms: int, policy: DeliveryPolicy) -> Outcome:
    """(LEASED, LAPSE): the lease ran out (:func:`lapse_after_ms`) without news.

    The backoff has passed already, so the message is PENDING at once, or
    DEAD at the delivery limit.
    """
    if attempts >= policy.max_deliveries:
        return Outcome(Phase.DEAD, attempts, reason=limit_reason(attempts, DEADLINE_PASSED))
    return Outcome(Phase.PENDING, attempts, visible_at_ms=now_ms)


def on_defer(visible_at_ms: int, now_ms: int) -> Phase:
    """(PENDING | LEASED | DEFERRED, DEFER): claimable again at
    ``visible_at_ms``; a time not after now means at once (PENDING)."""
    return Phase.PENDING if visible_at_ms <= now_ms else Phase.DEFERRED


def redriven(now_ms: int) -> Outcome:
    """(DEAD, REDRIVE): pending again, claimable now, its count back to 0."""
    return Outcome(Phase.PENDING, 0, visible_at_ms=now_ms)


# --- the table as one function ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What the decisions read when an event reaches a message.

    ``attempts`` counts its deliveries so far (a lease's own included);
    ``failure`` is why a release gave it back (or the reason a settlement
    gives); ``delivered`` is a release's; ``visible_at_ms`` is the time a
    deferral asks for, or when a DEFERRED message's wait ends.
    """

    now_ms: int
    attempts: int = 0
    expires_at_ms: int | None = None
    failure: str | None = None
    delivered: bool = True
    visible_at_ms: int = 0


def step(phase: Phase, event: Event, facts: Facts, policy: DeliveryPolicy) -> Outcome | None:
    """Where ``event`` takes a message in ``phase``; ``None`` if the pair is
    not in :data:`TABLE` (refused, or nothing happens).

    What the walks of the table compare every store with; the stores call
    the decision functions themselves.
    """
    targets = TABLE.get((phase, event))
    if targets is None:
        return None
    outcome = _decide(event, facts, policy)
    if outcome.phase not in targets:
        # A decision that disagrees with the table is our bug.
        raise RuntimeError(f"{event.value} took {phase.value} to {outcome.phase.value}")
    return outcome


def _decide(event: Event, facts: Facts, policy: DeliveryPolicy) -> Outcome:
    attempts, now_ms = facts.attempts, facts.now_ms
    match event:
        case Event.CLAIM:
            phase, reason = on_claim(attempts, facts.expires_at_ms, now_ms, policy)
            if phase is Phase.LEASED:
                return Outcome(phase, claimed_attempts(attempts))
            return Outcome(phase, attempts, reason=reason)
        case Event.RELEASE:
            return on_release(
                attempts,
                failure=facts.failure,
                delivered=facts.delivered,
                now_ms=now_ms,
                policy=policy,
            )
        case Event.LAPSE:
            return on_lapse(attempts, now_ms, policy)
        case Event.DEFER:
            phase = on_defer(facts.visible_at_ms, now_ms)
            return Outcome(phase, attempts, visible_at_ms=facts.visible_at_ms)
        case Event.WAIT_ENDS:
            return Outcome(Phase.PENDING, attempts, visible_at_ms=facts.visible_at_ms)
        case Event.EXTEND:
            return Outcome(Phase.LEASED, attempts)
        case Event.ACK:
            return Outcome(Phase.ACKED, attempts)
        case Event.DISCARD:
            return Outcome(Phase.DEAD, attempts, reason=facts.failure)
        case Event.EXPIRE:
            return Outcome(Phase.EXPIRED, attempts, reason=facts.failure)
        case Event.REDRIVE:
            return redriven(now_ms)
        case Event.PRUNE:
            return Outcome(Phase.GONE, attempts)
