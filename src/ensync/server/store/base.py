"""The storage contract of the engine.

The core talks to storage only through :class:`Store`. Every backend
(``memory``, ``sqlite``, and later ``jetstream``) must pass the conformance
suite in ``tests/conformance/test_store.py`` unchanged.

What the contract promises:

* ``append`` returns only when every record of the call is durable (for a
  durable backend) — callers rely on it to answer a persisted publish.
  Backends batch concurrent calls into one commit (group commit); they never
  commit once per record.
* Records are read back by idem (``get``) and, per partition, in block order
  (``fetch_ready``). Reads return whole records, payload included; the core
  asks for small pages, so a deep backlog never has to sit in memory.
* State changes (``settle``, ``reschedule``) are durable when they return.
* Blocks are chosen by the caller; the store only remembers the highest one
  per partition (``last_block``) so numbering survives a restart.

The core keeps all in-flight state (leases, sessions) in memory; a store
only knows whether a message is still pending, and when it becomes visible.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "AppExistsError",
    "AppRecord",
    "MessageState",
    "Store",
    "StoreError",
    "StoredMessage",
]


class StoreError(Exception):
    """A backend failed (disk full, database locked for too long, ...)."""


class AppExistsError(StoreError):
    """An app with the same name or app id is already registered."""


class MessageState(enum.IntEnum):
    """Where a message stands. Values are stored on disk: never renumber."""

    PENDING = 0  # waiting for delivery, or in flight (leases live in memory)
    ACKED = 1  # done; kept for replay until retention ends
    DEAD = 2  # discarded or dead-lettered; ``dead_reason`` says why
    EXPIRED = 3  # its TTL passed before it was delivered


@dataclass(frozen=True, slots=True)
class AppRecord:
    """A registered application.

    ``key_hash`` is the SHA-256 of the app key; the key itself is never stored.
    ``publish_rules`` and ``subscribe_rules`` are name patterns
    (:mod:`ensync.protocol.names`); the default ``("#",)`` allows every name.
    """

    name: str
    app_id: str
    key_hash: bytes
    created_at_ms: int
    revoked: bool = False
    publish_rules: tuple[str, ...] = ("#",)
    subscribe_rules: tuple[str, ...] = ("#",)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One delivery: a message as addressed to one recipient app.

    ``payload`` is the opaque envelope exactly as published; ``metadata`` and
    ``payload_metadata`` are JSON text as published (``payload_metadata`` may
    be ``None``). Times are epoch milliseconds.
    """

    idem: str
    recipient: str
    name: str
    block: int
    payload: str
    metadata: str
    sender: str
    created_at_ms: int
    payload_metadata: str | None = None
    state: MessageState = MessageState.PENDING
    attempts: int = 0
    visible_at_ms: int = 0
    expires_at_ms: int | None = None
    settled_at_ms: int | None = None
    dead_reason: str | None = None
    # The publisher's idempotency key, if it sent one: a retried publish with
    # the same (sender, recipient, key) returns the original idem.
    dedupe_key: str | None = None

    @property
    def partition(self) -> tuple[str, str]:
        """(recipient app id, message name): the unit of ordering."""
        return (self.recipient, self.name)


@runtime_checkable
class Store(Protocol):
    """Durable (or volatile) home of apps and messages. All methods are async.

    Implementations must be safe to call from many coroutines at once on one
    event loop.
    """

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Prepare the backend (create files, schema). Called once before use."""

    async def close(self) -> None:
        """Finish pending writes and release resources. Idempotent."""

    # --- apps ----------------------------------------------------------------

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``. Raises :class:`AppExistsError` on a duplicate name,
        app id or key hash."""

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""

    async def update_app(self, app: AppRecord) -> None:
        """Replace the record of the app with ``app.name`` (revoke, new key hash).

        Raises ``LookupError`` if no app has that name."""

    # --- messages ------------------------------------------------------------

    async def append(self, messages: Sequence[StoredMessage]) -> None:
        """Store new messages; durable when this returns.

        Idems are unique: a duplicate raises :class:`StoreError` and that call
        stores nothing."""

    async def last_block(self, recipient: str, name: str) -> int:
        """The highest block ever stored for the partition, 0 if none."""

    async def get(self, idem: str) -> StoredMessage | None:
        """The message with this idem, whatever its state, or ``None``."""

    async def fetch_ready(
        self, recipient: str, name: str, after_block: int, now_ms: int, limit: int
    ) -> list[StoredMessage]:
        """Pending messages of a partition with ``block > after_block`` and
        ``visible_at_ms <= now_ms``, in block order, at most ``limit``."""

    async def fetch_scheduled(self, after_ms: int, limit: int) -> list[StoredMessage]:
        """Pending messages with ``visible_at_ms > after_ms`` (deferred ones),
        ordered by ``visible_at_ms``: how timers are rebuilt after a restart."""

    async def settle(
        self, idem: str, state: MessageState, at_ms: int, reason: str | None = None
    ) -> bool:
        """Move a pending message to ACKED, DEAD or EXPIRED.

        Returns ``False`` (and changes nothing) when the message is unknown or
        no longer pending; settling is therefore idempotent. ``state`` may not
        be PENDING (``ValueError``).
        """

    async def reschedule(self, idem: str, visible_at_ms: int, attempts: int) -> bool:
        """Set when a pending message becomes visible again and its attempt
        count. Returns ``False`` when it is unknown or no longer pending."""

    async def record_attempts(self, updates: Sequence[tuple[str, int]]) -> None:
        """Remember delivery attempt counts ``(idem, attempts)``. Durability
        is best effort: losing the last few counts in a crash is acceptable."""

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        """Dead letters of an app, newest first."""

    async def redrive(self, idem: str, now_ms: int) -> bool:
        """Return a dead letter to PENDING (attempts reset, visible now)."""

    async def recent_dedupe_keys(
        self, since_ms: int, limit: int
    ) -> list[tuple[str, str, str, str]]:
        """``(sender, recipient, dedupe_key, idem)`` of the newest ``limit`` messages
        created at or after ``since_ms`` that carry a dedupe key, oldest first:
        how the engine rebuilds its deduplication window after a restart."""

    async def backlog(self) -> dict[str, int]:
        """Pending messages per recipient app id (for metrics)."""

    async def prune(self, settled_before_ms: int) -> int:
        """Delete settled messages settled before the given time; returns how many."""
