"""The store of an engine node in a cluster: the owned partitions' store,
the keeper of the node's share of the slots, and the way to the others.

:class:`ClusterStore` is an :class:`~ensync.server.store.jetstream.owned_store.
OwnedStore` that, once open, keeps its share of the slots
(:class:`~ensync.server.store.jetstream.slot_keeper.SlotKeeper`): a slot the keeper
takes is read from its log and served; a slot it drops or lets go is
forgotten at once; a slot whose log fails is let go, to be taken again
(by this node or another) from what the log holds.

Every store call is answered whichever node owns its partition: calls on
partitions served here run here; the others go to their owner
(:mod:`ensync.server.store.jetstream.peers`), found from the slot leases
(and, for calls that name only a message, from the slot its id carries).
While a slot moves, a call waits for its new owner, up to ``route_within_s``.
Reads of every app's dead letters and backlog ask every owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ensync.server.store import peer_calls as calls
from ensync.server.store.base import (
    AppendDone,
    Appended,
    Claim,
    DeadRef,
    DeliveryPolicy,
    NewMessage,
    Release,
    Released,
    Settlement,
    StoredMessage,
    StoreError,
)
from ensync.server.store.idems import slot_in
from ensync.server.store.jetstream.nodes import NodeRegistry
from ensync.server.store.jetstream.owned_store import DEFAULT_SLOTS, OwnedStore
from ensync.server.store.jetstream.peers import News, PeerClient, PeerServer, notes_subject
from ensync.server.store.jetstream.slot_keeper import SlotKeeper
from ensync.server.store.jetstream.slots import SlotLease, SlotLeases
from ensync.server.store.ownership import LeaseTiming, slot_of
from ensync.server.store.peer_calls import Failed, NotServed

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

__all__ = ["ClusterStore", "wall_clock_ms"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
_T = TypeVar("_T")
_LOCAL: Any = object()  # "this node serves the slot": the call runs here


def wall_clock_ms() -> int:
    """Epoch milliseconds, now."""
    return time.time_ns() // 1_000_000


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
        route_within_s: float = 15.0,
        serve: bool = True,
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
        self._route_within_s = route_within_s
        self._serve = serve
        self._keeper: SlotKeeper | None = None
        # Without a keeper (serve=False): who owns which slot, as last read.
        self._reader: SlotLeases | None = None
        self._owner_map: dict[int, str] = {}
        self._server: PeerServer | None = None
        self._peers: PeerClient | None = None
        self._notes: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._news: News | None = None
        self._gaining: dict[int, asyncio.Task[None]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self.on_slot_failed(self._failed)

    async def open(self) -> None:
        """Open the store, join the live nodes and serve this node's share
        (without ``serve``: only read who owns what, and ask them).

        Raises:
            NodeIdInUseError: a live node has this node's id.
            StoreError: as :meth:`OwnedStore.open`, or the share was not
                served within ``ready_within_s``.
        """
        await super().open()
        ttl_s = self._timing.ttl_ms // 1000
        stream, prefix = self.names.owned, self.names.owned_prefix
        nc = self._nc
        assert nc is not None
        if not self._serve:
            self._reader = SlotLeases(self.api, stream, prefix, self.node, ttl_s)
            self._peers = PeerClient(nc, self.names.peers_prefix)
            try:
                await self._read_owners()
            except BaseException:
                await self.close()
                raise
            return
        self._keeper = SlotKeeper(
            SlotLeases(self.api, stream, prefix, self.node, ttl_s),
            NodeRegistry(self.api, stream, prefix, self.node, ttl_s),
            self.slot_count,
            self._timing,
            self._gained,
            self._lost,
        )
        # Outside every stream's subjects: JetStream would store the requests.
        peers = self.names.peers_prefix
        try:
            self._server = PeerServer(nc, self, peers)
            await self._server.start()
            self._peers = PeerClient(nc, peers)
            self._news = News(
                self.node,
                self._peers,
                lambda key: self._owners().get(self.slot_of(*key)),
                self._book.notify,
            )
            self._notes = await nc.subscribe(notes_subject(peers, self.node), cb=self._news.heard)
            await self._keeper.start()
            await self._serving_share()
        except BaseException:
            await self.close()
            raise
        self._watcher = asyncio.create_task(self._news.watch_forever(), name="ensync-peer-watch")

    async def close(self) -> None:
        """Let every slot go (other nodes take them at once) and disconnect."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.stop(release=True)
        if self._server is not None:
            await self._server.stop()
        if self._peers is not None:
            await self._peers.close()
        tasks = [*self._gaining.values(), *self._chores]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def _serving_share(self) -> None:
        """Wait until this node serves its share: what it owns is read, and
        the slots the other nodes give up for it are taken (those, for a
        few lease periods at most: a node that does not let go is not
        waited for)."""
        keeper = self._keeper
        assert keeper is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_within_s
        balance_by = loop.time() + 2 * self._timing.ttl_ms / 1000
        while True:
            serving = keeper.planned and all(self.serves(slot) for slot in keeper.owned)
            if serving and (keeper.balanced or loop.time() > balance_by):
                return
            if loop.time() > deadline:
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
        except Exception as exc:
            # The store failed, or a record this version cannot read (a bug):
            # let the slot go rather than hold it unserved.
            trace = not isinstance(exc, StoreError)
            log.warning("slot %d: could not take it over: %s", lease.slot, exc, exc_info=trace)
            self._failed(lease.slot)

    def _lost(self, slot: int) -> None:
        task = self._gaining.pop(slot, None)
        if task is not None:
            task.cancel()
        self.lose(slot)

    def _failed(self, slot: int) -> None:
        keeper = self._keeper
        if keeper is not None:
            self._spawn(keeper.let_go(slot), f"ensync-let-go-{slot}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # --- routing -----------------------------------------------------------------

    def _owners(self) -> dict[int, str]:
        return self._keeper.owners if self._keeper is not None else self._owner_map

    async def _read_owners(self) -> dict[int, str]:
        if self._keeper is not None:
            return await self._keeper.read_owners()
        if self._reader is not None:
            held = await self._reader.owners(self.slot_count)
            self._owner_map = {slot: node for slot, (node, _) in held.items()}
        return self._owner_map

    async def _ask(self, slot: int, call: Callable[[int], calls.PeerCall]) -> tuple[Any, int]:
        """``slot``'s owner's answer to ``call(waited_ms)``, or ``_LOCAL``
        when this node serves the slot; and how long it waited.

        Waits for an owner while the slot moves. The caller's times were
        read before the wait: a call made after it is given them moved on
        by the wait (a lease taken with a time seconds old would be over
        before it began).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._route_within_s
        failure = f"slot {slot} has no owner"
        while True:
            self._check_open()
            waited_ms = int((loop.time() - started) * 1000)
            if self.serves(slot):
                return _LOCAL, waited_ms
            peers = self._peers
            owner = self._owners().get(slot)
            if owner is not None and owner != self.node and peers is not None:
                try:
                    answer = await peers.call(owner, call(waited_ms))
                except StoreError as exc:
                    failure = str(exc)
                else:
                    if isinstance(answer, Failed):
                        raise StoreError(answer.message)
                    if not isinstance(answer, NotServed):
                        return answer, waited_ms
                    failure = f"node {owner} no longer serves slot {slot}"
            if loop.time() > deadline:
                raise StoreError(f"{failure} (waited {self._route_within_s:g} s)")
            await asyncio.sleep(0.05)
            if not self.serves(slot):
                try:
                    await self._read_owners()
                except StoreError as exc:
                    failure = str(exc)

    async def _routed(
        self,
        slot: int | None,
        call: Callable[[int], calls.PeerCall],
        local: Callable[[int], Awaitable[_T]],
    ) -> _T:
        """One call, answered where ``slot`` is served; ``call`` and
        ``local`` take how long routing waited (ms), to move times on."""
        if slot is None or self.serves(slot):
            return await local(0)
        answer, waited_ms = await self._ask(slot, call)
        return await local(waited_ms) if answer is _LOCAL else answer

    async def _grouped(
        self,
        slots: Sequence[int | None],
        call: Callable[[list[int], int], calls.PeerCall],
        local: Callable[[list[int], int], Awaitable[Sequence[_T]]],
    ) -> list[_T]:
        """Items grouped by slot, each group answered where it is served, in
        order (``call`` and ``local`` also take the wait, as in :meth:`_routed`)."""
        out: list[Any] = [None] * len(slots)
        groups: dict[int | None, list[int]] = {}
        for index, slot in enumerate(slots):
            groups.setdefault(None if slot is None or self.serves(slot) else slot, []).append(index)

        async def run(slot: int | None, indexes: list[int]) -> None:
            answer, waited_ms = (
                (_LOCAL, 0)
                if slot is None
                else await self._ask(slot, lambda waited: call(indexes, waited))
            )
            found = await local(indexes, waited_ms) if answer is _LOCAL else answer
            for index, value in zip(indexes, found, strict=True):
                out[index] = value

        await asyncio.gather(*(run(slot, indexes) for slot, indexes in groups.items()))
        return out

    # --- the store calls, wherever their partition is served ----------------------

    async def append(
        self, batch: Sequence[NewMessage], *, now_ms: int, dedupe_since_ms: int
    ) -> list[Appended]:
        self._check_open()
        local_append = super().append
        return await self._grouped(
            [self.slot_of(m.recipient, m.name) for m in batch],
            lambda picked, waited: calls.Append(
                tuple(batch[i] for i in picked), now_ms + waited, dedupe_since_ms + waited
            ),
            lambda picked, waited: local_append(
                [batch[i] for i in picked],
                now_ms=now_ms + waited,
                dedupe_since_ms=dedupe_since_ms + waited,
            ),
        )

    def append_soon(
        self,
        batch: Sequence[NewMessage],
        *,
        now_ms: int,
        dedupe_since_ms: int,
        done: AppendDone,
    ) -> None:
        self._check_open()
        if all(self.serves(self.slot_of(m.recipient, m.name)) for m in batch):
            super().append_soon(batch, now_ms=now_ms, dedupe_since_ms=dedupe_since_ms, done=done)
            return

        async def appending() -> None:
            try:
                results: list[Appended] | StoreError = await self.append(
                    batch, now_ms=now_ms, dedupe_since_ms=dedupe_since_ms
                )
            except StoreError as exc:
                results = exc
            done(results)

        self._spawn(appending(), "ensync-forward-append")

    async def claim(
        self, recipient: str, name: str, *, limit: int, now_ms: int, policy: DeliveryPolicy
    ) -> Claim:
        self._check_open()
        slot = self.slot_of(recipient, name)
        local_claim = super().claim
        if not self.serves(slot) and self._news is not None:
            self._news.waiting_for((recipient, name))
        return await self._routed(
            slot,
            lambda waited: calls.ClaimFrom(
                self.node, recipient, name, limit, now_ms + waited, policy
            ),
            lambda waited: local_claim(
                recipient, name, limit=limit, now_ms=now_ms + waited, policy=policy
            ),
        )

    async def extend(self, idem: str, token: int, deadline_ms: int) -> bool:
        self._check_open()
        local_extend = super().extend
        return await self._routed(
            slot_in(idem, self.slot_count),
            lambda waited: calls.Extend(idem, token, deadline_ms + waited),
            lambda waited: local_extend(idem, token, deadline_ms + waited),
        )

    async def release(
        self, releases: Sequence[Release], *, now_ms: int, policy: DeliveryPolicy
    ) -> list[Released]:
        self._check_open()
        local_release = super().release
        return await self._grouped(
            [slot_in(r.idem, self.slot_count) for r in releases],
            lambda picked, waited: calls.ReleaseMany(
                tuple(releases[i] for i in picked), now_ms + waited, policy
            ),
            lambda picked, waited: local_release(
                [releases[i] for i in picked], now_ms=now_ms + waited, policy=policy
            ),
        )

    async def defer(self, idem: str, visible_at_ms: int, now_ms: int) -> bool:
        self._check_open()
        local_defer = super().defer
        return await self._routed(
            slot_in(idem, self.slot_count),
            lambda waited: calls.Defer(idem, visible_at_ms, now_ms + waited),
            lambda waited: local_defer(idem, visible_at_ms, now_ms + waited),
        )

    async def settle(self, settlements: Sequence[Settlement], *, now_ms: int) -> list[bool]:
        self._check_open()
        local_settle = super().settle
        return await self._grouped(
            [slot_in(s.idem, self.slot_count) for s in settlements],
            lambda picked, waited: calls.SettleMany(
                tuple(settlements[i] for i in picked), now_ms + waited
            ),
            lambda picked, waited: local_settle(
                [settlements[i] for i in picked], now_ms=now_ms + waited
            ),
        )

    async def get(self, idem: str) -> StoredMessage | None:
        self._check_open()
        local_get = super().get
        return await self._routed(
            slot_in(idem, self.slot_count), lambda _: calls.Get(idem), lambda _: local_get(idem)
        )

    async def redrive(self, idem: str, now_ms: int) -> bool:
        self._check_open()
        local_redrive = super().redrive
        return await self._routed(
            slot_in(idem, self.slot_count),
            lambda waited: calls.Redrive(idem, now_ms + waited),
            lambda waited: local_redrive(idem, now_ms + waited),
        )

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        self._check_open()
        dead = await super().list_dead(recipient, limit)
        for found in await self._everywhere(calls.Dead(recipient, limit)):
            dead += found
        dead.sort(key=lambda m: m.settled_at_ms or 0, reverse=True)
        return dead[: max(limit, 0)]

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        self._check_open()
        refs = await super().list_dead_refs(recipient)
        for found in await self._everywhere(calls.DeadRefs(recipient)):
            refs += found
        return sorted(refs)

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        counts = await super().backlog()
        for found in await self._everywhere(calls.Backlog()):
            for app_id, count in found.items():
                counts[app_id] = counts.get(app_id, 0) + count
        return counts

    async def _everywhere(self, call: calls.PeerCall) -> list[Any]:
        """``call`` answered by every other node that owns a slot."""
        peers = self._peers
        if peers is None:
            return []
        owners = set((await self._read_owners()).values()) - {self.node}
        answers = await asyncio.gather(*(peers.call(node, call) for node in sorted(owners)))
        out = []
        for answer in answers:
            if isinstance(answer, Failed):
                raise StoreError(answer.message)
            if not isinstance(answer, NotServed):
                out.append(answer)
        return out
