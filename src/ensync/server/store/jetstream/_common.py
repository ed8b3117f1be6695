"""What every part of the JetStream backend shares: the connection, the
partitions known here, notifications and the reads all of them make."""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ensync.server.store.base import (
    DeliveryPolicy,
    MessageState,
    ReadyListener,
    StoredMessage,
    StoreError,
)
from ensync.server.store.jetstream.api import Batch, Got, JetStreamApi, NatsError, Out
from ensync.server.store.jetstream.records import GONE, Live, Names, message_from, settled_json

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "PAGE",
    "RETRIES",
    "TOMBSTONE_TTL_S",
    "Common",
    "Key",
    "Part",
    "conflict_pause_s",
    "new_token",
    "pause_after_conflict",
    "quiet",
]

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Tombstones of state subjects vanish after this long.
TOMBSTONE_TTL_S = 600
# Conflicting writes are retried this many times before giving up, each
# after a pause drawn from a window that doubles from the first to the cap.
# Two nodes appending to one partition without a pause between batches
# conflict about every other try (replicated, fsynced: a batch takes some
# 30-100 ms): 32 tries in a row fail about once in four billion, and take a
# few seconds at most. The bound matters: a batch that expects on one
# subject twice (JetStream's 10164) fails every time.
RETRIES = 32
CONFLICT_PAUSE_FIRST_S = 0.002
CONFLICT_PAUSE_CAP_S = 0.1
# Messages per read of a stream.
PAGE = 1000


@dataclass(eq=False)
class Part:
    """What this instance knows of one partition."""

    key: Key
    token: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded: bool = False
    stale: bool = False
    used_at: float = 0.0
    loaded_at: float = 0.0  # when its leases were last read (monotonic)
    cursor_rev: int = 0  # sequence of the cursor record in NS_STATE
    cursor_seq: int = 0  # the last message handed out for first delivery
    live: dict[str, Live] = field(default_factory=dict)
    # Settled before their first claim (found when a claim conflicted): passed over.
    skipped: set[str] = field(default_factory=set)
    heap: list[tuple[int, str, int]] = field(default_factory=list)  # (at, idem, rev)


class Common:
    """State and helpers the backend's parts share (see :class:`JetStreamStore`)."""

    names: Names
    _state: str
    _node: str
    _nc: Client | None
    _api: JetStreamApi | None
    _parts: dict[Key, Part]
    _where: dict[str, Part]  # idem -> partition, for live entries known here
    _listeners: list[ReadyListener]
    _policy: DeliveryPolicy
    _counting: set[asyncio.Task[None]]

    def _check_open(self) -> JetStreamApi:
        if self._state != "open" or self._api is None:
            raise StoreError(f"the JetStream store is {self._state}, not open")
        return self._api

    def _check_api(self) -> JetStreamApi:
        if self._api is None:
            raise StoreError("the JetStream store is not open")
        return self._api

    async def _read_all(self, stream: str, subject: str, start: int = 1) -> Batch:
        api = self._check_api()
        out = Batch()
        seq = start
        while True:
            page = await api.get_after(stream, subject, seq, PAGE)
            out += page
            if len(page) < PAGE:
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

    def _notify(self, key: Key) -> None:
        for listener in list(self._listeners):
            listener(*key)

    def _announce(self, keys: Iterable[Key], *, returned: bool) -> None:
        keys = list(keys)
        for key in keys:
            self._notify(key)
        nc = self._nc
        if nc is None or not keys:
            return
        news = orjson.dumps({"n": self._node, "r": returned, "k": keys})
        task = asyncio.ensure_future(nc.publish(self.names.ready, news))
        task.add_done_callback(quiet)

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
        except NatsError as exc:  # timeouts, no responders, connection closed
            log.warning("could not count pending messages on %s: %r", subject, exc)

    def _part(self, key: Key) -> Part:
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = Part(key, self.names.partition(*key))
        return part

    def _set_live(self, part: Part, idem: str, live: Live) -> None:
        part.live[idem] = live
        self._where[idem] = part
        heapq.heappush(part.heap, (live.claimable_at(self._policy), idem, live.rev))

    def _drop_live(self, idem: str) -> None:
        part = self._where.pop(idem, None)
        if part is not None:
            part.live.pop(idem, None)

    def _settle_outs(
        self,
        outs: list[Out],
        part: Part,
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
                    ttl_s=TOMBSTONE_TTL_S,
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


def conflict_pause_s(attempt: int) -> float:
    """How long to wait before retrying a write that conflicted for the
    ``attempt``-th time (0 for the first): anything up to a window that
    doubles each time, capped. Random, so that two nodes that collided do
    not retry in step; growing, so that a write another node is still
    replicating (JetStream's 10163) has landed when this one comes back."""
    window = min(CONFLICT_PAUSE_CAP_S, CONFLICT_PAUSE_FIRST_S * 2 ** max(attempt, 0))
    return random.uniform(0, window)


async def pause_after_conflict(attempt: int) -> None:
    """Sleep :func:`conflict_pause_s` of ``attempt``."""
    await asyncio.sleep(conflict_pause_s(attempt))


def new_token() -> int:
    return secrets.randbits(62) or 1


def quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
