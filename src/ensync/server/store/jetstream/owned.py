"""The owner's table: the rows of the partitions whose slots this node owns,
held in memory and written through each slot's log before they are answered.

:class:`OwnedTable` is a :class:`~ensync.server.store.tables.DurableTable`:
the lease book and the numbering of
:class:`~ensync.server.store.local.LocalMessages` run over it as over the
sqlite file. Per owned slot (:mod:`.owned_parts`) it holds the slot's log
writer, fenced at the owner's epoch; the rows still needed in memory
(pending messages with their payloads, dead letters: an acknowledged message
is read back from the log when replayed); and per partition what its log
says and what retention needs. A change is written as the log's records
(docs/architecture.md, "The JetStream backend") and answered once stored;
attempt counts are best effort, as on sqlite. A ``persist: false`` message
lives in the memory table of ``LocalMessages`` only; its block is logged as
settled, so the ack floor passes it. :meth:`OwnedTable.gain` rebuilds a slot
from :func:`~.partition_logs.recover_slot`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ensync.server.store import lifecycle
from ensync.server.store.backing import Ref
from ensync.server.store.base import DeadRef, MessageState, StoredMessage, StoreError
from ensync.server.store.idems import idem_time_ms, slot_bits
from ensync.server.store.jetstream.api import MAX_BATCH, JetStreamApi
from ensync.server.store.jetstream.owned_parts import (
    Slot,
    as_acked,
    as_ended,
    ranges_of,
    recovered_row,
)
from ensync.server.store.jetstream.partition_logs import (
    RecoveredPartition,
    SlotLog,
    find_message,
    settled_at,
)
from ensync.server.store.jetstream.slots import SlotLease
from ensync.server.store.memlog import MemoryMessages
from ensync.server.store.partition_log import (
    Deferred,
    Ended,
    Record,
    Redelivered,
    Redriven,
    Settled,
)
from ensync.server.store.tables import InsertDone

__all__ = ["NotOwnedError", "OwnedTable"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Records per write to a slot's log (an atomic batch, one place kept for the fence).
WRITE_MAX = MAX_BATCH - 1
_ENDED = {MessageState.DEAD, MessageState.EXPIRED}


class NotOwnedError(StoreError):
    """This node does not serve the slot of a partition (another node owns
    it, or this node is still taking it over)."""

    def __init__(self, slot: int, detail: str = "") -> None:
        super().__init__(f"slot {slot} is not served by this node{detail}")
        self.slot = slot


class OwnedTable:
    """The durable table of the partitions of the slots this node owns.

    Args:
        stream: the ownership stream (``slots.owned_stream_config``).
        prefix: its subject prefix.
        slot_of: the slot of a partition.
        on_failed: called with a slot whose log failed (another node owns
            it, or a write's outcome is unknown) and the partitions it held:
            this table no longer serves it, and its lease should be let go.
        clock: epoch milliseconds (for blocks settled without a caller's time).

    Call :meth:`attach` with an open JetStream API before :meth:`gain`.
    """

    def __init__(
        self,
        stream: str,
        prefix: str,
        slot_of: Callable[[Key], int],
        *,
        on_failed: Callable[[int, list[Key]], None] | None = None,
        clock: Callable[[], int],
    ) -> None:
        self._api: JetStreamApi | None = None
        self._stream = stream
        self._prefix = prefix
        self.slot_of = slot_of
        self._on_failed = on_failed
        self._clock = clock
        self._slots: dict[int, Slot] = {}
        self._where: dict[str, int] = {}  # idem -> slot, for the rows held
        # Acks whose records are being written: a read of one waits for the
        # write, so that an ack retried meanwhile is not answered done
        # before it is (the write may fail, and the slot be read again).
        self._settling: dict[str, asyncio.Future[None]] = {}
        # Logs of slots no longer served, whose writes may still be in flight.
        self._retired: list[SlotLog] = []

    def attach(self, api: JetStreamApi) -> None:
        """Write and read through ``api`` from now on."""
        self._api = api

    def _check_api(self) -> JetStreamApi:
        if self._api is None:
            raise StoreError("the owner's table has no JetStream connection")
        return self._api

    # --- ownership ------------------------------------------------------------

    def serves(self, slot: int) -> bool:
        return slot in self._slots

    @property
    def slots(self) -> list[int]:
        return sorted(self._slots)

    def check(self, key: Key) -> int:
        """``key``'s slot; :class:`NotOwnedError` if this table does not serve it."""
        slot = self.slot_of(key)
        if slot not in self._slots:
            raise NotOwnedError(slot)
        return slot

    def gain(self, lease: SlotLease, recovered: dict[Key, RecoveredPartition]) -> list[Key]:
        """Serve ``lease``'s slot from what its log holds; the partitions found."""
        holder = Slot(
            lease,
            SlotLog(
                self._check_api(),
                self._stream,
                self._prefix,
                lease,
                on_failed=lambda: self._failed(lease.slot),
            ),
        )
        now = self._clock()
        for key, found in recovered.items():
            part = holder.part(key)
            state = part.state = found.state
            pairs = sorted(zip(found.sequences, (m.block for m in found.messages), strict=True))
            part.blocks.extend(block for _, block in pairs)
            part.seqs.extend(seq for seq, _ in pairs)
            held = set()
            for message in found.messages:
                row = recovered_row(message, state)
                if row is not None:
                    holder.rows.add(row)
                    self._where[row.idem] = lease.slot
                    held.add(row.block)
                    if row.state is not MessageState.PENDING:
                        part.ended_idems[row.block] = row.idem
            # A block neither settled nor held was a persist: false message,
            # lost with its owner.
            for block in list(state.settled.unsettled(found.next_block - 1)):
                if block not in held:
                    state.settled.add(block)
            part.marks.append((state.settled_ms or now, state.settled.floor))
        self._slots[lease.slot] = holder
        return list(recovered)

    def lose(self, slot: int) -> list[Key]:
        """Stop serving ``slot``; the partitions it held."""
        holder = self._slots.pop(slot, None)
        if holder is None:
            return []
        self._retired = [*(one for one in self._retired if not one.idle), holder.log]
        self._where = {idem: at for idem, at in self._where.items() if at != slot}
        return list(holder.parts)

    def _failed(self, slot: int) -> None:
        if slot in self._slots:
            keys = self.lose(slot)
            if self._on_failed is not None:
                self._on_failed(slot, keys)

    async def close(self) -> None:
        """Wait for the writes in flight."""
        logs = [*self._retired, *(holder.log for holder in self._slots.values())]
        self._retired.clear()
        await asyncio.gather(*(one.close() for one in logs))

    # --- DurableTable: writes ---------------------------------------------------

    async def insert(self, rows: Sequence[StoredMessage]) -> list[str | None]:
        done: asyncio.Future[list[str | None] | StoreError] = (
            asyncio.get_running_loop().create_future()
        )
        self.insert_soon(rows, done.set_result)
        outcome = await done
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def insert_soon(self, rows: Sequence[StoredMessage], done: InsertDone) -> None:
        errors: list[str | None] = [None] * len(rows)
        by_key: dict[Key, list[int]] = {}
        for index, row in enumerate(rows):
            # Idems are random: a repeat is a caller's bug. Rows held are
            # checked; an acknowledged message's idem is not looked up.
            if row.idem in self._where:
                errors[index] = f"idem {row.idem!r} is already stored"
                continue
            by_key.setdefault(row.partition, []).append(index)
        writes: list[tuple[int, Key, list[int], asyncio.Future[list[int]]]] = []
        for key, indexes in by_key.items():
            slot = self.slot_of(key)
            holder = self._slots.get(slot)
            if holder is None:
                for index in indexes:
                    errors[index] = str(NotOwnedError(slot))
                continue
            for start in range(0, len(indexes), WRITE_MAX):
                chunk = indexes[start : start + WRITE_MAX]
                future = holder.log.write(key, messages=[rows[i] for i in chunk])
                writes.append((slot, key, chunk, future))
        if not writes:
            done(errors)
            return
        left = len(writes)

        def written(
            slot: int, key: Key, indexes: list[int], future: asyncio.Future[list[int]]
        ) -> None:
            nonlocal left
            if future.cancelled():
                error: str | None = "the write was cancelled"
            elif (exc := future.exception()) is not None:
                error = str(exc)
            else:
                error = None
                holder = self._slots.get(slot)
                if holder is not None:  # else stored, and its new owner reads it
                    part = holder.part(key)
                    for index, seq in zip(indexes, future.result(), strict=True):
                        row = rows[index]
                        holder.rows.add(row)
                        self._where[row.idem] = slot
                        part.blocks.append(row.block)
                        part.seqs.append(seq)
            if error is not None:
                for index in indexes:
                    errors[index] = error
            left -= 1
            if not left:
                done(errors)

        for slot, key, indexes, future in writes:
            future.add_done_callback(
                lambda f, s=slot, k=key, i=indexes: written(s, k, i, f)  # type: ignore[misc]
            )

    def note_volatile(self, key: Key, blocks: Sequence[int]) -> None:
        # Settled as far as the log goes (the message is not in it), so that
        # the floor passes them and a new owner numbers on after them.
        slot = self.slot_of(key)
        now = self._clock()
        for future in self._submit({(slot, key): [Settled(ranges_of(list(blocks)), now)]}, now):
            future.add_done_callback(_quietly)

    async def settle_many(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        out = [False] * len(items)
        records: dict[tuple[int, Key], list[Record]] = {}
        acked: dict[tuple[int, Key], list[int]] = {}
        for index, (idem, state, reason) in enumerate(items):
            found = self._row_of(idem)
            if found is None:
                continue
            slot, holder, row = found
            if not lifecycle.allows(row.state, lifecycle.settling(state)):
                continue
            out[index] = True
            where = (slot, row.partition)
            if state in _ENDED:
                holder.rows.settle(idem, state, now_ms, reason)
                holder.part(row.partition).ended_idems[row.block] = idem
                records.setdefault(where, []).append(Ended(row.block, state, now_ms, reason))
            else:
                holder.rows.remove(idem)
                del self._where[idem]
                acked.setdefault(where, []).append(row.block)
        for where, blocks in acked.items():
            records.setdefault(where, []).insert(0, Settled(ranges_of(blocks), now_ms))
        settling = [items[i][0] for i, done in enumerate(out) if done]
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for idem in settling:
            self._settling[idem] = written
        try:
            await self._write(records, now_ms)
        except BaseException as exc:
            written.set_exception(StoreError(f"the settlement was not stored: {exc}"))
            written.exception()  # read: waiting readers get their own copy
            raise
        else:
            written.set_result(None)
        finally:
            for idem in settling:
                if self._settling.get(idem) is written:
                    del self._settling[idem]
        return out

    async def reschedule_many(self, items: Sequence[tuple[str, int, int | None]]) -> list[bool]:
        out = [False] * len(items)
        records: dict[tuple[int, Key], list[Record]] = {}
        for index, (idem, visible_at, attempts) in enumerate(items):
            found = self._row_of(idem)
            if found is None:
                continue
            slot, holder, row = found
            if not holder.rows.reschedule(idem, visible_at, attempts):
                continue
            out[index] = True
            batch = records.setdefault((slot, row.partition), [])
            if attempts is not None:
                batch.append(Redelivered(row.block, attempts))
            batch.append(Deferred(row.block, visible_at))
        await self._write(records, self._clock())
        return out

    def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        records: dict[tuple[int, Key], list[Record]] = {}
        for idem, attempts in updates:
            found = self._row_of(idem)
            if found is None:
                continue
            slot, holder, row = found
            holder.rows.set_attempts([(idem, attempts)])
            records.setdefault((slot, row.partition), []).append(Redelivered(row.block, attempts))
        for future in self._submit(records, self._clock()):
            future.add_done_callback(_quietly)

    async def redrive(self, idem: str, now_ms: int) -> StoredMessage | None:
        found = self._row_of(idem)
        if found is None:
            return None
        slot, holder, row = found
        message = holder.rows.redrive(idem, now_ms)
        if message is None:
            return None
        holder.part(row.partition).ended_idems.pop(row.block, None)
        await self._write({(slot, row.partition): [Redriven(row.block, now_ms)]}, now_ms)
        return message

    async def take_redriven(self, limit: int) -> list[StoredMessage]:
        # Redrives go through the owner: none happen behind its back.
        return []

    def _row_of(self, idem: str) -> tuple[int, Slot, StoredMessage] | None:
        slot = self._where.get(idem)
        holder = self._slots.get(slot) if slot is not None else None
        if holder is None:
            return None
        row = holder.rows.get(idem)
        assert slot is not None
        return None if row is None else (slot, holder, row)

    def _submit(
        self, records: dict[tuple[int, Key], list[Record]], now_ms: int
    ) -> list[asyncio.Future[list[int]]]:
        futures = []
        for (slot, key), batch in records.items():
            holder = self._slots.get(slot)
            if holder is None:
                continue
            part = holder.part(key)
            for record in batch:
                part.state.apply(record)
            part.records += len(batch)
            part.note_floor(now_ms)
            for start in range(0, len(batch), WRITE_MAX):
                futures.append(holder.log.write(key, records=batch[start : start + WRITE_MAX]))
        return futures

    async def _write(self, records: dict[tuple[int, Key], list[Record]], now_ms: int) -> None:
        futures = self._submit(records, now_ms)
        if futures:
            for outcome in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome if isinstance(outcome, StoreError) else StoreError(str(outcome))

    # --- DurableTable: reads ----------------------------------------------------

    async def get(self, idem: str) -> StoredMessage | None:
        settling = self._settling.get(idem)
        if settling is not None:
            await asyncio.shield(settling)  # raises if the write failed
        found = self._row_of(idem)
        if found is not None:
            return found[2]
        return await self._read_settled(idem)

    async def page(
        self, key: Key, after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]:
        return self._rows(key).page(key, after_block, upto_block, now_ms, limit)

    async def due(
        self, key: Key, since_ms: int, until_ms: int, max_block: int, limit: int
    ) -> list[Ref]:
        return self._rows(key).due(key, since_ms, until_ms, max_block)[:limit]

    async def next_due(self, key: Key, after_ms: int) -> int | None:
        return self._rows(key).next_due(key, after_ms)

    async def load(self, idems: Sequence[str]) -> dict[str, StoredMessage]:
        loaded = {}
        for idem in idems:
            found = self._row_of(idem)
            if found is not None:
                loaded[idem] = found[2]
        return loaded

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        dead = [m for h in self._slots.values() for m in h.rows.list_dead(recipient, limit)]
        dead.sort(key=lambda m: m.settled_at_ms or 0, reverse=True)
        return dead[: max(limit, 0)]

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        return sorted(r for h in self._slots.values() for r in h.rows.list_dead_refs(recipient))

    async def backlog(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for holder in self._slots.values():
            for app_id, count in holder.rows.backlog().items():
                counts[app_id] = counts.get(app_id, 0) + count
        return counts

    def has_pending(self, key: Key) -> bool:
        holder = self._slots.get(self.slot_of(key))
        return holder is not None and holder.rows.has_pending(key)

    def _rows(self, key: Key) -> MemoryMessages:
        return self._slots[self.check(key)].rows

    # --- retention --------------------------------------------------------------

    async def prune(self, settled_before_ms: int) -> int:
        """Purge every owned partition's messages settled before the cutoff,
        up to the first that was not; roll long state logs into snapshots."""
        removed = 0
        for slot, holder in list(self._slots.items()):
            for part in list(holder.parts.values()):
                if self._slots.get(slot) is not holder:
                    break  # lost meanwhile
                purged, dropped = await holder.prune(part, settled_before_ms)
                removed += purged
                for idem in dropped:
                    self._where.pop(idem, None)
        return removed

    # --- reading acknowledged messages back ---------------------------------------

    async def _read_settled(self, idem: str) -> StoredMessage | None:
        start = idem_time_ms(idem)
        # Ids of a cluster carry their slot; any other is looked for everywhere.
        carried = slot_bits(idem)
        others = [slot for slot in self._slots if slot != carried]
        for slot in [carried, *others] if carried in self._slots else others:
            holder = self._slots.get(slot)
            if holder is None:
                continue
            got = await find_message(
                self._check_api(), self._stream, self._prefix, slot, idem, start
            )
            if got is None:
                continue
            message, seq = got
            part = holder.parts.get(message.partition)
            if part is None or message.block not in part.state.settled:
                return None
            ended = part.state.ended.get(message.block)
            if ended is not None:
                return as_ended(message, ended)
            at_ms = await settled_at(
                self._check_api(), self._stream, self._prefix, slot, part.key, message.block, seq
            )
            at_ms = at_ms or part.state.settled_ms
            return as_acked(message, at_ms)
        return None


def _quietly(future: asyncio.Future[list[int]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a best-effort record was not stored: %s", future.exception())
