"""Block numbering and the idempotency window of the local backends.

Both live with the store, not the engine core, so every core that shares a
store instance shares them: a block is never given twice, and a publish
retried through another core is still recognised.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

from ensync.server.store.base import Appended

__all__ = ["DedupeWindow", "Sequencer", "dedupe_digest"]

_Key = tuple[str, str]
_T = TypeVar("_T")


class Sequencer(Generic[_T]):
    """Numbers records per partition, and lets them out in block order.

    A durable backend numbers a record before its commit ends; records
    committed out of order (or a record that failed) must not let a later
    block be claimed before an earlier one: :meth:`resolve` returns the
    values whose every predecessor is resolved, and :meth:`released_upto`
    the highest such block.
    """

    def __init__(self) -> None:
        self._last: dict[_Key, int] = {}
        self._released: dict[_Key, int] = {}
        # Blocks numbered but not yet let out, in block order; the value is
        # None while committing, (False, None) if it failed.
        self._open: dict[_Key, OrderedDict[int, tuple[bool, _T | None] | None]] = {}

    def seed(self, key: _Key, last_block: int) -> None:
        """The highest block stored before this process (from disk)."""
        if last_block > self._last.get(key, 0):
            self._last[key] = last_block
            self._released[key] = max(self._released.get(key, 0), last_block)

    def restart(self, key: _Key, last_block: int) -> None:
        """Number ``key`` on from ``last_block`` whatever was numbered before
        (a partition whose numbering another process carried on meanwhile).
        Blocks numbered here and not yet resolved keep their place."""
        if key in self._open:
            self.seed(key, last_block)
            return
        self._last[key] = last_block
        self._released[key] = last_block

    def number(self, key: _Key) -> int:
        block = self._last.get(key, 0) + 1
        self._last[key] = block
        self._open.setdefault(key, OrderedDict())[block] = None
        return block

    def last_block(self, key: _Key) -> int:
        return self._last.get(key, 0)

    def resolve(self, key: _Key, block: int, value: _T | None, *, ok: bool = True) -> list[_T]:
        """Record the outcome of ``block`` (``ok=False``: it was not stored);
        returns the stored values that may now be let out, in block order."""
        pending = self._open.get(key)
        if pending is None or block not in pending:
            return []
        pending[block] = (ok, value)
        out: list[_T] = []
        while pending:
            first, outcome = next(iter(pending.items()))
            if outcome is None:
                break
            del pending[first]
            self._released[key] = first
            stored, item = outcome
            if stored and item is not None:
                out.append(item)
        if not pending:
            del self._open[key]
        return out

    def released_upto(self, key: _Key) -> int:
        return self._released.get(key, 0)


def dedupe_digest(sender: str, recipient: str, key: str) -> bytes:
    # 16 bytes stand for the three strings: a third of their memory, and the
    # window may hold a hundred thousand keys.
    text = f"{sender}\0{recipient}\0{key}".encode()
    return hashlib.blake2b(text, digest_size=16).digest()


class DedupeWindow:
    """Idempotency keys seen recently, oldest first, at most ``max_keys``.

    A key whose append is still committing maps to a future, so a duplicate
    arriving meanwhile waits for the original's outcome instead of storing
    a second copy.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self._max = max_keys
        self._seen: OrderedDict[bytes, tuple[int, Appended | asyncio.Future[Appended]]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, digest: bytes, since_ms: int) -> Appended | asyncio.Future[Appended] | None:
        entry = self._seen.get(digest)
        if entry is None:
            return None
        created_at, outcome = entry
        if created_at < since_ms:
            del self._seen[digest]
            return None
        return outcome

    def reserve(self, digest: bytes, created_at_ms: int) -> asyncio.Future[Appended]:
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._put(digest, created_at_ms, future)
        return future

    def remember(self, digest: bytes, created_at_ms: int, appended: Appended) -> None:
        self._put(digest, created_at_ms, appended)

    def settle_reservation(self, digest: bytes, outcome: Appended) -> None:
        """The reserved append finished: remember it, or forget the key if it
        stored nothing (a retry must store it)."""
        entry = self._seen.get(digest)
        if entry is None:
            return
        created_at, held = entry
        if isinstance(held, asyncio.Future):
            if not held.done():
                held.set_result(outcome)
            if outcome.error is None:
                self._seen[digest] = (created_at, outcome)
            else:
                del self._seen[digest]

    def forget_before(self, since_ms: int) -> None:
        while self._seen:
            digest, (created_at, outcome) = next(iter(self._seen.items()))
            if created_at >= since_ms or isinstance(outcome, asyncio.Future):
                break
            del self._seen[digest]

    def _put(
        self, digest: bytes, created_at_ms: int, outcome: Appended | asyncio.Future[Appended]
    ) -> None:
        self._seen.pop(digest, None)
        self._seen[digest] = (created_at_ms, outcome)
        while len(self._seen) > self._max:
            oldest, (_, held) = next(iter(self._seen.items()))
            if isinstance(held, asyncio.Future):
                break  # never forget a key whose append is still running
            del self._seen[oldest]
