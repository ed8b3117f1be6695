"""Which engine node owns which partition, as data: slots, their leases, the plan.

Engine nodes that share a store give each partition (recipient app, message
name) one owner at a time, which holds the partition's delivery state and
alone writes its log (docs/architecture.md, "One owner per partition").
Partitions are grouped in a fixed number of *slots* by a hash of their key,
and ownership is per slot: the number of leases and renewals stays bounded
however many partitions exist, and a slot's partitions move together.

This module is sans-I/O: the cluster runtime reads the store (live nodes,
slot owners), asks :func:`plan` what to acquire and release, and keeps one
:class:`SlotLease` per owned slot, telling it when renewals were sent and
answered. Times are milliseconds on the owner's own monotonic clock; no
decision compares two nodes' clocks.

Why a lease cannot be trusted past :meth:`SlotLease.serving`: the store
starts a lease's time to live when it stores the renewal, which is after the
owner sent it. Counting from the send, the owner's deadline falls before the
store lets the lease lapse, whatever the offset between the clocks; the
margin covers the clocks' rates (drift over seconds) and a pause between a
check and the work it allows. Past its deadline an owner stops delivering
and drops the slot; a new owner acquires it only after the store let it
lapse, and fences the old one's late writes (the store refuses them), so
the two never act on one partition at once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_SLOTS",
    "LeaseTiming",
    "Plan",
    "SlotLease",
    "assign",
    "fair_shares",
    "plan",
    "slot_of",
]

DEFAULT_SLOTS = 64
"""Slots of a cluster: several per node for balance, few enough to renew in one batch."""


def slot_of(app_id: str, name: str, slots: int) -> int:
    """The slot of the partition (``app_id``, ``name``): stable across nodes and versions."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, not {slots}")
    key = f"{app_id}\0{name}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"ensync-slot").digest()
    return int.from_bytes(digest, "big") % slots


def _score(node: str, slot: int) -> int:
    # Rendezvous hashing: each (node, slot) pair has a fixed score; a slot
    # prefers the live node that scores it highest.
    digest = hashlib.blake2b(
        f"{node}\0{slot}".encode(), digest_size=8, person=b"ensync-pref"
    ).digest()
    return int.from_bytes(digest, "big")


def fair_shares(slots: int, nodes: Iterable[str]) -> dict[str, int]:
    """How many slots each node should own: equal shares, the remainder to the first ids."""
    ordered = sorted(set(nodes))
    if not ordered:
        return {}
    base, extra = divmod(slots, len(ordered))
    return {node: base + (1 if index < extra else 0) for index, node in enumerate(ordered)}


def assign(slots: int, nodes: Iterable[str], owners: Mapping[int, str]) -> dict[int, str]:
    """The owner every slot should have, given the live ``nodes`` and today's ``owners``.

    Every node computes the same answer from the same inputs. A live owner
    keeps its slots up to its fair share (the ones it scores highest), so a
    node joining takes exactly its share from the others and a node leaving
    gives exactly its own; slots that need an owner go to the node that
    scores them highest among those with room.
    """
    capacity = fair_shares(slots, nodes)
    if not capacity:
        return {}
    target: dict[int, str] = {}
    kept: dict[str, list[int]] = {}
    for slot in range(slots):
        owner = owners.get(slot)
        if owner in capacity:
            kept.setdefault(owner, []).append(slot)
    for owner, held in kept.items():
        held.sort(key=functools.partial(_score, owner), reverse=True)
        for slot in held[: capacity[owner]]:
            target[slot] = owner
        capacity[owner] -= min(len(held), capacity[owner])
    open_slots = [slot for slot in range(slots) if slot not in target]
    candidates = sorted(
        ((_score(node, slot), node, slot) for slot in open_slots for node in capacity),
        reverse=True,
    )
    for _, node, slot in candidates:
        if slot not in target and capacity[node] > 0:
            target[slot] = node
            capacity[node] -= 1
    return target


@dataclass(frozen=True, slots=True)
class Plan:
    """What one node should do now: slots to acquire (free ones) and to release."""

    acquire: tuple[int, ...]
    release: tuple[int, ...]


def plan(slots: int, me: str, nodes: Sequence[str], owners: Mapping[int, str]) -> Plan:
    """``me``'s next moves towards :func:`assign`'s target.

    A slot is acquired only when it is free (no owner, or its owner is no
    longer among the live ``nodes``); one that should move is released by
    its owner first. Slots that do not move are not touched.
    """
    live = set(nodes) | {me}
    target = assign(slots, live, owners)
    acquire = tuple(
        slot
        for slot, node in sorted(target.items())
        if node == me and owners.get(slot) != me and owners.get(slot) not in live
    )
    release = tuple(
        slot for slot in range(slots) if owners.get(slot) == me and target.get(slot) != me
    )
    return Plan(acquire=acquire, release=release)


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How long a slot lease lives on the store, and how an owner keeps it.

    Attributes:
        ttl_ms: the store lets a lease lapse this long after storing its
            latest renewal.
        renew_every_ms: an owner renews this often.
        margin_ms: an owner stops serving a slot this long before the
            lease could lapse, counted from when it sent the renewal.
    """

    ttl_ms: int = 6_000
    renew_every_ms: int = 1_500
    margin_ms: int = 1_500

    def __post_init__(self) -> None:
        if min(self.ttl_ms, self.renew_every_ms, self.margin_ms) <= 0:
            raise ValueError("lease times must be positive")
        if self.renew_every_ms + self.margin_ms >= self.ttl_ms:
            raise ValueError(
                f"renew_every_ms ({self.renew_every_ms}) + margin_ms ({self.margin_ms}) must be"
                f" below ttl_ms ({self.ttl_ms}): a lease would lapse between renewals"
            )


class SlotLease:
    """An owner's lease on one slot, on the owner's monotonic clock.

    For example::

        lease = SlotLease(slot=7, epoch=3, timing=LeaseTiming(), acquired_sent_at_ms=now)
        if lease.renewal_due(now):
            sent = lease.renewal_sent(now)      # then write the renewal
            ...
            lease.renewed(sent)                 # when the store confirmed it
        if not lease.serving(now):
            ...                                 # stop delivering; drop the slot
    """

    __slots__ = ("_in_flight", "_last_sent_ms", "_valid_until_ms", "epoch", "slot", "timing")

    def __init__(
        self, slot: int, epoch: int, timing: LeaseTiming, acquired_sent_at_ms: int
    ) -> None:
        self.slot = slot
        self.epoch = epoch
        self.timing = timing
        self._last_sent_ms = acquired_sent_at_ms
        self._valid_until_ms = acquired_sent_at_ms + timing.ttl_ms - timing.margin_ms
        self._in_flight: int | None = None

    def serving(self, now_ms: int) -> bool:
        """Whether this node may still act as the slot's owner."""
        return now_ms < self._valid_until_ms

    @property
    def valid_until_ms(self) -> int:
        """When this node stops serving the slot unless a renewal is confirmed first."""
        return self._valid_until_ms

    def renewal_due(self, now_ms: int) -> bool:
        """Whether to send a renewal now (none is in flight, and it is time)."""
        return (
            self._in_flight is None
            and self.serving(now_ms)
            and now_ms - self._last_sent_ms >= self.timing.renew_every_ms
        )

    def renewal_sent(self, now_ms: int) -> int:
        """A renewal leaves now; returns the time to hand back to `renewed`."""
        self._in_flight = now_ms
        self._last_sent_ms = now_ms
        return now_ms

    def renewed(self, sent_at_ms: int) -> None:
        """The store confirmed the renewal sent at ``sent_at_ms``."""
        if self._in_flight == sent_at_ms:
            self._in_flight = None
        self._valid_until_ms = max(
            self._valid_until_ms, sent_at_ms + self.timing.ttl_ms - self.timing.margin_ms
        )

    def renewal_failed(self, sent_at_ms: int) -> None:
        """The renewal sent at ``sent_at_ms`` got no confirmation (the deadline stands)."""
        if self._in_flight == sent_at_ms:
            self._in_flight = None
