"""The NATS JetStream backend: every engine node over one replicated store.

Messages, their delivery state and the apps live in JetStream streams
(layout in :mod:`.records`); a store instance keeps only caches and the
index of the partitions it claims from. What makes several nodes safe:

* **Numbering**: an append is one atomic batch; the first message of each
  partition in it expects the partition's last sequence, so two nodes never
  give a block twice and each partition's messages lie in block order.
* **Deduplication**: an idempotency key is a record (``ns.k.<digest>``,
  with a TTL) written in the same batch, expected absent.
* **Claims**: first deliveries advance a per-partition cursor (expected at
  its revision); every state change of a message expects the revision of
  its state subjects, so one lease wins. Times are the caller's
  (``now_ms``), as on every backend: JetStream holds the state, the engine's
  clock decides what is due.
* **News**: other nodes hear of appended and returned messages on a core
  NATS subject (``ns.ready``), and re-read the leases of the partitions
  they serve every few seconds (a node that died leaves leases that run
  out).

A write that conflicts (JetStream answers 10071, or on replicated streams
10164 or 10163: :data:`.api.CONFLICTS`) re-reads what it expected and tries
again after a short random pause, a bounded number of times.

:meth:`JetStreamStore.open` creates the streams that do not exist and
never changes one that does (:mod:`.streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from ensync._tasks import raise_if_cancelled
from ensync.server.store.base import (
    AppRecord,
    DeliveryPolicy,
    MessageState,
    ReadyListener,
    StoredMessage,
    StoreError,
)
from ensync.server.store.jetstream._common import PAGE, Key, Part
from ensync.server.store.jetstream.api import Got, JetStreamApi, RejectedError
from ensync.server.store.jetstream.appends import Appends
from ensync.server.store.jetstream.apps import Apps
from ensync.server.store.jetstream.claims import Claims
from ensync.server.store.jetstream.connection import connect
from ensync.server.store.jetstream.dead import DeadLetters
from ensync.server.store.jetstream.layout import ensure_layout
from ensync.server.store.jetstream.records import Names, is_gone
from ensync.server.store.jetstream.streams import ensure_streams

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["JetStreamStore"]

log = logging.getLogger(__name__)

# Partitions claimed from within this long have their leases re-read.
_ACTIVE_S = 60.0
_REREAD_MAX_S = 10.0


class JetStreamStore(Apps, Appends, Claims, DeadLetters):
    """A :class:`~ensync.server.store.base.Store` in NATS JetStream.

    For example, every engine node started with the same servers shares
    one store::

        store = JetStreamStore(["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"], replicas=3)

    Args:
        servers: NATS URLs; the client fails over between them.
        namespace: prefix of every stream and subject (several ensync
            installations may share a NATS account under different ones).
        replicas: copies JetStream keeps of each stream (1, 3 or 5) when
            :meth:`open` creates them; existing streams must have as many.
            ``None``: streams are created with the replicas of those that
            exist (1 if none does), and existing ones are used as they are.
            :meth:`open` never changes an existing stream (see
            :mod:`.streams`).
        creds: a NATS credentials file.
        tls_ca: a CA bundle to verify the servers with (``tls://`` URLs).
        node: this instance's name in logs and notifications.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        namespace: str = "ensync",
        replicas: int | None = None,
        creds: str | None = None,
        tls_ca: str | None = None,
        node: str | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        if not servers:
            raise ValueError("JetStreamStore needs at least one NATS URL")
        if replicas not in (None, 1, 3, 5):
            raise ValueError(f"replicas must be 1, 3 or 5, not {replicas}")
        self.names = Names(namespace)
        self._servers = list(servers)
        self._replicas = replicas
        self._creds = creds
        self._tls_ca = tls_ca
        self._node = node or secrets.token_hex(4)
        self._refresh_s = refresh_s
        self._state = "new"
        self._nc: Client | None = None
        self._api: JetStreamApi | None = None
        self._parts: dict[Key, Part] = {}
        self._where: dict[str, Part] = {}  # idem -> partition, for live entries known here
        self._init_appends()
        self._listeners: list[ReadyListener] = []
        self._policy = DeliveryPolicy()
        self._apps: dict[str, AppRecord] = {}
        self._apps_version = -1
        self._counting: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect, create the streams that do not exist and check those that do.

        Raises:
            StreamConfigError: an existing stream has other replicas than
                asked for, or is not configured as the backend needs; the
                message says what differs and what to do. Nothing was changed.
            StoreError: opened before, NATS unreachable, or JetStream refused
                the streams (the message says why).
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
                on_error=self._on_nats_error,
                on_disconnected=self._on_disconnected,
                on_reconnected=self._on_reconnected,
            )
        except BaseException:
            self._state = "closed"
            raise
        try:
            await ensure_streams(self._api, self.names, self._replicas)
            await ensure_layout(self._api, self.names)
            await self._nc.subscribe(self.names.ready, cb=self._on_ready)
        except BaseException:
            await self._nc.close()
            self._state = "closed"
            raise
        self._state = "open"
        self._refresher = asyncio.create_task(self._refresh_forever(), name="ensync-js-refresh")

    async def _on_nats_error(self, exc: Exception) -> None:
        if self._state == "open":
            log.warning("NATS: %r", exc)
        else:
            log.debug("NATS: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._state == "open":
            log.warning("lost the connection to NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.warning("connected to NATS again")
        for part in self._parts.values():
            part.stale = True  # what happened meanwhile was not heard

    async def close(self) -> None:
        """Finish pending writes and disconnect. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._counting:
            await asyncio.gather(*self._counting, return_exceptions=True)
        if self._api is not None:
            await self._api.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._parts.clear()
        self._where.clear()

    @property
    def max_message_bytes(self) -> int:
        """The largest message the NATS servers accept (their ``max_payload``)."""
        if self._nc is None:
            raise StoreError("the JetStream store is not open")
        return int(self._nc.max_payload)

    async def drop(self) -> None:
        """Delete this namespace's streams: every message, state and app in
        it (benchmarks and tests clean up with it). The store stays open."""
        api = self._check_open()
        names = self.names
        for stream in (names.messages, names.volatile, names.state, names.apps, names.counts):
            with contextlib.suppress(RejectedError):
                await api.request(f"$JS.API.STREAM.DELETE.{stream}")
        self._parts.clear()
        self._where.clear()

    async def get(self, idem: str) -> StoredMessage | None:
        """The message with this idem, whatever its state, or ``None``."""
        self._check_open()
        found, states = await asyncio.gather(
            self._messages([self.names.message_anywhere(idem)]), self._state_of([idem])
        )
        message = found.get(idem)
        if message is None:
            return None
        state = states.get(idem)
        return message if state is None else _with_state(message, state)

    def watch(self, listener: ReadyListener) -> Callable[[], None]:
        """Call ``listener(recipient, name)`` when a partition may have become
        claimable, here or on another node."""
        self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    async def _on_ready(self, msg: Msg) -> None:
        try:
            news = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if news.get("n") == self._node:
            return
        for recipient, name in news.get("k", ()):
            key = (recipient, name)
            part = self._parts.get(key)
            if part is not None and news.get("r"):
                part.stale = True
            self._notify(key)

    async def adopt_redriven(self) -> int:
        """Redrives by other processes reach this node through NATS; nothing to adopt."""
        self._check_open()
        return 0

    async def backlog(self) -> dict[str, int]:
        """Pending messages per recipient app id."""
        self._check_open()
        if self._counting:
            await asyncio.gather(*list(self._counting), return_exceptions=True)
        counts: dict[str, int] = {}
        for got in await self._read_all(self.names.counts, self.names.counts_all):
            value = int(got.json().get("val", 0))
            if value > 0:
                counts[self.names.split_count(got.subject)] = value
        return counts

    async def prune(self, settled_before_ms: int) -> int:
        """Delete messages settled before the given time; how many.

        Settled records are read oldest first and the walk stops at the first
        one settled after the cutoff: nodes' clocks agree closely enough
        that what it leaves is pruned on a later pass.
        """
        api = self._check_open()
        removed = 0
        lasts: dict[str, int] = {}
        for kind in ("x", "d"):
            seq = 1
            while True:
                page = await api.get_after(self.names.state, f"{self.names.ns}.{kind}.>", seq, PAGE)
                for got in page:
                    record = got.json()
                    if is_gone(record):
                        continue
                    if record["at"] >= settled_before_ms:
                        break
                    removed += await self._prune_one(got, record, lasts)
                else:
                    if len(page) == PAGE:
                        seq = page[-1].seq + 1
                        continue
                break
        return removed

    async def _prune_one(self, got: Got, record: dict[str, Any], lasts: dict[str, int]) -> int:
        """Delete one settled message, its state and its body; 0 if it stays."""
        api = self._check_api()
        _, recipient, name, idem = self.names.split(got.subject)
        part = self.names.partition(recipient, name)
        if part not in lasts:
            last = await api.get_one(
                self.names.messages, {"last_by_subj": self.names.messages_of(part)}
            )
            lasts[part] = last.seq if last is not None else 0
        if record["q"] == lasts[part]:
            # The last message of a partition stays, settled, with its state
            # (without it a claim would take it for pending): the numbering
            # goes on from it. It goes once a later message is stored.
            return 0
        await api.delete(self.names.messages, record["q"])
        await api.delete(self.names.state, got.seq)
        body = await api.get_one(self.names.volatile, {"last_by_subj": self.names.body(idem)})
        if body is not None:
            await api.delete(self.names.volatile, body.seq)
        return 1

    async def _refresh_forever(self) -> None:
        """Re-read the leases of partitions claimed from lately: a node that died
        left leases that run out, and only reading finds them.

        A partition is read again every quarter of the ack deadline (within
        ``refresh_s`` and 10 s): a dead node's leases come back a little after
        they run out, and a thousand busy partitions do not cost a thousand
        reads every few seconds.
        """
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self._refresh_s)
            now = time.monotonic()
            every_s = max(self._refresh_s, min(_REREAD_MAX_S, self._policy.lease_ms / 4000))
            for part in list(self._parts.values()):
                if (
                    not part.loaded
                    or now - part.used_at > _ACTIVE_S
                    or now - part.loaded_at < every_s
                    or part.lock.locked()
                ):
                    continue
                try:
                    async with part.lock:
                        before = {idem: live.rev for idem, live in part.live.items()}
                        await self._load(part)
                        after = {idem: live.rev for idem, live in part.live.items()}
                except StoreError as exc:
                    log.warning("could not re-read leases of %s: %s", part.key, exc)
                    continue
                if before != after:
                    self._notify(part.key)


def _with_state(message: StoredMessage, state: Got) -> StoredMessage:
    kind = state.subject.split(".")[1]
    record = state.json()
    if kind == "l":
        if is_gone(record):
            return message
        return replace(message, attempts=record["a"], visible_at_ms=record["v"])
    return replace(
        message,
        state=MessageState(record["s"]),
        settled_at_ms=record["at"],
        dead_reason=record.get("why"),
        attempts=record.get("a", 0),
    )
