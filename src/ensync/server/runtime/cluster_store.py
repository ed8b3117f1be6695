"""The store of an engine node in a cluster: the owned partitions' store
together with the keeper of the node's share of the slots.

:class:`ClusterStore` is an :class:`~ensync.server.store.jetstream.owned_store.
OwnedStore` that, once open, keeps its share of the slots
(:class:`~ensync.server.runtime.slot_keeper.SlotKeeper`): a slot the keeper
takes is read from its log and served; a slot it drops or lets go is
forgotten at once; a slot whose log fails is let go, to be taken again
(by this node or another) from what the log holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ensync.server.core.ownership import LeaseTiming, slot_of
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.runtime.slot_keeper import SlotKeeper
from ensync.server.store.base import StoreError
from ensync.server.store.jetstream.nodes import NodeRegistry
from ensync.server.store.jetstream.owned_store import DEFAULT_SLOTS, OwnedStore
from ensync.server.store.jetstream.slots import SlotLease, SlotLeases

__all__ = ["ClusterStore"]

log = logging.getLogger(__name__)


class ClusterStore(OwnedStore):
    """An engine node's store on a NATS cluster, one owner per partition.

    :meth:`open` returns once the node serves its share of the slots (all of
    them when it is alone); calls on the partitions of other nodes' slots
    are refused with ``NotOwnedError``.

    Example::

        store = ClusterStore(["nats://10.0.0.1:4222"], namespace="prod", node="node-a")
        await store.open()
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        namespace: str = "ensync",
        replicas: int | None = None,
        slots: int = DEFAULT_SLOTS,
        creds: str | None = None,
        tls_ca: str | None = None,
        node: str | None = None,
        timing: LeaseTiming | None = None,
        ready_within_s: float = 30.0,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        super().__init__(
            servers,
            slot_of,
            namespace=namespace,
            replicas=replicas,
            slots=slots,
            creds=creds,
            tls_ca=tls_ca,
            node=node,
            clock=clock,
        )
        self._timing = timing or LeaseTiming()
        if self._timing.ttl_ms % 1000:
            raise ValueError("a slot lease's time to live is whole seconds")
        self._ready_within_s = ready_within_s
        self._keeper: SlotKeeper | None = None
        self._gaining: dict[int, asyncio.Task[None]] = {}
        self._letting_go: set[asyncio.Task[None]] = set()
        self.on_slot_failed(self._failed)

    async def open(self) -> None:
        """Open the store, join the live nodes and serve this node's share.

        Raises:
            NodeIdInUseError: a live node has this node's id.
            StoreError: as :meth:`OwnedStore.open`, or the share was not
                served within ``ready_within_s``.
        """
        await super().open()
        ttl_s = self._timing.ttl_ms // 1000
        stream, prefix = self.names.owned, self.names.owned_prefix
        self._keeper = SlotKeeper(
            SlotLeases(self.api, stream, prefix, self.node, ttl_s),
            NodeRegistry(self.api, stream, prefix, self.node, ttl_s),
            self.slot_count,
            self._timing,
            self._gained,
            self._lost,
        )
        try:
            await self._keeper.start()
            await self._serving_share()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Let every slot go (other nodes take them at once) and disconnect."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.stop(release=True)
        tasks = [*self._gaining.values(), *self._letting_go]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def _serving_share(self) -> None:
        keeper = self._keeper
        assert keeper is not None
        deadline = asyncio.get_running_loop().time() + self._ready_within_s
        while not (keeper.planned and all(self.serves(slot) for slot in keeper.owned)):
            if asyncio.get_running_loop().time() > deadline:
                raise StoreError(
                    f"node {self.node} did not serve its share of the slots within"
                    f" {self._ready_within_s:g} s"
                )
            await asyncio.sleep(0.02)

    def _gained(self, lease: SlotLease) -> None:
        task = asyncio.create_task(self._gain(lease), name=f"ensync-gain-{lease.slot}")
        self._gaining[lease.slot] = task
        task.add_done_callback(lambda _: self._gaining.pop(lease.slot, None))

    async def _gain(self, lease: SlotLease) -> None:
        try:
            await self.gain(lease)
        except StoreError as exc:
            log.warning("slot %d: could not take it over: %s", lease.slot, exc)
            self._failed(lease.slot)
        except Exception:
            # A bug, or a record this version cannot read: let the slot go
            # rather than hold it unserved.
            log.exception("slot %d: could not take it over", lease.slot)
            self._failed(lease.slot)

    def _lost(self, slot: int) -> None:
        task = self._gaining.pop(slot, None)
        if task is not None:
            task.cancel()
        self.lose(slot)

    def _failed(self, slot: int) -> None:
        keeper = self._keeper
        if keeper is not None:
            task = asyncio.get_running_loop().create_task(keeper.let_go(slot))
            self._letting_go.add(task)
            task.add_done_callback(self._letting_go.discard)
