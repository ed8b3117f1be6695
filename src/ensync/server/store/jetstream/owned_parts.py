"""What an owner keeps per owned slot and partition, and how a recovered
message becomes a row (:mod:`.owned`)."""

from __future__ import annotations

import dataclasses
from array import array
from collections import deque
from dataclasses import dataclass, field

from ensync.server.store.base import MessageState, StoredMessage
from ensync.server.store.jetstream.partition_logs import SlotLog
from ensync.server.store.jetstream.slots import SlotLease
from ensync.server.store.memlog import MemoryMessages
from ensync.server.store.partition_log import Ended, PartitionState

__all__ = ["Partition", "Slot", "as_acked", "as_ended", "ranges_of", "recovered_row"]

Key = tuple[str, str]
# State records of a partition after which retention rolls them into a snapshot.
SNAPSHOT_AFTER = 256


@dataclass(eq=False, slots=True)
class Partition:
    """An owned partition's log position and retention bookkeeping."""

    key: Key
    state: PartitionState = field(default_factory=PartitionState)
    # Retained logged messages in stream order: their blocks and sequences.
    blocks: array[int] = field(default_factory=lambda: array("q"))
    seqs: array[int] = field(default_factory=lambda: array("q"))
    # (epoch ms, floor): every block up to floor was settled by then.
    marks: deque[tuple[int, int]] = field(default_factory=deque)
    records: int = 0  # state records since the latest snapshot
    # Dead-lettered and expired blocks held as rows, and their idems.
    ended_idems: dict[int, str] = field(default_factory=dict)

    def note_floor(self, at_ms: int) -> None:
        floor = self.state.settled.floor
        if not self.marks or floor > self.marks[-1][1]:
            self.marks.append((at_ms, floor))

    def watermark(self, before_ms: int) -> int:
        """The highest block below which every block was settled before ``before_ms``."""
        found = 0
        while self.marks and self.marks[0][0] < before_ms:
            found = self.marks.popleft()[1]
        if found:
            # Keep it: a later cutoff starts from it.
            self.marks.appendleft((before_ms - 1, found))
        return found


@dataclass(eq=False, slots=True)
class Slot:
    lease: SlotLease
    log: SlotLog
    rows: MemoryMessages = field(default_factory=MemoryMessages)
    parts: dict[Key, Partition] = field(default_factory=dict)

    def part(self, key: Key) -> Partition:
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = Partition(key)
        return part

    async def prune(self, part: Partition, before_ms: int) -> tuple[int, list[str]]:
        """Purge ``part``'s messages settled before ``before_ms``, up to the
        first that was not, and roll a long state log into a snapshot; how
        many went, and the idems of the dead letters that went with them."""
        removed = 0
        dropped: list[str] = []
        mark = part.watermark(before_ms)
        cut = 0
        while cut < len(part.blocks) and part.blocks[cut] <= mark:
            cut += 1
        if cut:
            below = part.seqs[cut] if cut < len(part.seqs) else part.seqs[cut - 1] + 1
            removed = await self.log.purge(part.key, messages_below=below)
            for block in [b for b in part.state.ended if b <= mark]:
                del part.state.ended[block]
                idem = part.ended_idems.pop(block, None)
                if idem is not None:
                    self.rows.remove(idem)
                    dropped.append(idem)
            del part.blocks[:cut], part.seqs[:cut]
        if part.records >= SNAPSHOT_AFTER or (part.records and removed):
            part.records = 0
            (seq,) = await self.log.snapshot(part.key, part.state)
            await self.log.purge(part.key, records_below=seq)
        return removed, dropped


def recovered_row(message: StoredMessage, state: PartitionState) -> StoredMessage | None:
    """The row a recovered message is held as (None: settled, read from the log)."""
    block = message.block
    ended = state.ended.get(block)
    if ended is not None:
        return as_ended(message, ended)
    if block in state.settled:
        return None
    return dataclasses.replace(
        message,
        attempts=state.attempts.get(block, 0),
        visible_at_ms=state.deferred.get(block, 0),
    )


def as_ended(message: StoredMessage, ended: Ended) -> StoredMessage:
    return dataclasses.replace(
        message, state=ended.state, settled_at_ms=ended.at_ms, dead_reason=ended.reason
    )


def as_acked(message: StoredMessage, at_ms: int) -> StoredMessage:
    return dataclasses.replace(message, state=MessageState.ACKED, settled_at_ms=at_ms or None)


def ranges_of(blocks: list[int]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if out and block == out[-1][1] + 1:
            out[-1] = (out[-1][0], block)
        else:
            out.append((block, block))
    return tuple(out)
