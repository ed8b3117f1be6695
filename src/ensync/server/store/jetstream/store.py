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

A write that conflicts re-reads what it expected and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from ..base import (
    Appended,
    AppExistsError,
    AppRecord,
    Claim,
    DeadRef,
    DeliveryPolicy,
    Lease,
    MessageState,
    NewMessage,
    ReadyListener,
    Release,
    Released,
    Settlement,
    StoredMessage,
    StoreError,
)
from ..book import limit_reason
from ..numbering import dedupe_digest
from .api import MAX_BATCH, Batch, ConflictError, Got, JetStreamApi, Out, RejectedError
from .records import (
    GONE,
    Live,
    Names,
    app_from_json,
    app_to_json,
    body_json,
    is_gone,
    message_from,
    message_json,
    settled_json,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["JetStreamStore"]

log = logging.getLogger(__name__)

_Key = tuple[str, str]
# Tombstones of state subjects vanish after this long.
_TOMBSTONE_TTL_S = 600
# Conflicting writes are retried this many times before giving up.
_RETRIES = 8
# Most messages one claim writes (an atomic batch holds at most MAX_BATCH).
_CLAIM_MAX = 400
_PAGE = 1000
_DEDUPE_CACHE = 100_000
# Partitions claimed from within this long have their leases re-read.
_ACTIVE_S = 60.0


@dataclass(eq=False)
class _Part:
    """What this instance knows of one partition."""

    key: _Key
    token: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded: bool = False
    stale: bool = False
    used_at: float = 0.0
    cursor_rev: int = 0  # sequence of the cursor record in NS_STATE
    cursor_seq: int = 0  # the last message handed out for first delivery
    live: dict[str, Live] = field(default_factory=dict)
    # Settled before their first claim (found when a claim conflicted): passed over.
    skipped: set[str] = field(default_factory=set)
    heap: list[tuple[int, str, int]] = field(default_factory=list)  # (at, idem, rev)


class _Dedupe:
    """Idempotency keys seen here lately: digest -> (idem, block, created, seq)."""

    def __init__(self) -> None:
        self._keys: OrderedDict[bytes, tuple[str, int, int, int]] = OrderedDict()

    def get(self, digest: bytes) -> tuple[str, int, int, int] | None:
        return self._keys.get(digest)

    def put(self, digest: bytes, idem: str, block: int, created: int, seq: int) -> None:
        self._keys[digest] = (idem, block, created, seq)
        self._keys.move_to_end(digest)
        while len(self._keys) > _DEDUPE_CACHE:
            self._keys.popitem(last=False)


@dataclass
class _Job:
    batch: Sequence[NewMessage]
    now_ms: int
    dedupe_since_ms: int
    future: asyncio.Future[list[Appended]]


class JetStreamStore:
    """A :class:`~ensync.server.store.base.Store` in NATS JetStream.

    For example, every engine node started with the same servers shares
    one store::

        store = JetStreamStore(["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"], replicas=3)

    Args:
        servers: NATS URLs; the client fails over between them.
        namespace: prefix of every stream and subject (several ensync
            installations may share a NATS account under different ones).
        replicas: copies JetStream keeps of each stream (1, 3 or 5);
            applied when the streams are created.
        creds: a NATS credentials file.
        tls_ca: a CA bundle to verify the servers with (``tls://`` URLs).
        node: this instance's name in logs and notifications.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        namespace: str = "ensync",
        replicas: int = 1,
        creds: str | None = None,
        tls_ca: str | None = None,
        node: str | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        if not servers:
            raise ValueError("JetStreamStore needs at least one NATS URL")
        if replicas not in (1, 3, 5):
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
        self._parts: dict[_Key, _Part] = {}
        self._where: dict[str, _Part] = {}  # idem -> partition, for live entries known here
        self._last: dict[str, tuple[int, int]] = {}  # partition token -> (seq, block) of its last
        self._dedupe = _Dedupe()
        self._jobs: list[_Job] = []
        self._append_lock = asyncio.Lock()
        self._listeners: list[ReadyListener] = []
        self._policy = DeliveryPolicy()
        self._apps: dict[str, AppRecord] = {}
        self._apps_version = -1
        self._counting: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create the streams if they do not exist.

        Raises:
            StoreError: opened before, NATS unreachable, or JetStream refused
                the streams (the message says why).
        """
        if self._state != "new":
            raise StoreError(f"the JetStream store cannot be opened twice (it is {self._state})")
        self._state = "opening"
        try:
            import nats
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise StoreError(
                "the NATS JetStream store needs nats-py: pip install 'ensync[cluster]'"
            ) from exc
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": f"ensync-{self._node}",
            "connect_timeout": 5,
            "max_reconnect_attempts": 2,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "error_cb": self._on_nats_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self._creds:
            options["user_credentials"] = self._creds
        if self._tls_ca:
            options["tls"] = ssl.create_default_context(cafile=self._tls_ca)
        try:
            self._nc = await nats.connect(**options)
        except Exception as exc:
            self._state = "closed"
            raise StoreError(f"cannot reach NATS at {', '.join(self._servers)}: {exc!r}") from exc
        # A few tries per server to connect; once connected, it never stops trying.
        self._nc.options["max_reconnect_attempts"] = -1
        self._api = JetStreamApi(self._nc)
        try:
            await self._api.start()
            await self._ensure_streams()
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

    def _check_open(self) -> JetStreamApi:
        if self._state != "open" or self._api is None:
            raise StoreError(f"the JetStream store is {self._state}, not open")
        return self._api

    async def _ensure_streams(self) -> None:
        names = self.names
        ns = names.ns
        common = {"num_replicas": self._replicas, "allow_direct": True}
        streams: list[dict[str, Any]] = [
            {
                "name": names.messages,
                "subjects": [f"{ns}.m.>", f"{ns}.k.>"],
                "storage": "file",
                "allow_atomic": True,
                "allow_msg_ttl": True,
                "duplicate_window": 120 * 10**9,
            },
            {
                "name": names.volatile,
                "subjects": [f"{ns}.v.>"],
                "storage": "memory",
                "max_msgs_per_subject": 1,
            },
            {
                "name": names.state,
                "subjects": [f"{ns}.c.>", f"{ns}.l.>", f"{ns}.x.>", f"{ns}.d.>"],
                "storage": "file",
                "max_msgs_per_subject": 1,
                "allow_atomic": True,
                "allow_msg_ttl": True,
            },
            {
                "name": names.apps,
                "subjects": [f"{ns}.app.>"],
                "storage": "file",
                "max_msgs_per_subject": 1,
                "allow_atomic": True,
            },
            {
                "name": names.counts,
                "subjects": [f"{ns}.n.>"],
                "storage": "file",
                "max_msgs_per_subject": 1,
                "allow_msg_counter": True,
            },
        ]
        api = self._check_api()
        for config in streams:
            config = {**common, **config}
            try:
                await api.request(f"$JS.API.STREAM.CREATE.{config['name']}", config)
            except RejectedError as exc:
                if exc.code != 10058:  # exists with another configuration
                    raise
                await api.request(f"$JS.API.STREAM.UPDATE.{config['name']}", config)

    def _check_api(self) -> JetStreamApi:
        if self._api is None:
            raise StoreError("the JetStream store is not open")
        return self._api

    # --- apps --------------------------------------------------------------------

    async def _read_apps(self, *, force: bool = False) -> dict[str, AppRecord]:
        api = self._check_open()
        version = await api.get_one(self.names.apps, {"last_by_subj": self.names.apps_version})
        seq = version.seq if version is not None else 0
        if force or seq != self._apps_version:
            records = await self._read_all(self.names.apps, self.names.apps_all)
            self._apps = {app.name: app for app in (app_from_json(got.json()) for got in records)}
            self._apps_version = seq
        return self._apps

    async def _write_app(self, app: AppRecord, *, create: bool) -> None:
        api = self._check_open()
        for _ in range(_RETRIES):
            await self._read_apps(force=True)
            old = self._apps.get(app.name)
            if create and old is not None:
                raise AppExistsError(f"an app named {app.name!r} already exists")
            if not create and old is None:
                raise LookupError(f"no app named {app.name!r}")
            for other in self._apps.values():
                if other.name == app.name:
                    continue
                if other.app_id == app.app_id:
                    raise AppExistsError(
                        f"app id {app.app_id!r} is already registered to {other.name!r}"
                    )
                if other.key_hash == app.key_hash:
                    raise AppExistsError(f"that key hash is already registered to {other.name!r}")
            current = await api.get_one(self.names.apps, {"last_by_subj": self.names.app(app.name)})
            try:
                await api.atomic(
                    [
                        Out(
                            self.names.app(app.name),
                            app_to_json(app),
                            current.seq if current else 0,
                        ),
                        Out(self.names.apps_version, b"", max(self._apps_version, 0)),
                    ]
                )
            except ConflictError:
                continue
            self._apps[app.name] = app
            return
        raise StoreError("apps kept changing while writing; try again")

    async def create_app(self, app: AppRecord) -> None:
        """Register ``app``; :class:`AppExistsError` on a duplicate name, id or key hash."""
        await self._write_app(app, create=True)

    async def update_app(self, app: AppRecord) -> None:
        """Replace the app named ``app.name`` (``LookupError`` if none)."""
        await self._write_app(app, create=False)

    async def get_app_by_key_hash(self, key_hash: bytes) -> AppRecord | None:
        """The app whose key hashes to ``key_hash`` (revoked apps included)."""
        apps = await self._read_apps()
        return next((a for a in apps.values() if a.key_hash == key_hash), None)

    async def get_app(self, app_id: str) -> AppRecord | None:
        """The app with this app id, or ``None``."""
        apps = await self._read_apps()
        return next((a for a in apps.values() if a.app_id == app_id), None)

    async def get_app_by_name(self, name: str) -> AppRecord | None:
        """The app with this name, or ``None``."""
        return (await self._read_apps()).get(name)

    async def list_apps(self) -> list[AppRecord]:
        """Every registered app, ordered by name."""
        apps = await self._read_apps()
        return [apps[name] for name in sorted(apps)]

    # --- reading helpers ---------------------------------------------------------

    async def _read_all(self, stream: str, subject: str, start: int = 1) -> Batch:
        api = self._check_api()
        out = Batch()
        seq = start
        while True:
            page = await api.get_after(stream, subject, seq, _PAGE)
            out += page
            if len(page) < _PAGE:
                out.upto = page.upto
                return out
            seq = page[-1].seq + 1

    async def _state_of(self, idems: Iterable[str]) -> dict[str, Got]:
        """The latest state record of each idem that has one, in any partition."""
        api = self._check_api()
        found = await api.get_last(
            self.names.state, [self.names.state_anywhere(idem) for idem in idems]
        )
        latest: dict[str, Got] = {}
        for got in found:
            idem = self.names.split(got.subject)[3]
            if idem not in latest or latest[idem].seq < got.seq:
                latest[idem] = got
        return latest

    async def _messages(self, subjects: Sequence[str]) -> dict[str, StoredMessage]:
        """Messages (as appended) by idem, bodies of ``persist: false`` ones included."""
        api = self._check_api()
        if not subjects:
            return {}
        found = await api.get_last(self.names.messages, subjects)
        records = [(self.names.split(got.subject), got.json()) for got in found]
        volatile = [idem for (_, _, _, idem), record in records if record.get("v")]
        bodies: dict[str, Any] = {}
        if volatile:
            for got in await api.get_last(
                self.names.volatile, [self.names.body(idem) for idem in volatile]
            ):
                bodies[got.subject] = got.json()
        out: dict[str, StoredMessage] = {}
        for (_, recipient, name, idem), record in records:
            body = bodies.get(self.names.body(idem)) if record.get("v") else None
            if record.get("v") and body is None:
                continue  # the memory-only body did not survive a restart of NATS
            out[idem] = message_from(recipient, name, idem, record, body)
        return out

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

    # --- append ------------------------------------------------------------------

    async def append(
        self, batch: Sequence[NewMessage], *, now_ms: int, dedupe_since_ms: int
    ) -> list[Appended]:
        """Number and store ``batch`` (one atomic batch when it fits); concurrent
        calls share a write."""
        self._check_open()
        if not batch:
            return []
        job = _Job(batch, now_ms, dedupe_since_ms, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        async with self._append_lock:
            if not job.future.done():
                jobs, self._jobs = self._jobs, []
                try:
                    await self._append_jobs(jobs)
                finally:
                    # Jobs left undone (this caller was cancelled) go to the next writer.
                    self._jobs[:0] = [j for j in jobs if not j.future.done() and j is not job]
        return await job.future

    async def _append_jobs(self, jobs: list[_Job]) -> None:
        records: list[tuple[_Job, int, NewMessage]] = [
            (job, index, new) for job in jobs for index, new in enumerate(job.batch)
        ]
        results: dict[tuple[int, int], Appended] = {}
        try:
            await self._append_records(records, results)
        except StoreError as exc:
            for job, index, new in records:
                results.setdefault((id(job), index), Appended(new.idem, 0, error=str(exc)))
        for job in jobs:
            if not job.future.done():
                job.future.set_result(
                    [results[(id(job), index)] for index in range(len(job.batch))]
                )

    async def _append_records(
        self,
        records: list[tuple[_Job, int, NewMessage]],
        results: dict[tuple[int, int], Appended],
    ) -> None:
        seen: set[str] = set()
        fresh: list[tuple[_Job, int, NewMessage]] = []
        for job, index, new in records:
            if new.idem in seen:
                results[(id(job), index)] = Appended(
                    new.idem, 0, error=f"idem {new.idem!r} is already stored"
                )
                continue
            seen.add(new.idem)
            fresh.append((job, index, new))
        start = 0
        while start < len(fresh):
            # Each chunk is one atomic batch: messages plus their key records.
            chunk = fresh[start : start + MAX_BATCH // 2]
            start += len(chunk)
            try:
                await self._append_chunk(chunk, results)
            except RejectedError:
                # One record spoils the batch (a known idem, too large): alone,
                # each fails or lands by itself.
                for record in chunk:
                    try:
                        await self._append_chunk([record], results)
                    except RejectedError as exc:
                        job, index, new = record
                        error = (
                            f"idem {new.idem!r} is already stored"
                            if exc.code == 10201 or "duplicate" in str(exc)
                            else str(exc)
                        )
                        results[(id(job), index)] = Appended(new.idem, 0, error=error)

    async def _append_chunk(
        self,
        chunk: list[tuple[_Job, int, NewMessage]],
        results: dict[tuple[int, int], Appended],
    ) -> None:
        api = self._check_api()
        names = self.names
        refreshed = False
        for _ in range(_RETRIES):
            outs: list[Out] = []
            placed: list[tuple[tuple[_Job, int, NewMessage], StoredMessage, int]] = []
            keys: dict[bytes, StoredMessage] = {}
            repeats: list[tuple[tuple[_Job, int, NewMessage], bytes]] = []
            duplicates: dict[tuple[int, int], Appended] = {}
            last = dict(self._last)
            need = {names.partition(*new.partition) for _, _, new in chunk}
            await self._know_last(need - last.keys())
            last = dict(self._last)
            first_in_batch: set[str] = set()
            for record in chunk:
                job, index, new = record
                digest = None
                if new.dedupe_key is not None:
                    digest = dedupe_digest(new.sender, new.recipient, new.dedupe_key)
                    if digest in keys:
                        repeats.append((record, digest))
                        continue
                    earlier = self._dedupe.get(digest)
                    if earlier is not None and earlier[2] >= job.dedupe_since_ms:
                        duplicates[(id(job), index)] = Appended(earlier[0], earlier[1], True)
                        continue
                part = names.partition(*new.partition)
                seq, block = last.get(part, (0, 0))
                message = _numbered(new, block + 1)
                last[part] = (-1, block + 1)
                out = Out(
                    names.message(part, new.idem),
                    message_json(message),
                    headers={"Nats-Msg-Id": new.idem},
                )
                if part not in first_in_batch:
                    first_in_batch.add(part)
                    out = replace(out, expect=seq, expect_filter=names.messages_of(part))
                placed.append((record, message, len(outs)))
                outs.append(out)
                if digest is not None:
                    keys[digest] = message
                    earlier = self._dedupe.get(digest)
                    window_s = max(1, math.ceil((job.now_ms - job.dedupe_since_ms) / 1000))
                    outs.append(
                        Out(
                            names.dedupe(digest),
                            orjson.dumps(
                                {"i": new.idem, "b": message.block, "c": new.created_at_ms}
                            ),
                            earlier[3] if earlier is not None else 0,
                            ttl_s=window_s,
                        )
                    )
            volatile = [message for _, message, _ in placed if not message.persist]
            if volatile:
                # Bodies first: a claim that finds the message finds its body.
                await asyncio.gather(
                    *(
                        self._publish_acked(names.body(message.idem), body_json(message))
                        for message in volatile
                    )
                )
            if not outs:
                results.update(duplicates)
                for record, digest in repeats:
                    self._resolve_repeat(record, keys[digest], results)
                return
            try:
                last_seq = await api.atomic(outs)
            except ConflictError:
                await self._refresh_append(chunk)
                refreshed = True
                continue
            first_seq = last_seq - len(outs) + 1
            counts: dict[str, int] = {}
            for record, message, position in placed:
                job, index, new = record
                seq = first_seq + position
                part = names.partition(*new.partition)
                self._last[part] = (seq, message.block)
                results[(id(job), index)] = Appended(new.idem, message.block)
                if new.dedupe_key is not None:
                    self._dedupe.put(
                        dedupe_digest(new.sender, new.recipient, new.dedupe_key),
                        new.idem,
                        message.block,
                        new.created_at_ms,
                        seq + 1,
                    )
                counts[new.recipient] = counts.get(new.recipient, 0) + 1
            results.update(duplicates)
            for record, digest in repeats:
                self._resolve_repeat(record, keys[digest], results)
            self._count(counts)
            self._announce({new.partition for (_, _, new), _, _ in placed}, returned=False)
            return
        raise StoreError(
            "appends kept conflicting with other engine nodes"
            + (" (after re-reading)" if refreshed else "")
        )

    @staticmethod
    def _resolve_repeat(
        record: tuple[_Job, int, NewMessage],
        original: StoredMessage,
        results: dict[tuple[int, int], Appended],
    ) -> None:
        """A key repeated in one batch: the batch stored its first record."""
        job, index, _ = record
        results[(id(job), index)] = Appended(original.idem, original.block, duplicate=True)

    async def _publish_acked(self, subject: str, data: bytes) -> int:
        """A plain publish JetStream acknowledges; its sequence."""
        nc = self._nc
        if nc is None:
            raise StoreError("the JetStream store is not open")
        try:
            reply = await nc.request(subject, data, timeout=10)
        except Exception as exc:
            raise StoreError(f"writing {subject} failed: {exc!r}") from exc
        answer = orjson.loads(reply.data)
        if "error" in answer:
            error = answer["error"]
            raise RejectedError(int(error.get("err_code", 0)), str(error.get("description")))
        return int(answer["seq"])

    async def _know_last(self, parts: Iterable[str]) -> None:
        api = self._check_api()
        parts = list(parts)
        found = await asyncio.gather(
            *(
                api.get_one(self.names.messages, {"last_by_subj": self.names.messages_of(part)})
                for part in parts
            )
        )
        for part, got in zip(parts, found, strict=True):
            self._last[part] = (got.seq, got.json()["b"]) if got is not None else (0, 0)

    async def _refresh_append(self, chunk: list[tuple[_Job, int, NewMessage]]) -> None:
        """After a conflict: re-read the partitions' last messages and the keys."""
        names = self.names
        await self._know_last({names.partition(*new.partition) for _, _, new in chunk})
        digests = {
            dedupe_digest(new.sender, new.recipient, new.dedupe_key): new
            for _, _, new in chunk
            if new.dedupe_key is not None
        }
        if digests:
            api = self._check_api()
            for got in await api.get_last(
                names.messages, [names.dedupe(digest) for digest in digests]
            ):
                record = got.json()
                digest = bytes.fromhex(got.subject.rsplit(".", 1)[1])
                self._dedupe.put(digest, record["i"], record["b"], record["c"], got.seq)

    # --- notifications -----------------------------------------------------------

    def watch(self, listener: ReadyListener) -> Callable[[], None]:
        """Call ``listener(recipient, name)`` when a partition may have become
        claimable, here or on another node."""
        self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    def _notify(self, key: _Key) -> None:
        for listener in list(self._listeners):
            listener(*key)

    def _announce(self, keys: Iterable[_Key], *, returned: bool) -> None:
        keys = list(keys)
        for key in keys:
            self._notify(key)
        nc = self._nc
        if nc is None or not keys:
            return
        news = orjson.dumps({"n": self._node, "r": returned, "k": keys})
        task = asyncio.ensure_future(nc.publish(self.names.ready, news))
        task.add_done_callback(_quiet)

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

    def _count(self, counts: dict[str, int]) -> None:
        """Move the per-app pending counters (waited for by :meth:`backlog`)."""
        nc = self._nc
        if nc is None:
            return
        for recipient, delta in counts.items():
            if delta == 0:
                continue
            task = asyncio.ensure_future(self._increment(self.names.count(recipient), delta))
            self._counting.add(task)
            task.add_done_callback(self._counting.discard)

    async def _increment(self, subject: str, delta: int) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            await nc.request(subject, b"", timeout=10, headers={"Nats-Incr": f"{delta:+d}"})
        except Exception as exc:
            log.warning("could not count pending messages on %s: %r", subject, exc)

    # --- partitions ----------------------------------------------------------------

    def _part(self, key: _Key) -> _Part:
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = _Part(key, self.names.partition(*key))
        return part

    def _set_live(self, part: _Part, idem: str, live: Live) -> None:
        part.live[idem] = live
        self._where[idem] = part
        heapq.heappush(part.heap, (live.claimable_at(self._policy), idem, live.rev))

    def _drop_live(self, idem: str) -> None:
        part = self._where.pop(idem, None)
        if part is not None:
            part.live.pop(idem, None)

    async def _load(self, part: _Part) -> None:
        """Read the partition's cursor and every message that left its line."""
        api = self._check_api()
        cursor, lives = await asyncio.gather(
            api.get_one(self.names.state, {"last_by_subj": self.names.cursor(part.token)}),
            api.get_after(self.names.state, self.names.lives_of(part.token), 1, _PAGE),
        )
        if len(lives) >= _PAGE:
            lives = await self._read_all(self.names.state, self.names.lives_of(part.token))
        if cursor is not None:
            part.cursor_rev, part.cursor_seq = cursor.seq, cursor.json()["q"]
        else:
            part.cursor_rev = part.cursor_seq = 0
        upto = lives.upto
        current: dict[str, Live] = {}
        for got in lives:
            record = got.json()
            if is_gone(record):
                continue
            idem = self.names.split(got.subject)[3]
            live = Live.from_json(got.seq, record)
            old = part.live.get(idem)
            live.mine = old is not None and old.mine and old.token == live.token
            current[idem] = live
        for idem, old in part.live.items():
            if idem not in current and upto and old.rev > upto:
                current[idem] = old  # written here after the read
        for idem in part.live.keys() - current.keys():
            self._where.pop(idem, None)
        part.live = {}
        part.heap = []
        for idem, live in current.items():
            self._set_live(part, idem, live)
        part.loaded = True
        part.stale = False

    # --- claims --------------------------------------------------------------------

    async def claim(
        self, recipient: str, name: str, *, limit: int, now_ms: int, policy: DeliveryPolicy
    ) -> Claim:
        """Lease up to ``limit`` claimable messages of a partition, first
        deliveries in block order; messages that came back go first."""
        self._check_open()
        if limit <= 0:
            return Claim()
        self._policy = policy
        part = self._part((recipient, name))
        async with part.lock:
            part.used_at = time.monotonic()
            if not part.loaded or part.stale:
                await self._load(part)
            try:
                for attempt in range(_RETRIES):
                    candidates: list[str] = []
                    try:
                        return await self._claim_once(
                            part, min(limit, _CLAIM_MAX), now_ms, policy, candidates
                        )
                    except ConflictError:
                        # Another node claimed first: read what it did, then try again
                        # a moment later (two nodes retrying in step would collide again).
                        await self._load(part)
                        await self._learn(part, candidates)
                        await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            except BaseException:
                part.stale = True  # what the claim took off the schedule is read again
                raise
        # Still colliding: nothing this time, and the caller is told to come back.
        asyncio.get_running_loop().call_later(0.05, self._notify, part.key)
        return Claim(next_visible_ms=self._next_visible(part, policy))

    def _due(self, part: _Part, now_ms: int, policy: DeliveryPolicy, limit: int) -> list[str]:
        due: list[str] = []
        later: list[tuple[int, str, int]] = []
        while part.heap and len(due) < limit and part.heap[0][0] <= now_ms:
            _, idem, rev = heapq.heappop(part.heap)
            live = part.live.get(idem)
            if live is None or live.rev != rev:
                continue
            actual = live.claimable_at(policy)
            if actual > now_ms:
                later.append((actual, idem, rev))
            elif idem not in due:
                due.append(idem)
        for entry in later:
            heapq.heappush(part.heap, entry)
        return due

    def _next_visible(self, part: _Part, policy: DeliveryPolicy) -> int | None:
        while part.heap:
            at, idem, rev = part.heap[0]
            live = part.live.get(idem)
            if live is not None and live.rev == rev and live.claimable_at(policy) == at:
                return at
            heapq.heappop(part.heap)
            if live is not None and live.rev == rev:
                heapq.heappush(part.heap, (live.claimable_at(policy), idem, rev))
        return None

    async def _learn(self, part: _Part, idems: list[str]) -> None:
        """What became of messages a claim took for first deliveries and
        could not lease: another node deferred or settled them first."""
        if not idems:
            return
        api = self._check_api()
        found = await api.get_last(
            self.names.state, [self.names.state_of(part.token, idem) for idem in idems]
        )
        for got in found:
            kind, _, _, idem = self.names.split(got.subject)
            record = got.json()
            if kind == "l" and not is_gone(record):
                if idem not in part.live:
                    self._set_live(part, idem, Live.from_json(got.seq, record))
            elif kind in ("x", "d") and not is_gone(record):
                part.skipped.add(idem)

    async def _claim_once(
        self,
        part: _Part,
        limit: int,
        now_ms: int,
        policy: DeliveryPolicy,
        candidates: list[str],
    ) -> Claim:
        api = self._check_api()
        names = self.names
        outs: list[Out] = []
        # (idem, position in outs, new Live or None when settled instead)
        changes: list[tuple[str, int, Live | None]] = []
        dead: list[str] = []
        expired: list[str] = []
        taken: list[str] = []
        due = self._due(part, now_ms, policy, limit)
        for idem in due:
            live = part.live[idem]
            if live.expires_at_ms is not None and live.expires_at_ms <= now_ms:
                self._settle_outs(
                    outs, part, idem, live, MessageState.EXPIRED, "ttl expired", now_ms
                )
                changes.append((idem, len(outs) - 1, None))
                expired.append(idem)
            elif live.attempts >= policy.max_deliveries:
                reason = limit_reason(live.attempts, "ack deadline passed")
                self._settle_outs(outs, part, idem, live, MessageState.DEAD, reason, now_ms)
                changes.append((idem, len(outs) - 1, None))
                dead.append(idem)
            else:
                leased = Live(
                    rev=0,
                    attempts=live.attempts + 1,
                    visible_at_ms=live.visible_at_ms,
                    token=_new_token(),
                    deadline_ms=now_ms + policy.lease_ms,
                    seq=live.seq,
                    block=live.block,
                    expires_at_ms=live.expires_at_ms,
                    mine=True,
                )
                outs.append(
                    Out(
                        names.live(part.token, idem),
                        leased.to_json(),
                        live.rev,
                        names.state_of(part.token, idem),
                    )
                )
                changes.append((idem, len(outs) - 1, leased))
                taken.append(idem)
        firsts: dict[str, StoredMessage] = {}
        cursor_seq = part.cursor_seq
        need = limit - len(taken)
        while need > 0:
            page = await api.get_after(
                names.messages, names.messages_of(part.token), cursor_seq + 1, need
            )
            asked, need = need, 0
            for got in page:
                cursor_seq = got.seq
                idem = names.split(got.subject)[3]
                if idem in part.live:
                    continue  # deferred or redriven before its first claim
                if idem in part.skipped:
                    part.skipped.discard(idem)
                    continue
                candidates.append(idem)
                record = got.json()
                message = (
                    message_from(part.key[0], part.key[1], idem, record, None)
                    if not record.get("v")
                    else None
                )
                expires = record.get("x")
                if expires is not None and expires <= now_ms:
                    outs.append(
                        Out(
                            names.settled(part.token, idem, MessageState.EXPIRED),
                            settled_json(
                                MessageState.EXPIRED, now_ms, "ttl expired", got.seq, record["b"], 0
                            ),
                            0,
                            names.state_of(part.token, idem),
                        )
                    )
                    changes.append((idem, len(outs) - 1, None))
                    expired.append(idem)
                    continue
                leased = Live(
                    rev=0,
                    attempts=1,
                    visible_at_ms=0,
                    token=_new_token(),
                    deadline_ms=now_ms + policy.lease_ms,
                    seq=got.seq,
                    block=record["b"],
                    expires_at_ms=expires,
                    mine=True,
                )
                outs.append(
                    Out(
                        names.live(part.token, idem),
                        leased.to_json(),
                        0,
                        names.state_of(part.token, idem),
                    )
                )
                changes.append((idem, len(outs) - 1, leased))
                taken.append(idem)
                if message is not None:
                    firsts[idem] = message
            if len(page) < asked:
                break
            need = limit - len(taken)
        if cursor_seq != part.cursor_seq:
            outs.append(
                Out(
                    names.cursor(part.token),
                    orjson.dumps({"q": cursor_seq}),
                    part.cursor_rev,
                )
            )
        # Bodies of what came back, and of memory-only first deliveries.
        wanted = [names.message(part.token, idem) for idem in taken if idem not in firsts]
        bodies = await self._messages(wanted) if wanted else {}
        if not outs:
            return Claim(next_visible_ms=self._next_visible(part, policy))
        last_seq = await api.atomic(outs)
        first_seq = last_seq - len(outs) + 1
        if cursor_seq != part.cursor_seq:
            part.cursor_seq, part.cursor_rev = cursor_seq, last_seq
        leases: list[Lease] = []
        lost: list[str] = []
        for idem, position, change in changes:
            if change is None:
                self._drop_live(idem)
                continue
            change.rev = first_seq + position
            self._set_live(part, idem, change)
            message = firsts.get(idem) or bodies.get(idem)
            if message is None:
                lost.append(idem)
                continue
            leases.append(
                Lease(
                    replace(message, attempts=change.attempts, visible_at_ms=change.visible_at_ms),
                    change.token,
                    change.deadline_ms,
                )
            )
        settled = len(dead) + len(expired)
        if settled:
            self._count({part.key[0]: -settled})
        if lost:
            # Memory-only messages whose bodies NATS lost in a restart.
            await self._settle_known(
                [
                    (idem, MessageState.DEAD, "persist: false message lost when NATS restarted")
                    for idem in lost
                ],
                now_ms,
            )
        return Claim(
            leases=tuple(leases),
            dead=tuple(dead),
            expired=tuple(expired),
            next_visible_ms=self._next_visible(part, policy),
        )

    def _settle_outs(
        self,
        outs: list[Out],
        part: _Part,
        idem: str,
        live: Live | None,
        state: MessageState,
        reason: str | None,
        now_ms: int,
        *,
        seq: int = 0,
        block: int = 0,
    ) -> None:
        """The writes that settle one message: its live record ends (if it
        has one) and its settled record is written, after the last."""
        names = self.names
        if live is not None:
            outs.append(
                Out(
                    names.live(part.token, idem),
                    GONE,
                    live.rev,
                    names.state_of(part.token, idem),
                    ttl_s=_TOMBSTONE_TTL_S,
                )
            )
            seq, block = live.seq, live.block
        attempts = live.attempts if live is not None else 0
        record = settled_json(state, now_ms, reason, seq, block, attempts)
        subject = names.settled(part.token, idem, state)
        if live is None:
            outs.append(Out(subject, record, 0, names.state_of(part.token, idem)))
        else:
            outs.append(Out(subject, record))

    # --- leases ----------------------------------------------------------------------

    async def extend(self, idem: str, token: int, deadline_ms: int) -> bool:
        """Move a lease's deadline; ``False`` if it is no longer ``token``'s."""
        api = self._check_open()
        part = self._where.get(idem)
        live = part.live.get(idem) if part is not None else None
        if part is None or live is None or live.token != token or not token:
            return False
        moved = replace(live, deadline_ms=deadline_ms)
        try:
            moved.rev = await api.atomic(
                [
                    Out(
                        self.names.live(part.token, idem),
                        moved.to_json(),
                        live.rev,
                        self.names.state_of(part.token, idem),
                    )
                ]
            )
        except ConflictError:
            self._drop_live(idem)
            part.stale = True
            return False
        if part.live.get(idem) is live:
            self._set_live(part, idem, moved)
        return True

    async def release(
        self, releases: Sequence[Release], *, now_ms: int, policy: DeliveryPolicy
    ) -> list[Released]:
        """End leases unsettled: claimable again (after the backoff if the
        delivery failed) or dead-lettered at the delivery limit."""
        self._check_open()
        self._policy = policy
        out: list[Released | None] = [None] * len(releases)
        plan: list[tuple[int, Release, _Part, Live]] = []
        seen: set[str] = set()
        for index, release in enumerate(releases):
            part = self._where.get(release.idem)
            live = part.live.get(release.idem) if part is not None else None
            if (
                part is None
                or live is None
                or not live.token
                or live.token != release.token
                or release.idem in seen
            ):
                out[index] = Released(stale=True)
                continue
            seen.add(release.idem)
            plan.append((index, release, part, live))
        if plan:
            await self._write_releases(plan, out, now_ms, policy)
        return [item if item is not None else Released(stale=True) for item in out]

    async def _write_releases(
        self,
        plan: list[tuple[int, Release, _Part, Live]],
        out: list[Released | None],
        now_ms: int,
        policy: DeliveryPolicy,
    ) -> None:
        api = self._check_api()
        names = self.names
        outs: list[Out] = []
        changes: list[tuple[int, str, _Part, Live | None, int, Released]] = []
        for index, release, part, live in plan:
            attempts = live.attempts if release.delivered else max(0, live.attempts - 1)
            if release.delivered and attempts >= policy.max_deliveries:
                reason = limit_reason(attempts, release.failure)
                self._settle_outs(
                    outs,
                    part,
                    release.idem,
                    replace(live, attempts=attempts),
                    MessageState.DEAD,
                    reason,
                    now_ms,
                )
                changes.append(
                    (index, release.idem, part, None, len(outs) - 1, Released(dead=True))
                )
                continue
            delay = policy.backoff_after(attempts) if release.failure is not None else 0
            back = replace(
                live,
                attempts=attempts,
                visible_at_ms=now_ms + delay,
                token=0,
                deadline_ms=0,
                mine=False,
            )
            outs.append(
                Out(
                    names.live(part.token, release.idem),
                    back.to_json(),
                    live.rev,
                    names.state_of(part.token, release.idem),
                )
            )
            changes.append(
                (
                    index,
                    release.idem,
                    part,
                    back,
                    len(outs) - 1,
                    Released(visible_at_ms=now_ms + delay),
                )
            )
        try:
            last_seq = await api.atomic(outs)
        except ConflictError:
            if len(plan) == 1:
                index, release, part, _ = plan[0]
                self._drop_live(release.idem)
                part.stale = True
                out[index] = Released(stale=True)
                return
            for item in plan:
                await self._write_releases([item], out, now_ms, policy)
            return
        first_seq = last_seq - len(outs) + 1
        ready: set[_Key] = set()
        dead_by_app: dict[str, int] = {}
        for index, idem, part, change, position, result in changes:
            out[index] = result
            if change is None:
                self._drop_live(idem)
                dead_by_app[part.key[0]] = dead_by_app.get(part.key[0], 0) - 1
                continue
            change.rev = first_seq + position
            self._set_live(part, idem, change)
            if change.visible_at_ms <= now_ms:
                ready.add(part.key)
        self._count(dead_by_app)
        if ready:
            self._announce(ready, returned=True)

    async def defer(self, idem: str, visible_at_ms: int, now_ms: int) -> bool:
        """Make a pending message claimable only at ``visible_at_ms``, ending
        any lease on it; ``False`` if it is unknown or settled."""
        api = self._check_open()
        names = self.names
        for _ in range(_RETRIES):
            found = await self._locate(idem)
            if found is None:
                return False
            part, live, message_seq, block, expires = found
            attempts = live.attempts if live is not None else 0
            later = Live(
                rev=0,
                attempts=attempts,
                visible_at_ms=visible_at_ms,
                token=0,
                deadline_ms=0,
                seq=message_seq,
                block=block,
                expires_at_ms=expires,
            )
            try:
                later.rev = await api.atomic(
                    [
                        Out(
                            names.live(part.token, idem),
                            later.to_json(),
                            live.rev if live is not None else 0,
                            names.state_of(part.token, idem),
                        )
                    ]
                )
            except ConflictError:
                self._drop_live(idem)
                continue
            self._set_live(part, idem, later)
            if visible_at_ms <= now_ms:
                self._announce([part.key], returned=True)
            return True
        raise StoreError("deferring kept conflicting with other engine nodes")

    async def _locate(self, idem: str) -> tuple[_Part, Live | None, int, int, int | None] | None:
        """Where a pending message stands: its partition, live state (if it
        left the line), sequence, block, expiry. ``None``: unknown or settled."""
        part = self._where.get(idem)
        live = part.live.get(idem) if part is not None else None
        if part is not None and live is not None:
            return part, live, live.seq, live.block, live.expires_at_ms
        states = await self._state_of([idem])
        state = states.get(idem)
        if state is not None:
            kind, recipient, name, _ = self.names.split(state.subject)
            record = state.json()
            if kind != "l" or is_gone(record):
                return None
            part = self._part((recipient, name))
            live = Live.from_json(state.seq, record)
            self._set_live(part, idem, live)
            return part, live, live.seq, live.block, live.expires_at_ms
        api = self._check_api()
        found = await api.get_last(self.names.messages, [self.names.message_anywhere(idem)])
        if not found:
            return None
        got = found[0]
        _, recipient, name, _ = self.names.split(got.subject)
        record = got.json()
        return self._part((recipient, name)), None, got.seq, record["b"], record.get("x")

    # --- settlements -----------------------------------------------------------------

    async def settle(self, settlements: Sequence[Settlement], *, now_ms: int) -> list[bool]:
        """Settle pending messages, ending any lease on them; ``False`` for
        each one unknown or already settled."""
        self._check_open()
        for item in settlements:
            if item.state is MessageState.PENDING:
                raise ValueError("settle() moves a message out of PENDING; use redrive()")
        return await self._settle_known(
            [(item.idem, item.state, item.reason) for item in settlements], now_ms
        )

    async def _settle_known(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        """Settle in one atomic batch; if another node changed one of them
        meanwhile, one by one."""
        api = self._check_api()
        done = [False] * len(items)
        plan: list[tuple[int, _Part]] = []
        outs: list[Out] = []
        seen: set[str] = set()
        for index, (idem, state, reason) in enumerate(items):
            if idem in seen:
                continue
            seen.add(idem)
            found = await self._locate(idem)
            if found is None:
                continue
            part, live, seq, block, _ = found
            self._settle_outs(outs, part, idem, live, state, reason, now_ms, seq=seq, block=block)
            plan.append((index, part))
        if not outs:
            return done
        if len(outs) <= MAX_BATCH:
            try:
                await api.atomic(outs)
            except ConflictError:
                pass
            else:
                self._settled_here([(items[index][0], part) for index, part in plan])
                for index, _ in plan:
                    done[index] = True
                return done
        for index, _ in plan:
            done[index] = await self._settle_one(*items[index], now_ms)
        return done

    async def _settle_one(
        self, idem: str, state: MessageState, reason: str | None, now_ms: int
    ) -> bool:
        api = self._check_api()
        for _ in range(_RETRIES):
            found = await self._locate(idem)
            if found is None:
                return False
            part, live, seq, block, _ = found
            outs: list[Out] = []
            self._settle_outs(outs, part, idem, live, state, reason, now_ms, seq=seq, block=block)
            try:
                await api.atomic(outs)
            except ConflictError:
                self._drop_live(idem)  # read it again
                part.stale = True
                continue
            self._settled_here([(idem, part)])
            return True
        raise StoreError("settling kept conflicting with other engine nodes")

    def _settled_here(self, settled: Sequence[tuple[str, _Part]]) -> None:
        counts: dict[str, int] = {}
        for idem, part in settled:
            self._drop_live(idem)
            counts[part.key[0]] = counts.get(part.key[0], 0) - 1
        self._count(counts)

    # --- dead letters ----------------------------------------------------------------

    async def _dead_records(self, recipient: str) -> list[tuple[int, str, str, dict[str, Any]]]:
        self._check_open()
        out = []
        for got in await self._read_all(self.names.state, self.names.dead_of(recipient)):
            record = got.json()
            if is_gone(record):
                continue
            _, _, name, idem = self.names.split(got.subject)
            out.append((record["at"], idem, name, record))
        return out

    async def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        """Dead letters of an app, most recently settled first."""
        records = sorted(await self._dead_records(recipient), reverse=True)[: max(limit, 0)]
        messages = await self._messages(
            [
                self.names.message(self.names.partition(recipient, name), idem)
                for _, idem, name, _ in records
            ]
        )
        out = []
        for at, idem, _, record in records:
            message = messages.get(idem)
            if message is not None:
                out.append(
                    replace(
                        message,
                        state=MessageState.DEAD,
                        settled_at_ms=at,
                        dead_reason=record.get("why"),
                        attempts=record.get("a", 0),
                    )
                )
        return out

    async def list_dead_refs(self, recipient: str) -> list[DeadRef]:
        """Every dead letter of an app, oldest first, without bodies."""
        return [
            DeadRef(at, idem, name)
            for at, idem, name, _ in sorted(await self._dead_records(recipient))
        ]

    async def redrive(self, idem: str, now_ms: int) -> bool:
        """Return a dead letter to PENDING (attempts reset, claimable now)."""
        api = self._check_open()
        states = await self._state_of([idem])
        state = states.get(idem)
        if state is None:
            return False
        kind, recipient, name, _ = self.names.split(state.subject)
        record = state.json()
        if kind != "d" or is_gone(record):
            return False
        part = self._part((recipient, name))
        again = Live(
            rev=0,
            attempts=0,
            visible_at_ms=now_ms,
            token=0,
            deadline_ms=0,
            seq=record["q"],
            block=record["b"],
            expires_at_ms=None,
        )
        try:
            again.rev = await api.atomic(
                [
                    Out(
                        state.subject,
                        GONE,
                        state.seq,
                        self.names.state_of(part.token, idem),
                        ttl_s=_TOMBSTONE_TTL_S,
                    ),
                    Out(self.names.live(part.token, idem), again.to_json()),
                ]
            )
        except ConflictError:
            return False
        self._set_live(part, idem, again)
        self._count({recipient: 1})
        self._announce([part.key], returned=True)
        return True

    async def adopt_redriven(self) -> int:
        """Redrives by other processes reach this node through NATS; nothing to adopt."""
        self._check_open()
        return 0

    # --- housekeeping ----------------------------------------------------------------

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
                page = await api.get_after(
                    self.names.state, f"{self.names.ns}.{kind}.>", seq, _PAGE
                )
                for got in page:
                    record = got.json()
                    if is_gone(record):
                        continue
                    if record["at"] >= settled_before_ms:
                        break
                    await self._prune_one(got, record, lasts)
                    removed += 1
                else:
                    if len(page) == _PAGE:
                        seq = page[-1].seq + 1
                        continue
                break
        return removed

    async def _prune_one(self, got: Got, record: dict[str, Any], lasts: dict[str, int]) -> None:
        api = self._check_api()
        _, recipient, name, idem = self.names.split(got.subject)
        part = self.names.partition(recipient, name)
        if part not in lasts:
            last = await api.get_one(
                self.names.messages, {"last_by_subj": self.names.messages_of(part)}
            )
            lasts[part] = last.seq if last is not None else 0
        if record["q"] != lasts[part]:
            # The last message of a partition stays: the numbering goes on from it.
            await api.delete(self.names.messages, record["q"])
        await api.delete(self.names.state, got.seq)
        body = await api.get_one(self.names.volatile, {"last_by_subj": self.names.body(idem)})
        if body is not None:
            await api.delete(self.names.volatile, body.seq)

    async def _refresh_forever(self) -> None:
        """Re-read the leases of partitions claimed from lately: a node that died
        left leases that run out, and only reading finds them."""
        while True:
            await asyncio.sleep(self._refresh_s)
            now = time.monotonic()
            for part in list(self._parts.values()):
                if not part.loaded or now - part.used_at > _ACTIVE_S or part.lock.locked():
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


def _numbered(new: NewMessage, block: int) -> StoredMessage:
    return StoredMessage(
        idem=new.idem,
        recipient=new.recipient,
        name=new.name,
        block=block,
        payload=new.payload,
        metadata=new.metadata,
        sender=new.sender,
        created_at_ms=new.created_at_ms,
        payload_metadata=new.payload_metadata,
        expires_at_ms=new.expires_at_ms,
        dedupe_key=new.dedupe_key,
        persist=new.persist,
    )


def _new_token() -> int:
    return secrets.randbits(62) or 1


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
