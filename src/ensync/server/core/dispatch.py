"""The delivery state machine: who gets which claimed message, and when a
lease or a wait ends. Sans-I/O: no awaits, no clock, no store.

Inputs are method calls carrying ``now`` (epoch ms); outputs are

* deliveries pushed to the clients' sinks (a transport's outbox; pushing
  never blocks, and the in-flight window bounds it);
* :meth:`Dispatcher.claims` — partitions to claim from the store, with how
  many messages the subscribers can take;
* ``leases.take_releases()`` — leases to hand back to the store
  (:mod:`ensync.server.core.leases`);
* :meth:`Dispatcher.next_deadline` — when to call :meth:`Dispatcher.tick`.

Invariants between calls:

* every lease this core holds is in exactly one subscription's
  ``in_flight`` and has one live entry in the heap (its deadline);
* a partition is in ``_partitions`` iff it has a subscriber;
* a partition is claimed by at most one claim at a time (``_claiming``);
* ``in_flight`` of a subscription never exceeds its window (``window``, or
  what its sink allows: ensync's session stream, whose client keeps the
  leases of buffered messages, takes ``session_window``).

One heap (:mod:`ensync.server.core.timeline`) holds lease deadlines,
partition wake-ups (a deferral or backoff ends) and the periodic session
sweep; stale entries are skipped lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ensync.server.config import EngineConfig
from ensync.server.core.leases import Held, Leases
from ensync.server.core.model import Delivery, EngineStats
from ensync.server.core.sessions import Session, Subscription
from ensync.server.core.timeline import Due, LeaseDue, Ref, Timeline
from ensync.server.store.base import Claim, Lease, Release

__all__ = ["ClaimRequest", "Dispatcher", "Held"]

_Key = tuple[str, str]
# Most messages asked of one claim: a page of the store.
_MAX_CLAIM = 256
# A claim that failed (store trouble) is tried again after this long.
_CLAIM_RETRY_MS = 1_000


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Claim up to ``limit`` messages of partition ``key`` for this core."""

    key: _Key
    limit: int


@dataclass(eq=False, slots=True)
class _Partition:
    subscribers: list[Subscription] = field(default_factory=list)
    next_subscriber: int = 0
    dirty: bool = True
    wake_at_ms: int | None = None

    def pick(self, window: int) -> Subscription | None:
        """The next eligible subscriber in round-robin order."""
        count = len(self.subscribers)
        for offset in range(count):
            index = (self.next_subscriber + offset) % count
            sub = self.subscribers[index]
            if sub.eligible(window):
                self.next_subscriber = (index + 1) % count
                return sub
        return None

    def capacity(self, window: int) -> int:
        return sum(s.room(window) for s in self.subscribers)


def _still_holds(sub: Subscription, partition: _Partition | None) -> bool:
    """Whether ``sub`` can still settle what it holds: subscribed, not
    paused, its session open and its outbox for the name there."""
    return (
        partition is not None
        and sub in partition.subscribers
        and not sub.paused
        and not sub.session.closed
        and sub.session.router.sink_for(sub.name) is not None
    )


class Dispatcher:
    """Sessions, subscriptions and this core's leases."""

    def __init__(self, config: EngineConfig, stats: EngineStats) -> None:
        self._config = config
        self._stats = stats
        self.sessions: dict[str, Session] = {}
        self._partitions: dict[_Key, _Partition] = {}
        self._claiming: set[_Key] = set()
        self._closed: list[Session] = []
        self._timeline = Timeline()
        # The leases this core holds (settle, extend, give back, releases).
        self.leases = Leases(self._timeline)
        self._sweep_ms = max(50, min(config.session_timeout_ms // 3, 10_000))
        self._sweep_at: int | None = None

    def configure(self, config: EngineConfig) -> None:
        """Use new tunables (window, session timeout) from now on."""
        self._config = config
        self._sweep_ms = max(50, min(config.session_timeout_ms // 3, 10_000))

    # ------------------------------------------------------------------ sessions

    def add_session(self, session: Session, now_ms: int) -> None:
        self.sessions[session.client_id] = session
        if self._sweep_at is None:
            self._sweep_at = now_ms + self._sweep_ms
            self._timeline.push(self._sweep_at, Due.SWEEP, None)

    def end_session(self, session: Session) -> None:
        """Drop a session: its leases go back (delivered again at once)."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.client_id, None)
        for sub in list(session.subscriptions.values()):
            self._detach(sub)
        session.subscriptions.clear()

    def take_closed(self) -> list[Session]:
        """Sessions the sweep expired: their routers must be closed."""
        closed, self._closed = self._closed, []
        return closed

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, name: str) -> None:
        if name in session.subscriptions:
            self._mark(session.app_id, name)
            return
        sub = Subscription(session=session, name=name)
        session.subscriptions[name] = sub
        partition = self._partitions.setdefault((session.app_id, name), _Partition())
        partition.subscribers.append(sub)
        partition.dirty = True

    def unsubscribe(self, session: Session, name: str) -> bool:
        sub = session.subscriptions.pop(name, None)
        if sub is None:
            return False
        self._detach(sub)
        return True

    def pause(self, session: Session, name: str, reason: str) -> None:
        session.paused[name] = reason
        sub = session.subscriptions.get(name)
        if sub is not None:
            self._give_back_all(sub)

    def resume(self, session: Session, name: str) -> None:
        if session.paused.pop(name, None) is not None:
            self._mark(session.app_id, name)

    def routes_changed(self, session: Session) -> None:
        """The transport opened or closed an outbox of this client."""
        for sub in list(session.subscriptions.values()):
            if sub.in_flight and session.router.sink_for(sub.name) is None:
                self._give_back_all(sub)
            self._mark(session.app_id, sub.name)

    # ------------------------------------------------------------------ claims

    def notify(self, recipient: str, name: str) -> None:
        """The store says the partition may have messages to claim."""
        self._mark(recipient, name)

    def claims(self) -> Iterator[ClaimRequest]:
        """Partitions to claim now; each is marked as claiming until
        :meth:`claimed` or :meth:`claim_failed`."""
        window = self._config.window
        for key, partition in self._partitions.items():
            if not partition.dirty or key in self._claiming:
                continue
            capacity = partition.capacity(window)
            if capacity <= 0:
                continue  # marked again when a slot frees
            partition.dirty = False
            self._claiming.add(key)
            yield ClaimRequest(key, min(capacity, _MAX_CLAIM))

    def claimed(self, key: _Key, limit: int, claim: Claim, now_ms: int) -> None:
        """Hand claimed messages to subscribers, round robin."""
        self._claiming.discard(key)
        self._stats.dead_lettered += len(claim.dead)
        self._stats.expired += len(claim.expired)
        partition = self._partitions.get(key)
        for lease in claim.leases:
            held = self.leases.get(lease.message.idem)
            if held is not None:
                # A client here has it already (a partition owner that lost
                # its leases, on a slot that moved or was read again, leases
                # it anew): that client keeps it under the new lease rather
                # than receive it twice, if it can still settle it.
                if _still_holds(held.subscription, partition):
                    self.leases.renew(held, lease)
                    continue
                self.leases.settled(lease.message.idem)  # its first lease is over
            sub = partition.pick(self._config.window) if partition is not None else None
            if sub is None:
                # The subscriber left while the store answered: give it back.
                release = Release(lease.message.idem, lease.token, delivered=False)
                self.leases.release(key, release)
                continue
            self._deliver(sub, lease)
        if partition is None:
            return
        if len(claim.leases) + len(claim.dead) + len(claim.expired) >= limit:
            partition.dirty = True  # there may be more
        if claim.next_visible_ms is not None:
            self._wake(key, partition, max(claim.next_visible_ms, now_ms))

    def claim_failed(self, key: _Key, now_ms: int) -> None:
        self._claiming.discard(key)
        partition = self._partitions.get(key)
        if partition is not None:
            self._wake(key, partition, now_ms + _CLAIM_RETRY_MS)

    # ------------------------------------------------------------------ time

    def wake(self, key: _Key, at_ms: int) -> None:
        """Claim the partition again at ``at_ms`` (a deferral or backoff ends then)."""
        partition = self._partitions.get(key)
        if partition is not None:
            self._wake(key, partition, at_ms)

    def gauges(self) -> tuple[int, int, int]:
        """(partitions, claiming, partitions waiting for a wake-up)."""
        waiting = sum(1 for p in self._partitions.values() if p.wake_at_ms is not None)
        return len(self._partitions), len(self._claiming), waiting

    def next_deadline(self) -> int | None:
        """When :meth:`tick` has something to do next."""
        return self._timeline.first(self._live)

    def tick(self, now_ms: int) -> None:
        """Everything due at ``now_ms``: leases past their deadline go back
        (they failed), waiting partitions are claimed again, silent sessions
        expire."""
        for when, kind, ref in self._timeline.pop_due(now_ms):
            if isinstance(ref, LeaseDue):
                self.leases.lapse(ref)
            elif isinstance(ref, tuple):
                partition = self._partitions.get(ref)
                if partition is not None and partition.wake_at_ms == when:
                    partition.wake_at_ms = None
                    partition.dirty = True
            elif kind is Due.SWEEP:
                self._sweep(now_ms)

    # ------------------------------------------------------------------ internals

    def _deliver(self, sub: Subscription, lease: Lease) -> None:
        message = lease.message
        sink = sub.session.router.sink_for(sub.name)
        assert sink is not None  # pick() checked it
        self.leases.hold(sub, lease)
        self._stats.delivered += 1
        if message.attempts > 1:
            self._stats.redelivered += 1
        sink.push(Delivery.from_stored(message))

    def _give_back_all(self, sub: Subscription) -> None:
        # A settled lease marks no claim (leases.settled): a partition whose
        # last claim was cut short by room is still dirty (claims() skips it
        # without clearing), and one whose last claim found fewer than asked
        # has nothing to claim until the store notifies. Marking on every
        # ack cost an empty claim per message. Leases given back do mark.
        self.leases.give_back_all(sub)
        self._mark(sub.session.app_id, sub.name)

    def _detach(self, sub: Subscription) -> None:
        self._give_back_all(sub)
        key = (sub.session.app_id, sub.name)
        partition = self._partitions.get(key)
        if partition is None:
            return
        if sub in partition.subscribers:
            partition.subscribers.remove(sub)
        if not partition.subscribers:
            del self._partitions[key]

    def _mark(self, recipient: str, name: str) -> None:
        partition = self._partitions.get((recipient, name))
        if partition is not None:
            partition.dirty = True

    def _wake(self, key: _Key, partition: _Partition, at_ms: int) -> None:
        if partition.wake_at_ms is not None and partition.wake_at_ms <= at_ms:
            return
        partition.wake_at_ms = at_ms
        self._timeline.push(at_ms, Due.WAKE, key)

    def _sweep(self, now_ms: int) -> None:
        timeout = self._config.session_timeout_ms
        for session in list(self.sessions.values()):
            idle = now_ms - session.last_seen_ms
            if idle > timeout and not session.router.is_attached():
                self.end_session(session)
                self._closed.append(session)
        if self.sessions:
            self._sweep_at = now_ms + self._sweep_ms
            self._timeline.push(self._sweep_at, Due.SWEEP, None)
        else:
            self._sweep_at = None

    def _live(self, when: int, ref: Ref) -> bool:
        """Whether a deadline still holds (a lease's, or a partition's wake-up)."""
        if isinstance(ref, LeaseDue):
            return self.leases.current(ref)
        if isinstance(ref, tuple):
            partition = self._partitions.get(ref)
            return partition is not None and partition.wake_at_ms == when
        return True
