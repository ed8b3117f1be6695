"""The storage contract of the engine: three small protocols and their records.

The core talks to storage only through :class:`Store`, which is the union of
what each concern needs:

* :class:`AppStore` — registered apps;
* :class:`MessageLog` — messages: appended in batches (the store numbers
  them and remembers idempotency keys), read back by idem, dead letters,
  retention;
* :class:`DeliveryState` — who may deliver what: claims with a lease,
  extension, release, deferral, settlement.

Where each of these calls (and time passing) takes a message is one table,
:mod:`ensync.server.store.lifecycle`, which the local backends follow and a
conformance test walks on every backend.

Every backend (``memory``, ``sqlite``, and ``jetstream``) passes the
conformance suite in ``tests/conformance/test_store.py`` unchanged,
including its tests with two engine cores over one store instance.

What the contract promises:

* **Time comes from the caller.** Every method that depends on time takes
  ``now_ms``; a backend never reads a clock for decisions, so the suite runs
  on a fake clock. (A backend whose timers run in a server, such as
  JetStream, runs the same suite in real time with scaled deadlines.)
* ``append`` returns once every fresh record of the call is durable (for a
  durable backend and a persisted message); a publish is answered only
  after that. One call is one transaction; a record the backend cannot
  store fails alone, not the batch.
* **The store numbers messages.** Blocks are assigned per (recipient, name)
  partition, strictly increasing, never twice, in the order of ``append``
  calls and of records within a call.
* **Deduplication across engine nodes.** A record whose (sender, recipient,
  idempotency key) was appended at or after ``dedupe_since_ms`` is not
  stored again: ``append`` answers with the original idem and block.
* **Claims are exclusive.** A message is leased to one claimer at a time:
  until its lease ends (settled, released, deferred, or its deadline plus
  the redelivery backoff passed) no other claim returns it. First deliveries
  of a partition are claimed in block order; messages that came back may
  overtake them.
* Every claim counts a delivery attempt; a message claimed
  ``max_deliveries`` times without a settlement is dead-lettered when its
  lease ends (release, or the next claim after its deadline), with a reason.
* Claims read no payloads but those they return, and a backend holds a
  bounded window of a partition in memory (a byte budget for payloads):
  a million deferred or pending messages do not load at start.
* State changes (``settle``, ``defer``, ``redrive``) are durable when they
  return. Leases and attempt counts are best effort: a crash voids every
  lease (the clients holding them are gone too) and may lose the last few
  attempt counts.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "AppExistsError",
    "AppRecord",
    "AppStore",
    "AppendDone",
    "Appended",
    "AppendsSoon",
    "Claim",
    "DeadRef",
    "DeliveryPolicy",
    "DeliveryState",
    "Lease",
    "MessageLog",
    "MessageState",
    "NewMessage",
    "ReadyListener",
    "Release",
    "Released",
    "SessionRecord",
    "SessionRegistry",
    "Settlement",
    "SlottedIds",
    "Store",
    "StoreError",
    "StoredMessage",
]


class StoreError(Exception):
    """A backend failed (disk full, database locked for too long, ...)."""


class AppExistsError(StoreError):
    """An app with the same name, app id or key hash is already registered."""


class MessageState(enum.IntEnum):
    """Where a message stands. Values are stored on disk: never renumber."""

    PENDING = 0  # waiting for delivery, or leased
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
class NewMessage:
    """A message for one recipient app, before the store numbers it.

    ``idem`` is chosen by the engine (unique, unguessable). ``persist=False``
    keeps the message in memory only (lost on restart, otherwise the same).
    """

    idem: str
    recipient: str
    name: str
    payload: str
    metadata: str
    sender: str
    created_at_ms: int
    payload_metadata: str | None = None
    expires_at_ms: int | None = None
    dedupe_key: str | None = None
    persist: bool = True

    @property
    def partition(self) -> tuple[str, str]:
        return (self.recipient, self.name)

    def numbered(self, block: int, *, persist: bool | None = None) -> StoredMessage:
        """This message as stored with ``block`` (``persist`` overrides its own)."""
        return StoredMessage(
            idem=self.idem,
            recipient=self.recipient,
            name=self.name,
            block=block,
            payload=self.payload,
            metadata=self.metadata,
            sender=self.sender,
            created_at_ms=self.created_at_ms,
            payload_metadata=self.payload_metadata,
            expires_at_ms=self.expires_at_ms,
            dedupe_key=self.dedupe_key,
            persist=self.persist if persist is None else persist,
        )


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One delivery: a message as addressed to one recipient app.

    ``payload`` is the opaque envelope exactly as published; ``metadata`` and
    ``payload_metadata`` are JSON text as published (``payload_metadata`` may
    be ``None``). Times are epoch milliseconds. ``attempts`` counts the
    deliveries so far.
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
    # The publisher's idempotency key, if it sent one.
    dedupe_key: str | None = None
    persist: bool = True

    @property
    def partition(self) -> tuple[str, str]:
        """(recipient app id, message name): the unit of ordering."""
        return (self.recipient, self.name)


class DeadRef(NamedTuple):
    """A dead letter without its body: when it died, its idem and name."""

    settled_at_ms: int
    idem: str
    name: str


@dataclass(frozen=True, slots=True)
class Appended:
    """What ``append`` did with one record.

    ``duplicate`` means its idempotency key was seen: ``idem`` and ``block``
    are the original's and nothing was stored. ``error`` is set (and nothing
    stored) when the backend could not store this record alone.
    """

    idem: str
    block: int
    duplicate: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How leases end: the ack deadline, the redelivery backoff, the limit.

    ``backoff_ms[n - 1]`` is the wait before the next delivery after the
    n-th failed one (the last value repeats; empty means no wait).
    """

    lease_ms: int = 30_000
    max_deliveries: int = 10
    backoff_ms: tuple[int, ...] = (0, 1_000, 5_000, 15_000, 60_000, 300_000)

    def backoff_after(self, attempts: int) -> int:
        """The wait after ``attempts`` failed deliveries."""
        if not self.backoff_ms:
            return 0
        return self.backoff_ms[min(max(attempts, 1), len(self.backoff_ms)) - 1]


@dataclass(frozen=True, slots=True)
class Lease:
    """A message claimed for delivery until ``deadline_ms``.

    ``message.attempts`` already counts this delivery. ``token`` proves the
    lease is still the claimer's: extend and release with a stale token do
    nothing.
    """

    message: StoredMessage
    token: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of one claim on a partition.

    ``dead`` are the idems dead-lettered instead of delivered (delivery
    limit reached); ``expired`` those settled EXPIRED (their TTL passed).
    ``next_visible_ms`` says when something not claimable now becomes
    claimable (a deferral or a backoff ends), if the backend knows.
    """

    leases: tuple[Lease, ...] = ()
    dead: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()
    next_visible_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Give a leased message back unsettled.

    ``failure`` says the delivery failed (deadline passed, handler gave it
    back): it then waits out the backoff. Without it (client gone, paused)
    it is claimable at once. ``delivered=False`` says it never reached a
    client (its subscriber left while the store answered the claim): that
    claim is not counted against ``max_deliveries``.
    """

    idem: str
    token: int
    failure: str | None = None
    delivered: bool = True


@dataclass(frozen=True, slots=True)
class Released:
    """What a release did: claimable again at ``visible_at_ms``, dead-lettered
    (``dead``), or nothing because the lease was no longer the caller's
    (``stale``)."""

    visible_at_ms: int | None = None
    dead: bool = False
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    """Move a pending message to ACKED, DEAD (with ``reason``) or EXPIRED."""

    idem: str
    state: MessageState
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A client session as every engine node may take it over: whose it is,
    under which app key (its hash), and its client hash."""

    app_id: str
    key_hash: bytes
    client_hash: str
    connected_at_ms: int


ReadyListener = Callable[[str, str], None]
"""Told ``(recipient, name)`` when a partition may have messages to claim."""


@runtime_checkable
class AppStore(Protocol):
    """Registered apps."""

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
        """Replace the record of the app with ``app.name``.

        Raises ``LookupError`` if no app has that name."""


@runtime_checkable
class MessageLog(Protocol):
    """Messages: numbered on append, read back by idem."""

    async def append(
        self, batch: Sequence[NewMessage], *, now_ms: int, dedupe_since_ms: int
    ) -> list[Appended]:
        """Number and store ``batch``; one :class:`Appended` per record, in order.

        Durable on return for persisted records. Listeners registered with
        :meth:`DeliveryState.watch` hear of every partition that got records.
        """

    async def get(self, idem: str) -> StoredMessage | None:
        """The message with this idem, whatever its state, or ``None``."""

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        """Dead letters of an app, most recently settled first."""

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        """Every dead letter of an app, oldest first, without bodies (for
        redriving them all without holding their payloads)."""

    async def redrive(self, idem: str, now_ms: int) -> bool:
        """Return a dead letter to PENDING (attempts reset, claimable now)."""

    async def adopt_redriven(self) -> int:
        """Make claimable here what another process redrove in this store
        (``ensync dlq redrive`` beside a running engine); how many. Backends
        no other process can reach return 0."""

    async def backlog(self) -> dict[str, int]:
        """Pending messages per recipient app id (for metrics)."""

    async def prune(self, settled_before_ms: int) -> int:
        """Delete messages settled before the given time; returns how many."""


@runtime_checkable
class DeliveryState(Protocol):
    """Leases, deferrals and settlements."""

    def watch(self, listener: ReadyListener) -> Callable[[], None]:
        """Call ``listener(recipient, name)`` whenever a partition may have
        become claimable (records appended, a message released or redriven);
        returns a function that stops it. Listeners must not block."""

    async def claim(
        self,
        recipient: str,
        name: str,
        *,
        limit: int,
        now_ms: int,
        policy: DeliveryPolicy,
    ) -> Claim:
        """Lease up to ``limit`` claimable messages of a partition, payloads
        included, first deliveries in block order."""

    async def extend(self, idem: str, token: int, deadline_ms: int) -> bool:
        """Move a lease's deadline; ``False`` if the lease is no longer ``token``'s."""

    async def release(
        self, releases: Sequence[Release], *, now_ms: int, policy: DeliveryPolicy
    ) -> list[Released]:
        """End leases unsettled: claimable again (after the backoff if the
        delivery failed), or dead-lettered at ``policy.max_deliveries``."""

    async def defer(self, idem: str, visible_at_ms: int, now_ms: int) -> bool:
        """Make a pending message claimable only at ``visible_at_ms``, ending
        any lease on it; ``False`` if it is unknown or no longer pending."""

    async def settle(self, settlements: Sequence[Settlement], *, now_ms: int) -> list[bool]:
        """Settle pending messages, ending any lease on them; ``False`` for each
        one that is unknown or no longer pending (settling is idempotent).
        ``state`` may not be PENDING (``ValueError``)."""


AppendDone = Callable[[list[Appended] | StoreError], None]
"""Hears how an :meth:`AppendsSoon.append_soon` went: the results, or why
the store failed as a whole."""


@runtime_checkable
class SlottedIds(Protocol):
    """A store whose partitions have owner nodes by slot: message ids carry
    their slot (``core.ids.new_idem(now, slot=...)``) to find the owner."""

    def slot_of(self, recipient: str, name: str) -> int: ...


@runtime_checkable
class AppendsSoon(Protocol):
    """A store that appends without a coroutine (the engine's publish path).

    The store on one machine commits a batch on its writer thread; handing
    the results to a callback when the commit is done saves the engine a
    task and two loop turns per batch, which a publish awaited alone feels.
    """

    def append_soon(
        self,
        batch: Sequence[NewMessage],
        *,
        now_ms: int,
        dedupe_since_ms: int,
        done: AppendDone,
    ) -> None:
        """:meth:`MessageLog.append`, with its outcome handed to ``done`` on
        the loop once the batch is durable.

        Raises:
            StoreError: the store is not open; ``done`` is not called.
        """


@runtime_checkable
class SessionRegistry(Protocol):
    """Client ids every engine node knows (a store shared by several nodes).

    The official gRPC clients connect once and send their client id with
    every call; when a load balancer moves one to another node, that node
    finds the session here and takes it over.
    """

    async def register_sessions(
        self, sessions: Sequence[tuple[str, SessionRecord]], ttl_ms: int
    ) -> None:
        """Remember sessions (client id, record) for ``ttl_ms``; registering one
        again renews it."""

    async def find_session(self, client_id: str) -> SessionRecord | None:
        """The session registered with this client id, or ``None``."""


@runtime_checkable
class Store(AppStore, MessageLog, DeliveryState, Protocol):
    """Everything the engine stores. All I/O methods are async.

    Implementations are safe to call from many coroutines at once on the
    event loop that opened them.
    """

    async def open(self) -> None:
        """Prepare the backend (create files, schema). Called once before use."""

    async def close(self) -> None:
        """Finish pending writes and release resources. Idempotent."""
