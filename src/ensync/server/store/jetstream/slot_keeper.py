"""One node's share of the slots on JetStream: taken, kept, let go, dropped.

A :class:`SlotKeeper` runs the plan of :mod:`ensync.server.store.ownership`
against the store (:mod:`ensync.server.store.jetstream.slots` and
``nodes``). Every turn it

1. drops the slots whose lease it can no longer trust
   (:meth:`~ensync.server.store.ownership.SlotLease.serving`: counted from
   the renewal's send, so it stops before the store can let the lease lapse),
2. renews the leases that are due (a refused renewal drops the slot at once),
3. keeps its node record alive, and, every renewal period,
4. reads the live nodes and the slots' owners, lets go of the slots beyond
   its share and takes free slots within it.

The reads of step 4 may be answered by a replica that lags: they only
suggest moves, and the store's compare-and-set on each lease decides them.

What the node does with a slot is its own: ``on_gained`` hears a slot taken
(with its store lease, whose fence sequence the slot's log writes expect),
``on_lost`` a slot dropped or let go. ``on_lost`` is called before a slot
is released to another node, never after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ensync._tasks import raise_if_cancelled
from ensync.server.store.base import StoreError
from ensync.server.store.jetstream import slots as store_slots
from ensync.server.store.jetstream.nodes import NodeRegistry
from ensync.server.store.jetstream.slots import SlotLeases
from ensync.server.store.ownership import LeaseTiming, SlotLease, assign, plan

__all__ = ["KeptSlot", "SlotKeeper", "monotonic_ms"]

log = logging.getLogger(__name__)


def monotonic_ms() -> int:
    """This process's monotonic clock, in milliseconds."""
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class KeptSlot:
    """A slot this node owns: the store's record of it and the owner's deadline."""

    stored: store_slots.SlotLease
    lease: SlotLease
    acquired_at_ms: int


class SlotKeeper:
    """Keeps one node's share of ``slots`` slots.

    Args:
        leases: the node's slot leases (its node id is the keeper's).
        nodes: the node's record among the live nodes.
        slots: the cluster's slot count.
        timing: lease time to live, renewal period, safety margin.
        on_gained: a slot was taken (its store lease).
        on_lost: a slot was dropped (its lease could not be trusted or
            renewed) or is being let go.
        info: what the node's record says of it (addresses, version).
        clock: milliseconds on a monotonic clock.

    Example::

        keeper = SlotKeeper(leases, nodes, 64, LeaseTiming(), on_gained, on_lost)
        await keeper.start()
        ...
        await keeper.stop()   # lets every slot go at once
    """

    def __init__(
        self,
        leases: SlotLeases,
        nodes: NodeRegistry,
        slots: int,
        timing: LeaseTiming,
        on_gained: Callable[[store_slots.SlotLease], None],
        on_lost: Callable[[int], None],
        *,
        info: Mapping[str, Any] | None = None,
        clock: Callable[[], int] = monotonic_ms,
    ) -> None:
        if timing.ttl_ms != leases.ttl_s * 1000:
            raise ValueError(
                f"the leases live {leases.ttl_s} s on the store, the timing says"
                f" {timing.ttl_ms} ms: they must agree"
            )
        self._leases = leases
        self._nodes = nodes
        self._slots = slots
        self._timing = timing
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._info = dict(info or {})
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._planned_at_ms: int | None = None
        self._rebalanced = False
        self._balanced = False
        self.owned: dict[int, KeptSlot] = {}
        self.node = leases.node
        # Every slot's owner as last read (replicas may lag: a hint only).
        self.owners: dict[int, str] = {}

    async def start(self) -> None:
        """Join the live nodes and keep a share of the slots until :meth:`stop`.

        Raises:
            NodeIdInUseError: a live node has this node's id.
        """
        await self._nodes.announce(self._info)
        self._task = asyncio.create_task(self._run(), name=f"ensync-slots-{self.node}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop keeping slots; with ``release``, let every owned slot go and
        leave the live nodes at once (else they lapse, as when a node dies)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for slot in list(self.owned):
            kept = self.owned.pop(slot)
            self._on_lost(slot)
            if release:
                await self._quietly(self._leases.release(kept.stored))
        if release:
            await self._quietly(self._nodes.leave())

    @property
    def planned(self) -> bool:
        """Whether the keeper has taken its share once since it started."""
        return self._rebalanced

    @property
    def balanced(self) -> bool:
        """Whether, at the last turn, the node held exactly its share (no slot
        of it still held by another live node, none beyond it)."""
        return self._balanced

    async def let_go(self, slot: int) -> None:
        """Stop owning ``slot`` and release its lease (its log failed: another
        node took it over, or a write's outcome is unknown); a later turn
        may take it again, reading its log afresh."""
        kept = self.owned.pop(slot, None)
        if kept is None:
            return
        self._on_lost(slot)
        await self._quietly(self._leases.release(kept.stored))

    def serving(self, slot: int) -> bool:
        """Whether this node may act as ``slot``'s owner now."""
        kept = self.owned.get(slot)
        return kept is not None and kept.lease.serving(self._clock())

    async def step(self) -> None:
        """One turn: drop, renew, keep the node record, and now and then rebalance."""
        self._drop_untrusted()
        await self._renew_due()
        now = self._clock()
        if self._planned_at_ms is None or now - self._planned_at_ms >= self._timing.renew_every_ms:
            self._planned_at_ms = now
            if not await self._nodes.renew():
                await self._nodes.announce(self._info)
            await self._rebalance()
            self._rebalanced = True

    async def _run(self) -> None:
        pause_s = self._timing.renew_every_ms / 4000
        while True:
            raise_if_cancelled()
            try:
                await self.step()
            except StoreError as exc:
                # NATS unreachable for a moment: leases still count down on
                # our clock, and the next turn drops what lapsed.
                log.warning("keeping slots: %s", exc)
            await asyncio.sleep(pause_s)

    def _drop_untrusted(self) -> None:
        now = self._clock()
        for slot, kept in list(self.owned.items()):
            if not kept.lease.serving(now):
                log.warning("slot %d: lease not renewed in time; stopped serving it", slot)
                self._drop(slot)

    def _drop(self, slot: int) -> None:
        if self.owned.pop(slot, None) is not None:
            self._on_lost(slot)

    async def _renew_due(self) -> None:
        now = self._clock()
        due = [kept for kept in self.owned.values() if kept.lease.renewal_due(now)]
        if due:
            await asyncio.gather(*(self._renew(kept, now) for kept in due))

    async def _renew(self, kept: KeptSlot, now_ms: int) -> None:
        sent = kept.lease.renewal_sent(now_ms)
        try:
            renewed = await self._leases.renew(kept.stored)
        except StoreError:
            kept.lease.renewal_failed(sent)
            raise
        slot = kept.stored.slot
        if renewed is None:  # lapsed meanwhile, or taken over
            log.warning("slot %d: renewal refused; stopped serving it", slot)
            self._drop(slot)
            return
        if self.owned.get(slot) is kept:
            kept.stored = renewed
            kept.lease.renewed(sent)

    async def read_owners(self) -> dict[int, str]:
        """Every leased slot's owner, read now (and kept in :attr:`owners`)."""
        held = await self._leases.owners(self._slots)
        self.owners = {slot: node for slot, (node, _) in held.items()}
        return self.owners

    async def _rebalance(self) -> None:
        live = list(await self._nodes.live())
        owners = dict(await self.read_owners())
        # What we dropped but the store still shows as ours must not be
        # taken again before it lapses: plan with the store's view.
        moves = plan(self._slots, self.node, live, owners)
        target = assign(self._slots, {*live, self.node}, owners)
        mine = {slot for slot, node in target.items() if node == self.node}
        for slot in moves.release:
            kept = self.owned.get(slot)
            if kept is None:
                continue
            self._drop(slot)  # stop serving first, then let go
            await self._leases.release(kept.stored)
        for slot in moves.acquire:
            sent = self._clock()
            stored = await self._leases.acquire(slot)
            if stored is None:
                continue  # another node was first
            self.owned[slot] = KeptSlot(
                stored, SlotLease(slot, stored.epoch, self._timing, sent), sent
            )
            self._on_gained(stored)
        self._balanced = set(self.owned) == mine

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except StoreError as exc:
            log.debug("letting go: %s", exc)
