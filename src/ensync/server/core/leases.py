"""The leases one engine core holds: which subscription holds each claimed
message, until when, and the leases to hand back to the store.

Invariant: every lease held is in exactly one subscription's ``in_flight``
and has one live deadline in the :class:`~ensync.server.core.timeline.Timeline`.
Sans-I/O: the time is an argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ensync.server.core.sessions import Subscription
from ensync.server.core.timeline import Due, LeaseDue, Timeline
from ensync.server.store.base import Lease, Release, StoredMessage

__all__ = ["Held", "Leases"]

Key = tuple[str, str]


@dataclass(eq=False, slots=True)
class Held:
    """A lease this core holds for one of its subscriptions."""

    subscription: Subscription
    message: StoredMessage
    token: int
    deadline_ms: int

    @property
    def recipient(self) -> str:
        return self.message.recipient


class Leases:
    """Leases held, by idem, and the releases waiting to go to the store."""

    def __init__(self, timeline: Timeline) -> None:
        self._timeline = timeline
        self._held: dict[str, Held] = {}
        self._releases: list[tuple[Key, Release]] = []

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._held.values()))

    def get(self, idem: str) -> Held | None:
        """The lease on ``idem``, if this core holds it."""
        return self._held.get(idem)

    def hold(self, sub: Subscription, lease: Lease) -> Held:
        """``sub`` holds the claimed ``lease`` until its deadline."""
        message = lease.message
        held = Held(sub, message, lease.token, lease.deadline_ms)
        self._held[message.idem] = held
        sub.in_flight.add(message.idem)
        self._timeline.push(
            lease.deadline_ms, Due.LEASE, LeaseDue(message.idem, lease.token, lease.deadline_ms)
        )
        return held

    def renew(self, held: Held, lease: Lease) -> None:
        """The store leased a message this core holds again (its owner lost
        what it knew of the first lease, and claimed it anew): ``held`` goes
        on under the new lease; the client that has it needs no second copy."""
        held.token = lease.token
        held.deadline_ms = lease.deadline_ms
        held.message = lease.message
        self._timeline.push(
            lease.deadline_ms,
            Due.LEASE,
            LeaseDue(lease.message.idem, lease.token, lease.deadline_ms),
        )

    def settled(self, idem: str) -> None:
        """The message was settled or deferred: its lease, if ours, is over."""
        held = self._held.pop(idem, None)
        if held is not None:
            held.subscription.in_flight.discard(idem)

    def extended(self, idem: str, deadline_ms: int) -> None:
        """The lease on ``idem`` runs until ``deadline_ms`` now."""
        held = self._held.get(idem)
        if held is not None:
            held.deadline_ms = deadline_ms
            self._timeline.push(deadline_ms, Due.LEASE, LeaseDue(idem, held.token, deadline_ms))

    def give_back(self, idem: str) -> Held | None:
        """Stop holding a lease the client hands back; the caller releases it."""
        held = self._held.pop(idem, None)
        if held is not None:
            held.subscription.in_flight.discard(idem)
        return held

    def give_back_all(self, sub: Subscription) -> None:
        """Every lease of ``sub`` goes back to the store (delivered again at once)."""
        for idem in list(sub.in_flight):
            held = self._held.pop(idem, None)
            if held is not None:
                self._releases.append((held.message.partition, Release(idem, held.token)))
        sub.in_flight.clear()

    def release(self, key: Key, release: Release) -> None:
        """Hand ``release`` back to the store with the next batch."""
        self._releases.append((key, release))

    def take_releases(self) -> list[tuple[Key, Release]]:
        """Leases to hand back, with their partitions."""
        releases, self._releases = self._releases, []
        return releases

    def lapse(self, due: LeaseDue) -> None:
        """A lease deadline came up: a live one failed, and goes back."""
        held = self._held.get(due.idem)
        if held is None or not self.current(due):
            return
        del self._held[due.idem]
        held.subscription.in_flight.discard(due.idem)
        failed = Release(due.idem, due.token, failure="ack deadline passed")
        self._releases.append((held.message.partition, failed))

    def current(self, due: LeaseDue) -> bool:
        """Whether ``due`` is still the lease's deadline."""
        held = self._held.get(due.idem)
        return held is not None and held.token == due.token and held.deadline_ms == due.deadline_ms
