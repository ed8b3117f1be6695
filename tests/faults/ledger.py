"""What the clients of a crash test saw, stamped with the engine's incarnation.

The *epoch* is the number of engine restarts so far. The test raises it
just before it starts a new engine process, after the old one is dead and a
short pause: whatever a new incarnation causes (a delivery, an ack answer)
is therefore recorded with the new epoch, and whatever the dead one caused
was recorded before. "Acked in epoch e, received in an epoch > e" is thus a
message the engine delivered again after a restart although its ack had
been confirmed before the crash.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ensync import EnSyncError, Message

__all__ = ["Acked", "Ledger", "Published", "Received"]


@dataclass(frozen=True, slots=True)
class Published:
    """A publish that returned its idem: the engine promised it is on disk."""

    idem: str
    recipient: str
    payload: Mapping[str, Any]
    publisher: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Received:
    """One delivery handed to a subscriber's handler."""

    idem: str
    subscriber: str
    epoch: int
    at_s: float


@dataclass(frozen=True, slots=True)
class Acked:
    """An ack call that returned without raising."""

    idem: str
    subscriber: str
    epoch: int
    at_s: float


@dataclass(slots=True, repr=False)
class Ledger:
    """Every publish, delivery and ack of one crash test."""

    epoch: int = 0
    published: dict[str, Published] = field(default_factory=dict)
    # (publisher, seq) of every publish attempted, successful or not.
    attempted: dict[tuple[str, int], Mapping[str, Any]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    first_ack: dict[str, Acked] = field(default_factory=dict)
    acks: int = 0
    # (operation, error class name) -> count
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    error_samples: dict[tuple[str, str], str] = field(default_factory=dict)
    # (client label, epoch) -> successful publishes or deliveries
    progress: Counter[tuple[str, int]] = field(default_factory=Counter)
    # deliveries whose content does not match any publish
    mismatches: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _started_s: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"<Ledger epoch {self.epoch}: {self.summary()}>"

    def _now(self) -> float:
        return time.monotonic() - self._started_s

    # ------------------------------------------------------------------ recording

    def attempt(self, publisher: str, seq: int, payload: Mapping[str, Any]) -> None:
        self.attempted[(publisher, seq)] = payload

    def published_ok(
        self, publisher: str, recipients: list[str], payload: Mapping[str, Any], joined: str
    ) -> None:
        idems = joined.split(",")
        assert len(idems) == len(recipients), f"{joined!r} for {len(recipients)} recipients"
        for idem, recipient in zip(idems, recipients, strict=True):
            assert idem not in self.published, f"idem {idem} returned twice"
            self.published[idem] = Published(idem, recipient, payload, publisher, self.epoch)
        self.progress[(publisher, self.epoch)] += 1

    def failed(self, operation: str, error: EnSyncError | asyncio.CancelledError) -> None:
        key = (operation, type(error).__name__)
        self.errors[key] += 1
        self.error_samples.setdefault(key, str(error) or repr(error))

    def delivered(self, subscriber: str, app_id: str, sender: str, message: Message) -> None:
        self.received.append(Received(message.idem, subscriber, self.epoch, self._now()))
        self._seen.add(message.idem)
        self.progress[(subscriber, self.epoch)] += 1
        if message.sender != sender:
            self.mismatches.append(f"{message.idem}: sender {message.sender}")
        published = self.published.get(message.idem)
        if published is not None:
            if published.recipient != app_id:
                self.mismatches.append(f"{message.idem}: for {published.recipient}, got {app_id}")
            if dict(published.payload) != message.payload:
                self.mismatches.append(f"{message.idem}: payload {message.payload}")
            return
        # A publish whose answer was lost in the crash may still be delivered.
        key = (str(message.payload.get("publisher")), int(message.payload.get("seq", -1)))
        if self.attempted.get(key) != message.payload:
            self.mismatches.append(f"{message.idem}: never published {message.payload}")

    def acked(self, subscriber: str, idem: str) -> None:
        self.acks += 1
        if idem not in self.first_ack:
            self.first_ack[idem] = Acked(idem, subscriber, self.epoch, self._now())

    # ------------------------------------------------------------------ questions

    def unseen(self) -> list[Published]:
        """Successful publishes no subscriber has received (yet)."""
        return [p for idem, p in self.published.items() if idem not in self._seen]

    def redelivered_after_ack(self) -> list[tuple[Acked, Received]]:
        """Deliveries, after a restart, of messages whose ack succeeded before it."""
        return [
            (ack, got)
            for got in self.received
            if (ack := self.first_ack.get(got.idem)) is not None and got.epoch > ack.epoch
        ]

    def stalled(self, labels: Iterable[str], minimum: int) -> list[str]:
        """Labels with fewer than ``minimum`` successes in the current epoch."""
        return [label for label in labels if self.progress[(label, self.epoch)] < minimum]

    def summary(self) -> str:
        per_epoch = Counter(p.epoch for p in self.published.values())
        received = Counter(r.epoch for r in self.received)
        acked = Counter(a.epoch for a in self.first_ack.values())
        redelivered = len(self.received) - len(self._seen)
        errors = ", ".join(
            f"{op} {name} x{count} (e.g. {self.error_samples[(op, name)]!r})"
            for (op, name), count in sorted(self.errors.items())
        )
        return (
            f"idems published ok: {len(self.published)} "
            f"{dict(sorted(per_epoch.items()))} by epoch; "
            f"publish calls: {len(self.attempted)}; deliveries: {len(self.received)} "
            f"{dict(sorted(received.items()))} ({redelivered} repeats); "
            f"acked: {len(self.first_ack)} idems {dict(sorted(acked.items()))}, {self.acks} acks; "
            f"errors: {errors or 'none'}"
        )
