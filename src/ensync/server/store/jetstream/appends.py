"""Appends: numbering, idempotency keys and group commit.

Concurrent ``append`` calls share one write; a write is an atomic batch in
which the first message of each partition expects the partition's last
sequence and each idempotency key record expects its subject empty (or
the expired record it replaces). A conflict (another node appended to the
partition first, or is appending) re-reads those and tries again after a
short random pause, at most ``RETRIES`` times.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import orjson

from ensync.server.store.base import Appended, NewMessage, StoredMessage, StoreError
from ensync.server.store.jetstream._common import RETRIES, Common, pause_after_conflict
from ensync.server.store.jetstream.api import MAX_BATCH, ConflictError, Out, RejectedError
from ensync.server.store.jetstream.records import body_json, message_json
from ensync.server.store.numbering import dedupe_digest

__all__ = ["Appends"]

_DEDUPE_CACHE = 100_000


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


class Appends(Common):
    """The ``append`` of :class:`~ensync.server.store.base.MessageLog`."""

    def _init_appends(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}  # partition token -> (seq, block) of its last
        self._dedupe = _Dedupe()
        self._jobs: list[_Job] = []
        self._append_lock = asyncio.Lock()

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
        for attempt in range(RETRIES):
            outs: list[Out] = []
            placed: list[tuple[tuple[_Job, int, NewMessage], StoredMessage, int]] = []
            keys: dict[bytes, StoredMessage] = {}
            repeats: list[tuple[tuple[_Job, int, NewMessage], bytes]] = []
            duplicates: dict[tuple[int, int], Appended] = {}
            need = {names.partition(*new.partition) for _, _, new in chunk}
            await self._know_last(need - self._last.keys())
            # This try's numbering, on a copy of what it needs: a conflict retries afresh.
            last = {part: self._last[part] for part in need}
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
                message = new.numbered(block + 1)
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
                        api.publish(names.body(message.idem), body_json(message))
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
                # The pause first: what the other node is writing lands before the re-read.
                await pause_after_conflict(attempt)
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
