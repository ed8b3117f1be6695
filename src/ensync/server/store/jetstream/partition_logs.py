"""The logs of one slot's partitions on JetStream, written by the slot's owner alone.

A slot's partitions (:func:`ensync.server.store.ownership.slot_of`) keep three
subjects each in the ownership stream
(:func:`~ensync.server.store.jetstream.slots.owned_stream_config`), beside the
slot's lease and fence; ``<part>`` is ``<recipient token>.<name token>``:

* ``<prefix>.m.<slot>.<part>``: the partition's messages, one record each, in
  block order;
* ``<prefix>.s.<slot>.<part>``: its state log, the records of
  :mod:`ensync.server.store.partition_log`;
* ``<prefix>.z.<slot>.<part>``: its latest snapshot (rolled up to one
  message), which covers every state record before it in the stream.

:class:`SlotLog` is the owner's writer. What is submitted while a batch is
being written goes into the next one (group commit), so a slot has one
batch in flight and its records reach the stream in submission order. Every
batch is one atomic batch whose first message expects the slot's fence at
the owner's epoch record: once another node has taken the slot over, the
former owner's batch is refused whole, and the writer stops
(:class:`FencedError`).

:func:`recover_slot` is a new owner's read: per partition, its retained
messages and its state (the latest snapshot and the records after it), read
completely even when a lagging replica answers.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ensync.server.store import partition_log
from ensync.server.store.base import StoredMessage, StoreError
from ensync.server.store.jetstream.api import (
    MAX_BATCH,
    ROLLUP,
    ConflictError,
    Got,
    JetStreamApi,
    Out,
)
from ensync.server.store.jetstream.records import Names, detoken, message_dict, message_from
from ensync.server.store.jetstream.slots import SlotLease, fence_subject
from ensync.server.store.partition_log import PartitionState, Record, Snapshot

__all__ = [
    "FencedError",
    "RecoveredPartition",
    "SlotLog",
    "find_message",
    "messages_subject",
    "recover_slot",
    "settled_at",
    "snapshot_subject",
    "state_subject",
]

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Messages per read while recovering (one direct-get batch).
_READ_BATCH = 1000


def messages_subject(prefix: str, slot: int, key: Key) -> str:
    return f"{prefix}.m.{slot}.{Names.partition(*key)}"


def state_subject(prefix: str, slot: int, key: Key) -> str:
    return f"{prefix}.s.{slot}.{Names.partition(*key)}"


def snapshot_subject(prefix: str, slot: int, key: Key) -> str:
    return f"{prefix}.z.{slot}.{Names.partition(*key)}"


class FencedError(StoreError):
    """Another node owns the slot now: this node's writes to it are refused."""


@dataclass(slots=True)
class _Entry:
    outs: list[Out]
    done: asyncio.Future[list[int]]


class SlotLog:
    """The owner's writer of one slot's partition logs.

    Args:
        api: an open JetStream API.
        stream: the ownership stream.
        prefix: its subject prefix.
        lease: the slot as this node holds it (its fence record's sequence).
        on_failed: called once, when a batch fails: the store refused it
            because another node took the slot over, or its outcome is not
            known (NATS did not answer). Either way the writer stops, and
            what this node holds of the slot can no longer be trusted.

    Example::

        log = SlotLog(api, "NS_OWNED", "ns.o", lease)
        await log.write(key, messages=[message])
        await log.write(key, records=[Delivered(1, 1)])
    """

    def __init__(
        self,
        api: JetStreamApi,
        stream: str,
        prefix: str,
        lease: SlotLease,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        self._api = api
        self._stream = stream
        self._prefix = prefix
        self.slot = lease.slot
        self._fence_seq = lease.fence_seq
        self._fence_subject = fence_subject(prefix, lease.slot)
        self._on_failed = on_failed
        self._queue: deque[_Entry] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._failed: StoreError | None = None
        self.batches = 0

    @property
    def fenced(self) -> bool:
        """Whether another node took the slot over (every write is refused)."""
        return isinstance(self._failed, FencedError)

    @property
    def idle(self) -> bool:
        """Whether no write is waiting or in flight."""
        return self._writer is None and not self._queue

    def write(
        self,
        key: Key,
        *,
        messages: Sequence[StoredMessage] = (),
        records: Sequence[Record] = (),
    ) -> asyncio.Future[list[int]]:
        """Append ``messages`` and then ``records`` to ``key``'s logs; the
        future is done once they are stored (with every write submitted
        before them), with their stream sequences in that order (what
        :meth:`purge` takes).

        ``persist: false`` messages are not logged: they live on their
        owner only.

        Raises (through the future):
            FencedError: another node owns the slot now.
            StoreError: NATS did not take or answer the batch.
        """
        outs = [
            Out(messages_subject(self._prefix, self.slot, key), _message_record(message))
            for message in messages
            if message.persist
        ]
        state = state_subject(self._prefix, self.slot, key)
        outs += [Out(state, partition_log.encode(record)) for record in records]
        return self._submit(outs)

    def snapshot(self, key: Key, state: PartitionState) -> asyncio.Future[list[int]]:
        """Store ``state`` as ``key``'s snapshot: a new owner reads from here on.

        The state records before the snapshot's sequence are then no longer
        read, and :meth:`purge` may remove them.
        """
        subject = snapshot_subject(self._prefix, self.slot, key)
        return self._submit([Out(subject, partition_log.encode(state.snapshot()), headers=ROLLUP)])

    async def close(self) -> None:
        """Wait for what was submitted (failures are the writes' own)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    async def purge(self, key: Key, *, messages_below: int = 0, records_below: int = 0) -> int:
        """Remove ``key``'s messages stored before sequence ``messages_below``
        and its state records before ``records_below``; how many went.

        Retention in bulk: one request per subject, whatever the count. A
        purge is not fenced (the server has no fenced purge), so an owner
        purges only what its own stored records made unneeded: messages the
        log says are settled and past retention, state records a stored
        snapshot covers. A former owner's late purge then removes nothing a
        new owner reads.
        """
        if self._failed is not None:
            raise self._failed
        removed = 0
        for subject, below in (
            (messages_subject(self._prefix, self.slot, key), messages_below),
            (state_subject(self._prefix, self.slot, key), records_below),
        ):
            if below > 1:
                answer = await self._api.request(
                    f"$JS.API.STREAM.PURGE.{self._stream}", {"filter": subject, "seq": below}
                )
                removed += int(answer.get("purged", 0))
        return removed

    def _submit(self, outs: list[Out]) -> asyncio.Future[list[int]]:
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if len(outs) > MAX_BATCH - 1:  # one place is the fence check's
            done.set_exception(
                ValueError(f"a write holds at most {MAX_BATCH - 1} records, not {len(outs)}")
            )
        elif self._failed is not None:
            done.set_exception(self._failed)
        elif not outs:
            done.set_result([])
        else:
            self._queue.append(_Entry(outs, done))
            if self._writer is None:
                self._writer = asyncio.create_task(self._write_queued(), name="ensync-slot-log")
        return done

    async def _write_queued(self) -> None:
        try:
            while self._queue and self._failed is None:
                batch, taken = self._take()
                try:
                    last = await self._api.atomic(batch)
                except ConflictError as exc:
                    # The fence subject moved (or is moving: 10163 while a
                    # takeover's record replicates): either way not ours.
                    self._fail(taken, FencedError(f"slot {self.slot} has another owner: {exc}"))
                except StoreError as exc:
                    # Whether the batch was stored is not known: a later
                    # batch could not be put after it in a known order.
                    self._fail(taken, exc)
                except BaseException:
                    self._fail(taken, StoreError("the slot log was stopped"))
                    raise
                else:
                    # An atomic batch is stored in consecutive sequences.
                    self.batches += 1
                    seq = last - len(batch) + 1
                    for entry in taken:
                        if not entry.done.done():
                            entry.done.set_result(list(range(seq, seq + len(entry.outs))))
                        seq += len(entry.outs)
        finally:
            self._writer = None

    def _take(self) -> tuple[list[Out], list[_Entry]]:
        batch: list[Out] = []
        taken: list[_Entry] = []
        while self._queue and len(batch) + len(self._queue[0].outs) <= MAX_BATCH:
            entry = self._queue.popleft()
            batch += entry.outs
            taken.append(entry)
        first = batch[0]
        batch[0] = Out(
            first.subject,
            first.data,
            expect=self._fence_seq,
            expect_filter=self._fence_subject,
            headers=first.headers,
        )
        return batch, taken

    def _fail(self, taken: list[_Entry], error: StoreError) -> None:
        self._failed = error
        for entry in [*taken, *self._queue]:
            if not entry.done.done():
                entry.done.set_exception(error)
        self._queue.clear()
        log.warning("slot %d: %s", self.slot, error)
        if self._on_failed is not None:
            self._on_failed()


def _message_record(message: StoredMessage) -> bytes:
    # The subject names the partition, not the message: the idem goes inside.
    record = message_dict(message)
    record["i"] = message.idem
    return orjson.dumps(record)


@dataclass
class RecoveredPartition:
    """What a new owner reads of one partition: its messages and its state."""

    key: Key
    messages: list[StoredMessage] = field(default_factory=list)
    state: PartitionState = field(default_factory=PartitionState)
    # The stream sequence of each of ``messages`` (what a purge takes).
    sequences: list[int] = field(default_factory=list)

    @property
    def next_block(self) -> int:
        """The block the partition's next message gets."""
        last = self.messages[-1].block if self.messages else 0
        settled = self.state.settled
        top = max([settled.floor, *(end for _, end in settled.ranges())])
        return max(last, self.state.cursor, top) + 1


async def recover_slot(
    api: JetStreamApi, stream: str, prefix: str, lease: SlotLease, *, within_s: float = 10.0
) -> dict[Key, RecoveredPartition]:
    """Every partition of the slot ``lease`` holds, with its retained
    messages and its state: what a new owner reads before it acts.

    One walk in stream order over the slot's subjects (``<prefix>.*.<slot>.>``:
    messages, state records, snapshots and the fence), applying each record
    as it comes (a snapshot replaces what came before it). Direct gets may be
    answered by a replica that has not caught up; the walk ends only at the
    owner's own fence record, which comes after everything a former owner
    wrote, so what it read is complete whichever replica answered.

    Raises:
        FencedError: another node took the slot over meanwhile.
        StoreError: the replicas did not catch up ``within_s``, or a record
            is not one this version writes.
    """
    found: dict[Key, RecoveredPartition] = {}
    subject = f"{prefix}.*.{lease.slot}.>"
    fence = fence_subject(prefix, lease.slot)
    seq = 1
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        batch = await api.get_after(stream, subject, seq, _READ_BATCH)
        for got in batch:
            if got.seq >= lease.fence_seq:
                if got.seq > lease.fence_seq or got.subject != fence:
                    raise FencedError(f"slot {lease.slot} was taken over during its recovery")
                for part in found.values():
                    pairs = sorted(
                        zip(part.messages, part.sequences, strict=True),
                        key=lambda pair: pair[0].block,
                    )
                    part.messages = [message for message, _ in pairs]
                    part.sequences = [seq for _, seq in pairs]
                return found
            if got.subject != fence:  # an earlier epoch's record, not yet rolled up
                _read_record(found, got)
        if batch:
            seq = batch[-1].seq + 1
        if len(batch) < _READ_BATCH:
            # The replica that answered has not got the owner's fence record yet.
            if asyncio.get_running_loop().time() > deadline:
                raise StoreError(
                    f"slot {lease.slot}: the stream's replicas did not catch up"
                    f" with sequence {lease.fence_seq} within {within_s} s"
                )
            await asyncio.sleep(0.05)


def _read_record(found: dict[Key, RecoveredPartition], got: Got) -> None:
    tokens = got.subject.split(".")
    kind, key = tokens[-4], (detoken(tokens[-2]), detoken(tokens[-1]))
    part = found.get(key)
    if part is None:
        part = found[key] = RecoveredPartition(key)
    if kind == "m":
        record: dict[str, Any] = got.json()
        part.messages.append(message_from(*key, str(record["i"]), record, None))
        part.sequences.append(got.seq)
    elif kind in ("s", "z"):
        part.state.apply(_decode(got.data, got.subject))
    else:
        raise StoreError(f"{got.subject}: not a subject of a partition log")


def _decode(data: bytes, subject: str) -> Record:
    try:
        record = partition_log.decode(data)
    except ValueError as exc:
        raise StoreError(f"{subject}: {exc}") from None
    if subject.split(".")[-4] == "z" and not isinstance(record, Snapshot):
        raise StoreError(f"{subject}: a snapshot subject holds a {type(record).__name__}")
    return record


# --------------------------------------------------- reading one message back

# Messages per read when a replay looks for an acknowledged message.
_FIND_BATCH = 1000
# How long before its id's time a message may have been stored (clock skew
# between the node that made the id and the owner's stream).
_ID_TIME_SLACK_MS = 60_000


async def find_message(
    api: JetStreamApi, stream: str, prefix: str, slot: int, idem: str, start_ms: int | None
) -> tuple[StoredMessage, int] | None:
    """The message ``idem`` among ``slot``'s logs, with its stream sequence:
    read from ``start_ms`` (its id's time) on, or from the start."""
    subject = f"{prefix}.m.{slot}.>"
    query: dict[str, object] = {"next_by_subj": subject, "batch": _FIND_BATCH}
    if start_ms is not None:
        when = datetime.datetime.fromtimestamp(
            max(start_ms - _ID_TIME_SLACK_MS, 0) / 1000, tz=datetime.UTC
        )
        query["start_time"] = when.isoformat().replace("+00:00", "Z")
    else:
        query["seq"] = 1
    while True:
        batch = await api.get_batch(stream, query)
        for got in batch:
            record = orjson.loads(got.data)
            if record.get("i") == idem:
                tokens = got.subject.split(".")
                key = (detoken(tokens[-2]), detoken(tokens[-1]))
                return message_from(*key, idem, record, None), got.seq
        if len(batch) < _FIND_BATCH:
            return None
        query = {"next_by_subj": subject, "batch": _FIND_BATCH, "seq": batch[-1].seq + 1}


async def settled_at(
    api: JetStreamApi, stream: str, prefix: str, slot: int, key: Key, block: int, seq: int
) -> int:
    """When ``block`` (stored at ``seq``) was settled, from the settlement
    record that covers it; 0 if a snapshot covers it instead."""
    subject = state_subject(prefix, slot, key)
    after = seq
    while True:
        batch = await api.get_after(stream, subject, after + 1, _FIND_BATCH)
        for got in batch:
            try:
                record = partition_log.decode(got.data)
            except ValueError:
                continue
            if isinstance(record, partition_log.Settled) and any(
                first <= block <= last for first, last in record.ranges
            ):
                return record.at_ms
        if len(batch) < _FIND_BATCH:
            return 0
        after = batch[-1].seq
