"""What the lease book (:mod:`.book`) reads and writes through: the
references it keeps of pending messages, and the tables behind it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ensync.server.store.base import MessageState, StoredMessage

__all__ = ["Backing", "Ref"]

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Ref:
    """What a window keeps of a pending message: no payload."""

    idem: str
    block: int
    attempts: int
    expires_at_ms: int | None
    visible_at_ms: int
    # ``attempts`` was set from a lease this book held, so it is exact; a
    # count read from disk may trail a best-effort record_attempts.
    exact: bool = False


class Backing(Protocol):
    """A backend's tables, as the book needs them."""

    def released_upto(self, key: _Key) -> int:
        """Every block up to this one has been appended (or failed) for good."""

    async def page(
        self, key: _Key, after_block: int, upto_block: int, now_ms: int, limit: int
    ) -> list[Ref]:
        """Pending, claimable-now messages with ``after_block < block <= upto_block``,
        in block order."""

    async def due(
        self, key: _Key, since_ms: int, until_ms: int, max_block: int, limit: int
    ) -> list[Ref]:
        """Pending messages that became claimable in ``(since_ms, until_ms]``
        with ``block <= max_block``, soonest first."""

    async def next_due(self, key: _Key, after_ms: int) -> int | None:
        """The soonest time after ``after_ms`` a pending message becomes claimable."""

    async def load(self, idems: Sequence[str]) -> dict[str, StoredMessage]:
        """Whole records (payloads included) of these idems."""

    async def settle_many(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        """Durably settle pending messages; ``False`` for those no longer pending."""

    async def reschedule_many(self, items: Sequence[tuple[str, int, int | None]]) -> list[bool]:
        """Durably set ``(idem, visible_at_ms, attempts or None)`` of pending messages."""

    def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        """Remember attempt counts, best effort (not awaited)."""
