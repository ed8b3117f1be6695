"""A :class:`~ensync.server.store.base.Store` on JetStream with one owner per partition.

Each partition belongs to a slot, and a node serves only the partitions of
the slots it owns (:mod:`.slots`): their delivery state lives in this
process, in the same lease book and numbering as the single-node backends
(:class:`~ensync.server.store.local.LocalMessages`), over an
:class:`~.owned.OwnedTable` that writes every change through the slot's log
before answering. A call on a partition this node does not serve is refused
with :class:`~.owned.NotOwnedError` (an append with the error in its
result): the engine forwards it to the owner.

Who owns which slot is decided outside the store, by the node's slot keeper
(:mod:`ensync.server.store.jetstream.slot_keeper`), which calls :meth:`OwnedStore.gain`
and :meth:`OwnedStore.lose`. Apps and client sessions are shared records
(:class:`~.apps.Apps`), as on the other JetStream backend.

The namespace records layout 2 and its slot count when it is first used;
the slot count never changes afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ensync.server.store.base import AppRecord, Claim, DeliveryPolicy, NewMessage, StoreError
from ensync.server.store.jetstream.api import JetStreamApi, RejectedError
from ensync.server.store.jetstream.apps import Apps
from ensync.server.store.jetstream.connection import connect
from ensync.server.store.jetstream.layout import ensure_layout
from ensync.server.store.jetstream.owned import NotOwnedError, OwnedTable
from ensync.server.store.jetstream.partition_logs import recover_slot
from ensync.server.store.jetstream.records import Names
from ensync.server.store.jetstream.slots import SlotLease
from ensync.server.store.jetstream.streams import ensure_streams
from ensync.server.store.local import LocalMessages

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["DEFAULT_SLOTS", "OwnedStore"]

log = logging.getLogger(__name__)

#: Slots of a new namespace: a partition's owner changes a slot at a time.
DEFAULT_SLOTS = 64

Key = tuple[str, str]


class OwnedStore(Apps, LocalMessages):
    """The partitions of the slots this node owns, on NATS JetStream.

    Args:
        servers: NATS URLs; the client fails over between them.
        slot_of: the slot of a partition, given the slot count
            (``ensync.server.store.ownership.slot_of``).
        namespace: prefix of every stream and subject.
        replicas: copies JetStream keeps of each stream it creates (existing
            ones must have as many); ``None``: as those that exist.
        slots: the slot count a new namespace records (an existing one keeps its own).
        creds: a NATS credentials file.
        tls_ca: a CA bundle to verify the servers with.
        node: this node's id.
        clock: epoch milliseconds.

    Example::

        store = OwnedStore(["nats://10.0.0.1:4222"], slot_of)
        await store.open()
        await store.gain(lease)     # the keeper took a slot
        ...
        store.lose(lease.slot)      # and let it go
    """

    def __init__(
        self,
        servers: Sequence[str],
        slot_of: Callable[[str, str, int], int],
        *,
        namespace: str = "ensync",
        replicas: int | None = None,
        slots: int = DEFAULT_SLOTS,
        creds: str | None = None,
        tls_ca: str | None = None,
        node: str | None = None,
        clock: Callable[[], int],
        dedupe_max_keys: int = 100_000,
    ) -> None:
        if not servers:
            raise ValueError("OwnedStore needs at least one NATS URL")
        if replicas not in (None, 1, 3, 5):
            raise ValueError(f"replicas must be 1, 3 or 5, not {replicas}")
        if not 1 <= slots <= 1024:
            raise ValueError(f"slots must be 1 to 1024, not {slots}")
        self.names = Names(namespace)
        self._servers = list(servers)
        self._replicas = replicas
        self._creds = creds
        self._tls_ca = tls_ca
        self._node = node or secrets.token_hex(4)
        self._slot_count = slots
        self._slot_fn = slot_of
        self._state = "new"
        self._nc: Client | None = None
        self._api: JetStreamApi | None = None
        self._apps: dict[str, AppRecord] = {}
        self._apps_version = -1
        self._lost_listeners: list[Callable[[int], None]] = []
        self._table = OwnedTable(
            self.names.owned,
            self.names.owned_prefix,
            lambda key: slot_of(key[0], key[1], self._slot_count),
            on_failed=self._log_failed,
            clock=clock,
        )
        LocalMessages.__init__(self, self._table, dedupe_max_keys=dedupe_max_keys)

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the streams that do not exist, check those that do
        and the namespace's layout. Serves no slot until :meth:`gain`.

        Raises:
            LayoutError: the NATS server is too old, or the namespace has
                another layout.
            StreamConfigError: an existing stream is not as this store needs.
            StoreError: opened before, or NATS unreachable.
        """
        if self._state != "new":
            raise StoreError(f"the JetStream store cannot be opened twice (it is {self._state})")
        self._state = "opening"
        try:
            self._nc, self._api = await connect(
                self._servers,
                name=f"ensync-{self._node}",
                creds=self._creds,
                tls_ca=self._tls_ca,
            )
        except BaseException:
            self._state = "closed"
            raise
        try:
            await ensure_streams(self._api, self.names, self._replicas)
            layout = await ensure_layout(self._api, self.names, details={"slots": self._slot_count})
            self._slot_count = int(layout["slots"])
        except BaseException:
            await self._nc.close()
            self._state = "closed"
            raise
        self._table.attach(self._api)
        self._state = "open"

    async def close(self) -> None:
        """Finish the writes in flight and disconnect; serves nothing after. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        for slot in self._table.slots:
            self.lose(slot)
        await self._table.close()  # the writes already submitted end first
        self._memory.clear()
        if self._api is not None:
            await self._api.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def drop(self) -> None:
        """Delete this namespace's streams: every message, state and app in
        it (benchmarks and tests clean up with it). Serve nothing afterwards."""
        api = self._check_open()
        for slot in self._table.slots:
            self.lose(slot)
        for stream in (self.names.owned, self.names.apps):
            with contextlib.suppress(RejectedError):
                await api.request(f"$JS.API.STREAM.DELETE.{stream}")

    def _check_open(self) -> JetStreamApi:
        if self._state != "open" or self._api is None:
            raise StoreError(f"the JetStream store is {self._state}, not open")
        return self._api

    @property
    def api(self) -> JetStreamApi:
        """The open JetStream API (for the node's slot keeper)."""
        return self._check_open()

    @property
    def node(self) -> str:
        return self._node

    @property
    def slot_count(self) -> int:
        """The namespace's slot count (as recorded, once open)."""
        return self._slot_count

    @property
    def max_message_bytes(self) -> int:
        """The largest message the NATS servers accept (their ``max_payload``)."""
        if self._nc is None:
            raise StoreError("the JetStream store is not open")
        return int(self._nc.max_payload)

    # --- ownership -------------------------------------------------------------

    def serves(self, slot: int) -> bool:
        """Whether this node serves ``slot`` now (it owns it and has read it)."""
        return self._table.serves(slot)

    def has_pending(self, key: Key) -> bool:
        """Whether a partition served here has a pending message."""
        return self._table.has_pending(key) or self._memory.has_pending(key)

    def slot_of(self, recipient: str, name: str) -> int:
        return self._slot_fn(recipient, name, self._slot_count)

    async def gain(self, lease: SlotLease) -> None:
        """Serve ``lease``'s slot: read its partitions from the log, then
        deliver what was unsettled again.

        Raises:
            FencedError: another node took the slot over meanwhile.
            StoreError: the log could not be read.
        """
        api = self._check_open()
        recovered = await recover_slot(api, self.names.owned, self.names.owned_prefix, lease)
        if self._state != "open":
            return
        keys = self._table.gain(lease, recovered)
        self._book.drop(keys)
        recent: list[tuple[str, str, str, str, int, int]] = []
        for key in keys:
            found = recovered[key]
            self._sequencer.restart(key, found.next_block - 1)
            recent += [
                (m.sender, m.recipient, m.dedupe_key, m.idem, m.block, m.created_at_ms)
                for m in found.messages
                if m.dedupe_key is not None
            ]
        recent.sort(key=lambda item: item[5])
        self._seed_dedupe(recent)
        for key in keys:
            self._book.notify(key)

    def lose(self, slot: int) -> None:
        """Stop serving ``slot`` at once (its lease can no longer be trusted,
        or it is being let go): its partitions are forgotten here."""
        self._book.drop(self._table.lose(slot))

    def on_slot_failed(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(slot)`` when a slot's log fails (another node
        took it over, or NATS did not answer a write): the slot is no
        longer served, and its lease should be let go."""
        self._lost_listeners.append(listener)

    def _log_failed(self, slot: int, keys: list[Key]) -> None:
        self._book.drop(keys)
        for listener in list(self._lost_listeners):
            listener(slot)

    # --- refusals of partitions served elsewhere ----------------------------------

    def _refuse(self, new: NewMessage) -> str | None:
        slot = self.slot_of(new.recipient, new.name)
        return None if self._table.serves(slot) else str(NotOwnedError(slot))

    async def claim(
        self, recipient: str, name: str, *, limit: int, now_ms: int, policy: DeliveryPolicy
    ) -> Claim:
        self._check_open()
        self._table.check((recipient, name))
        return await super().claim(recipient, name, limit=limit, now_ms=now_ms, policy=policy)

    def statistics(self) -> dict[str, Any]:
        """Counters for tests and metrics; never raises."""
        leases, windowed = self.delivery_statistics()
        return {"slots": len(self._table.slots), "leases": leases, "windowed": windowed}
