"""A partition's delivery state as its owner logs it, and rebuilt from that log.

The owner of a partition (:mod:`ensync.server.store.ownership`) keeps the
partition's delivery state in memory and appends what changes it to the
partition's state log, a record per batch rather than per message. A new
owner reads the latest :class:`Snapshot` and the records after it, and
:meth:`PartitionState.apply` makes the same state again; messages their
former owner had delivered but that were not settled are then delivered
again, their attempt counted.

Records:

* :class:`Delivered`: blocks ``first..last`` had their first delivery (the
  delivery cursor moved to ``last``);
* :class:`Redelivered`: a block was delivered again, with its attempt;
* :class:`Settled`: blocks settled by a batch (acked, discarded, dead or
  expired), as ranges;
* :class:`Deferred`: a block leaves the line until ``due_ms`` (epoch
  milliseconds: a time another owner can read);
* :class:`Ended`: a block dead-lettered (with its reason) or expired: it is
  settled, and kept apart as a dead letter until redriven or pruned;
* :class:`Redriven`: a dead letter is pending again, from ``at_ms``;
* :class:`Snapshot`: the whole state, so that a new owner reads a bounded
  tail.

Lease deadlines are not logged: they live on one owner's clock, and a new
owner delivers what was in flight again. Sans-I/O; records encode to
compact JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ensync._json import dumps_compact, loads_strict
from ensync.server.store.base import MessageState
from ensync.server.store.settled import SettledSet

__all__ = [
    "Deferred",
    "Delivered",
    "Ended",
    "PartitionState",
    "Record",
    "Redelivered",
    "Redriven",
    "Settled",
    "Snapshot",
    "decode",
    "encode",
]

_ENDINGS = (MessageState.DEAD, MessageState.EXPIRED)


@dataclass(frozen=True, slots=True)
class Delivered:
    """First deliveries of blocks ``first`` to ``last``."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Redelivered:
    """``block`` was delivered again, as its ``attempt``-th delivery."""

    block: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Settled:
    """Blocks settled by one batch, as inclusive ranges, at ``at_ms`` (epoch
    ms: retention counts from it)."""

    ranges: tuple[tuple[int, int], ...]
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Deferred:
    """``block`` is delivered again at ``due_ms`` (epoch ms), not before."""

    block: int
    due_ms: int


@dataclass(frozen=True, slots=True)
class Ended:
    """``block`` was dead-lettered (``state`` DEAD, with ``reason``) or
    expired (EXPIRED) at ``at_ms`` (epoch ms)."""

    block: int
    state: MessageState
    at_ms: int
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.state not in _ENDINGS:
            raise ValueError(f"a block ends DEAD or EXPIRED, not {self.state!r}")


@dataclass(frozen=True, slots=True)
class Redriven:
    """Dead-lettered ``block`` is pending again, claimable from ``at_ms``."""

    block: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state of a partition at one point of its log."""

    settled: str  # SettledSet.encode()
    cursor: int
    attempts: tuple[tuple[int, int], ...] = ()
    deferred: tuple[tuple[int, int], ...] = ()
    ended: tuple[Ended, ...] = ()
    # Every block the snapshot has settled was settled by then (epoch ms).
    settled_ms: int = 0


Record = Delivered | Redelivered | Settled | Deferred | Ended | Redriven | Snapshot


@dataclass
class PartitionState:
    """What an owner knows of a partition's deliveries.

    Attributes:
        settled: the settled blocks.
        cursor: the highest block that had its first delivery.
        attempts: deliveries so far of unsettled blocks delivered more than
            once (a delivered block not listed had one).
        deferred: unsettled blocks waiting, and when they are due (epoch ms).
        ended: dead-lettered and expired blocks (settled, kept apart).
        settled_ms: every settled block was settled by then (epoch ms;
            0 if unknown): what retention counts from after a takeover.
    """

    settled: SettledSet = field(default_factory=SettledSet)
    cursor: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    deferred: dict[int, int] = field(default_factory=dict)
    ended: dict[int, Ended] = field(default_factory=dict)
    settled_ms: int = 0

    def apply(self, record: Record) -> None:
        """Change the state as ``record`` says (records are applied in log order)."""
        if isinstance(record, Delivered):
            self.cursor = max(self.cursor, record.last)
        elif isinstance(record, Redelivered):
            block = record.block
            if block not in self.settled:
                self.attempts[block] = max(self.attempts.get(block, 1), record.attempt)
                self.deferred.pop(block, None)
        elif isinstance(record, Settled):
            for first, last in record.ranges:
                self.settled.add_range(first, last)
            self.settled_ms = max(self.settled_ms, record.at_ms)
            self._forget_settled()
        elif isinstance(record, Deferred):
            if record.block not in self.settled:
                self.deferred[record.block] = record.due_ms
        elif isinstance(record, Ended):
            if self.settled.add(record.block):
                self.ended[record.block] = record
                self.settled_ms = max(self.settled_ms, record.at_ms)
                self._forget_settled()
        elif isinstance(record, Redriven):
            if self.ended.pop(record.block, None) is not None:
                self.settled.discard(record.block)
                # Pending again with no delivery counted; due from at_ms.
                self.attempts[record.block] = 0
                self.deferred[record.block] = record.at_ms
                self.cursor = max(self.cursor, record.block)
        else:
            self.settled = SettledSet.decode(record.settled)
            self.cursor = record.cursor
            self.attempts = dict(record.attempts)
            self.deferred = dict(record.deferred)
            self.ended = {ended.block: ended for ended in record.ended}
            self.settled_ms = record.settled_ms

    def _forget_settled(self) -> None:
        for table in (self.attempts, self.deferred):
            for block in [block for block in table if block in self.settled]:
                del table[block]

    def snapshot(self) -> Snapshot:
        """The state as one record."""
        return Snapshot(
            settled=self.settled.encode(),
            cursor=self.cursor,
            attempts=tuple(sorted(self.attempts.items())),
            deferred=tuple(sorted(self.deferred.items())),
            ended=tuple(self.ended[block] for block in sorted(self.ended)),
            settled_ms=self.settled_ms,
        )

    def attempt_of(self, block: int) -> int:
        """Deliveries ``block`` had so far (0: none)."""
        if block > self.cursor:
            return 0
        return self.attempts.get(block, 1)

    def to_deliver_again(self, now_ms: int) -> list[int]:
        """Delivered, unsettled blocks that are due: what a new owner delivers again.

        In block order; deferred blocks wait until they are due.
        """
        return [
            block
            for block in self.settled.unsettled(self.cursor)
            if self.deferred.get(block, now_ms) <= now_ms
        ]


# ---------------------------------------------------------------------- log form

_TAGS: dict[type[Any], str] = {
    Delivered: "d",
    Redelivered: "r",
    Settled: "s",
    Deferred: "f",
    Ended: "e",
    Redriven: "R",
    Snapshot: "S",
}


def _ended_body(record: Ended) -> list[Any]:
    return [record.block, int(record.state), record.at_ms, record.reason]


def _ended_from(body: list[Any]) -> Ended:
    block, state, at_ms, reason = body
    if reason is not None and not isinstance(reason, str):
        raise TypeError(reason)
    return Ended(int(block), MessageState(int(state)), int(at_ms), reason)


def encode(record: Record) -> bytes:
    """``record`` as compact JSON: a type tag and its fields, in order."""
    if isinstance(record, Delivered):
        body: list[Any] = [record.first, record.last]
    elif isinstance(record, Redelivered):
        body = [record.block, record.attempt]
    elif isinstance(record, Settled):
        body = [SettledSet(0, record.ranges).encode(), record.at_ms]
    elif isinstance(record, Deferred):
        body = [record.block, record.due_ms]
    elif isinstance(record, Ended):
        body = _ended_body(record)
    elif isinstance(record, Redriven):
        body = [record.block, record.at_ms]
    else:
        body = [
            record.settled,
            record.cursor,
            record.attempts,
            record.deferred,
            [_ended_body(ended) for ended in record.ended],
            record.settled_ms,
        ]
    return dumps_compact([_TAGS[type(record)], *body])


def decode(data: bytes) -> Record:
    """The record `encode` wrote; ValueError if ``data`` is not one."""
    try:
        tag, *body = loads_strict(data)
        if tag == "d":
            return Delivered(int(body[0]), int(body[1]))
        if tag == "r":
            return Redelivered(int(body[0]), int(body[1]))
        if tag == "s":
            ranges = tuple(SettledSet.decode(str(body[0])).all_ranges())
            return Settled(ranges, int(body[1]))
        if tag == "f":
            return Deferred(int(body[0]), int(body[1]))
        if tag == "e":
            return _ended_from(body)
        if tag == "R":
            return Redriven(int(body[0]), int(body[1]))
        if tag == "S":
            settled, cursor, attempts, deferred, ended, settled_ms = body
            SettledSet.decode(str(settled))
            return Snapshot(
                str(settled),
                int(cursor),
                tuple((int(b), int(n)) for b, n in attempts),
                tuple((int(b), int(d)) for b, d in deferred),
                tuple(_ended_from(item) for item in ended),
                int(settled_ms),
            )
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"not a partition log record: {data[:80]!r}") from exc
    raise ValueError(f"not a partition log record: {data[:80]!r}")
