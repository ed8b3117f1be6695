"""The few JetStream requests the backend makes, over one nats-py connection.

nats-py's JetStream helpers await one reply per published message and know
nothing of atomic batches or batched direct gets; the backend needs both,
so it speaks the JetStream API subjects itself:

* ``$JS.API.STREAM.CREATE`` / ``INFO`` / ``DELETE`` / ``MSG.DELETE``;
* ``$JS.API.DIRECT.GET.<stream>`` with ``batch`` / ``multi_last``: many
  stored messages in one request, streamed back and ended by a ``204``
  status message;
* atomic batch publishes (``Nats-Batch-Id``, ``Nats-Batch-Sequence``,
  ``Nats-Batch-Commit``): all messages stored, at consecutive sequences, or
  none; each may carry ``Nats-Expected-Last-Subject-Sequence`` (with
  ``-Subject`` naming a filter), which makes a batch a multi-subject
  compare-and-set.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ensync.server.store.base import StoreError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.errors import Error as NatsError
else:
    try:
        from nats.errors import Error as NatsError
    except ModuleNotFoundError:
        # Without the cluster extra no NATS store can be opened (open_store
        # says so); the engine still imports this package.
        class NatsError(Exception):
            """Stands in for nats-py's error root."""


__all__ = [
    "Batch",
    "ConflictError",
    "Got",
    "JetStreamApi",
    "NatsError",
    "Out",
    "RejectedError",
]

EXPECT = "Nats-Expected-Last-Subject-Sequence"
EXPECT_FILTER = "Nats-Expected-Last-Subject-Sequence-Subject"
TTL = "Nats-TTL"
# On a write: keep only this message on its subject (streams with allow_rollup_hdrs).
ROLLUP = {"Nats-Rollup": "sub"}
# JetStream error codes the backend acts on.
STREAM_NAME_IN_USE = 10058  # a stream of that name exists, configured otherwise
STREAM_NOT_FOUND = 10059
# An expected last sequence that did not hold: someone wrote first. A single
# server says 10071 (with the sequence it found); a replicated stream says
# 10164 (the same, without it), or 10163 when a write to the subject is
# still being replicated and the last sequence is not known yet. 10164 also
# answers a batch that expects on one subject twice, which no retry mends:
# every retry is bounded.
CONFLICTS = frozenset({10071, 10163, 10164})
# Atomic batches hold at most this many messages (the server's default limit).
MAX_BATCH = 1000


class ConflictError(StoreError):
    """An expected last sequence did not hold: someone wrote first (or is
    writing). Read again, wait a little and retry, a bounded number of times."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"JetStream refused the write ({code}): {description}")
        self.code = code


class RejectedError(StoreError):
    """The server refused a publish or batch for another reason."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"JetStream refused the write ({code}): {description}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Out:
    """One message of an atomic batch.

    ``expect`` is the sequence the last message on ``expect_filter`` (or on
    ``subject`` itself) must have, 0 for none; ``None`` checks nothing.
    """

    subject: str
    data: bytes
    expect: int | None = None
    expect_filter: str | None = None
    ttl_s: int | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Got:
    """A stored message read back."""

    subject: str
    seq: int
    data: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return orjson.loads(self.data)


class Batch(list[Got]):
    """Messages of one batched read; ``upto`` is the stream's last sequence
    when it was read (what the read could have seen)."""

    upto: int = 0


class _Collector:
    __slots__ = ("done", "got")

    def __init__(self) -> None:
        self.got: list[Msg] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class JetStreamApi:
    """Requests over an open nats-py connection; errors become :class:`StoreError`."""

    def __init__(self, connection: Client, *, timeout_s: float = 10.0) -> None:
        self._nc = connection
        self._timeout_s = timeout_s
        self._inbox = f"_INBOX.ensync.{secrets.token_hex(8)}"
        self._tokens = itertools.count(1)
        self._waiting: dict[str, _Collector] = {}
        self._subscription: Any = None

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def stop(self) -> None:
        for collector in self._waiting.values():
            if not collector.done.done():
                collector.done.set_exception(StoreError("the NATS connection closed"))
        self._waiting.clear()

    async def _on_reply(self, msg: Msg) -> None:
        collector = self._waiting.get(msg.subject)
        if collector is None or collector.done.done():
            return
        collector.got.append(msg)
        if (msg.headers or {}).get("Status") is not None:  # 204 ends a batch, or an error
            collector.done.set_result(None)

    # --- plain requests --------------------------------------------------------

    async def request(
        self, subject: str, body: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """A JetStream API request; its JSON answer. API errors raise
        :class:`RejectedError` (with the JetStream error code)."""
        payload = orjson.dumps(body) if body is not None else b""
        try:
            reply = await self._nc.request(
                subject, payload, timeout=timeout_s if timeout_s is not None else self._timeout_s
            )
        except NatsError as exc:  # timeouts, no responders, connection closed: not done
            raise StoreError(f"NATS request {subject} failed: {exc!r}") from exc
        return _answer(reply.data)

    async def publish(self, subject: str, data: bytes) -> int:
        """A plain publish that JetStream acknowledges; its sequence."""
        try:
            reply = await self._nc.request(subject, data, timeout=self._timeout_s)
        except NatsError as exc:  # timeouts, no responders, connection closed: not done
            raise StoreError(f"writing {subject} failed: {exc!r}") from exc
        return int(_answer(reply.data)["seq"])

    async def ready(self, within_s: float) -> None:
        """Wait until JetStream answers (a new cluster elects its leader first).

        Raises:
            StoreError: it did not answer within ``within_s``; says why.
        """
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            try:
                await self.request("$JS.API.INFO", timeout_s=2.0)
                return
            except StoreError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise StoreError(
                        f"JetStream did not answer within {within_s:.0f} s (is it enabled on"
                        f" the NATS servers, and do they form a quorum?): {exc}"
                    ) from exc
                await asyncio.sleep(0.25)

    # --- reads -----------------------------------------------------------------

    async def get_one(self, stream: str, query: Mapping[str, Any]) -> Got | None:
        """One stored message (``seq`` or ``last_by_subj``), or ``None``."""
        try:
            msg = await self._nc.request(
                f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(query), timeout=self._timeout_s
            )
        except NatsError as exc:
            raise StoreError(f"reading {stream} failed: {exc!r}") from exc
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status is not None:
            raise StoreError(f"reading {stream} failed: status {status} {headers}")
        return Got(headers["Nats-Subject"], int(headers["Nats-Sequence"]), msg.data, headers)

    async def get_batch(self, stream: str, query: Mapping[str, Any]) -> Batch:
        """Messages a batched direct get answers (``batch`` or ``multi_last``)."""
        token = f"{self._inbox}.{next(self._tokens)}"
        collector = _Collector()
        self._waiting[token] = collector
        try:
            await self._nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(query), reply=token)
            # Not wait_for: on Python 3.11 it can swallow a cancellation (ensync._tasks).
            async with asyncio.timeout(self._timeout_s):
                await collector.done
        except (NatsError, TimeoutError) as exc:  # the publish failed, or no end of batch came
            raise StoreError(f"reading {stream} failed: {exc!r}") from exc
        finally:
            self._waiting.pop(token, None)
        out = Batch()
        for msg in collector.got:
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is not None:
                if status in ("204", "404"):
                    out.upto = int(headers.get("Nats-Last-Sequence") or 0)
                    break
                raise StoreError(f"reading {stream} failed: status {status} {headers}")
            out.append(
                Got(headers["Nats-Subject"], int(headers["Nats-Sequence"]), msg.data, headers)
            )
        return out

    async def get_last(self, stream: str, subjects: Sequence[str]) -> list[Got]:
        """The last message of each subject (filters allowed) that has one."""
        found: list[Got] = []
        for start in range(0, len(subjects), 1024):
            chunk = list(subjects[start : start + 1024])
            found += await self.get_batch(stream, {"multi_last": chunk, "batch": 100_000})
        return found

    async def get_after(self, stream: str, subject: str, seq: int, count: int) -> Batch:
        """Up to ``count`` messages on ``subject`` (a filter) from ``seq`` on."""
        return await self.get_batch(
            stream, {"seq": max(seq, 1), "next_by_subj": subject, "batch": count}
        )

    # --- writes ----------------------------------------------------------------

    async def atomic(self, messages: Sequence[Out]) -> int:
        """Store ``messages`` all or none; the sequence of the last one (the
        others are the ones before it).

        Raises:
            ConflictError: an expected last sequence did not hold.
            RejectedError: another refusal (too large, duplicate id, ...).
            StoreError: NATS did not take or answer the batch.
        """
        if not messages:
            raise ValueError("an atomic batch holds at least one message")
        if len(messages) > MAX_BATCH:
            raise ValueError(f"an atomic batch holds at most {MAX_BATCH} messages")
        batch_id = secrets.token_hex(8)
        last = len(messages)
        try:
            for number, out in enumerate(messages, 1):
                headers: dict[str, str] = {
                    "Nats-Batch-Id": batch_id,
                    "Nats-Batch-Sequence": str(number),
                }
                if out.headers:
                    headers.update(out.headers)
                if out.expect is not None:
                    headers[EXPECT] = str(out.expect)
                    if out.expect_filter is not None:
                        headers[EXPECT_FILTER] = out.expect_filter
                if out.ttl_s is not None:
                    headers[TTL] = f"{out.ttl_s}s"
                if number == last:
                    headers["Nats-Batch-Commit"] = "1"
                    reply = await self._nc.request(
                        out.subject, out.data, timeout=self._timeout_s, headers=headers
                    )
                else:
                    await self._nc.publish(out.subject, out.data, headers=headers)
        except NatsError as exc:
            raise StoreError(f"writing to JetStream failed: {exc!r}") from exc
        return int(_answer(reply.data)["seq"])

    async def delete(self, stream: str, seq: int) -> bool:
        """Remove one stored message; ``False`` if it was not there."""
        try:
            answer = await self.request(
                f"$JS.API.STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True}
            )
        except RejectedError:
            return False
        return bool(answer.get("success"))


def _answer(data: bytes) -> Any:
    """A JetStream JSON answer, or its error raised: :class:`ConflictError` for
    an expected last sequence that did not hold (:data:`CONFLICTS`),
    :class:`RejectedError` (with the code) otherwise."""
    answer = orjson.loads(data) if data else {}
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        code, description = int(error.get("err_code", 0)), str(error.get("description"))
        if code in CONFLICTS:
            raise ConflictError(code, description)
        raise RejectedError(code, description)
    return answer
