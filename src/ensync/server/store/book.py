"""Leases and claim windows of the local backends (memory, sqlite).

A :class:`LeaseBook` keeps, per partition, a bounded window of message
references read ahead of delivery (no payloads), the leases of claimed
messages, and the schedule watermark; a :class:`Backing` (the backend's
tables) answers the reads and makes the durable writes. The book lives in
the store, so every engine core that shares the store instance shares it:
two cores can never lease the same message at once.

Where a claim, a release, a lapse or a deferral takes a message is decided
by :mod:`ensync.server.store.lifecycle`; the book carries it out.

Per partition, invariants between calls:

* every pending message that is claimable now is leased, in ``retry`` or
  ``ready``, has ``block > cursor`` (the next page read finds it), or
  becomes claimable after ``due_mark`` (the schedule read finds it);
* ``ready`` holds first deliveries in block order, all ``<= cursor``;
* a leased message is in no window, and each lease's expiry is in the
  partition's ``expiry`` heap (stale heap entries are skipped lazily).

``caught_up`` means the backing holds nothing claimable beyond ``cursor``, so
records released by ``append`` go to ``ready`` without a read.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from ensync.server.store import lifecycle
from ensync.server.store.backing import Backing, Ref
from ensync.server.store.base import (
    Claim,
    DeliveryPolicy,
    Lease,
    MessageState,
    ReadyListener,
    Release,
    Released,
    StoredMessage,
)
from ensync.server.store.lifecycle import Event, Phase, limit_reason

# limit_reason lives in lifecycle; the JetStream backend imports it from here.
__all__ = ["Backing", "LeaseBook", "Ref", "limit_reason"]

_Key = tuple[str, str]
# What a claim that does not lease a message settles it as.
_SETTLED_AS = {Phase.DEAD: MessageState.DEAD, Phase.EXPIRED: MessageState.EXPIRED}

# Windows untouched for this long, with nothing leased, are dropped.
_IDLE_WINDOW_MS = 60_000


@dataclass(eq=False, slots=True)
class _Lease:
    key: _Key
    ref: Ref
    token: int
    attempts: int
    deadline_ms: int
    grace_ms: int  # lifecycle.lapse_after_ms: the lease lapses at deadline + grace

    @property
    def expires_at_ms(self) -> int:
        return self.deadline_ms + self.grace_ms


@dataclass(eq=False, slots=True)
class _Window:
    due_mark: int
    ready: deque[Ref] = field(default_factory=deque)
    retry: deque[Ref] = field(default_factory=deque)
    queued: dict[str, Ref] = field(default_factory=dict)
    claiming: set[str] = field(default_factory=set)
    expiry: list[tuple[int, int, str]] = field(default_factory=list)
    leased: int = 0
    cursor: int = 0
    caught_up: bool = False
    next_due: int | None = None
    next_due_known: bool = False
    last_used_ms: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def schedule(self, visible_at_ms: int) -> None:
        if self.next_due_known and (self.next_due is None or visible_at_ms < self.next_due):
            self.next_due = visible_at_ms


class LeaseBook:
    """Claim windows and leases over one :class:`Backing`."""

    def __init__(self, backing: Backing, *, page_size: int = 256) -> None:
        self._backing = backing
        self._page = page_size
        self._windows: dict[_Key, _Window] = {}
        self._leases: dict[str, _Lease] = {}
        self._tokens = itertools.count(1)
        self._listeners: list[ReadyListener] = []
        # Which window holds each queued or claiming idem.
        self._where: dict[str, _Key] = {}
        self._claims = 0

    # --- listeners ----------------------------------------------------------

    def watch(self, listener: ReadyListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def notify(self, key: _Key) -> None:
        for listener in list(self._listeners):
            listener(*key)

    # --- what the store tells the book --------------------------------------

    def released(self, key: _Key, refs: Sequence[Ref]) -> None:
        """Freshly appended records of a partition, in block order."""
        window = self._windows.get(key)
        if window is not None and window.caught_up:
            for ref in refs:
                if ref.block <= window.cursor:
                    continue
                if len(window.queued) >= 4 * self._page:
                    window.caught_up = False  # the rest waits for a page read
                    break
                self._enqueue(key, window, ref, first=True)
                window.cursor = ref.block
        self.notify(key)

    def forget(self, idem: str) -> None:
        """The message was settled or rescheduled: it leaves every window."""
        lease = self._leases.pop(idem, None)
        held = self._windows.get(lease.key) if lease is not None else None
        if held is not None:
            held.leased -= 1
        key = self._where.pop(idem, None)
        window = self._windows.get(key) if key is not None else None
        if window is not None:
            window.claiming.discard(idem)
            window.queued.pop(idem, None)

    def returned(self, message: StoredMessage) -> None:
        """A message became claimable again out of order (redriven, deferral
        ended at once): queue it if its partition's window read past it."""
        window = self._windows.get(message.partition)
        if window is not None and message.block <= window.cursor:
            self._enqueue(
                message.partition,
                window,
                Ref(
                    message.idem,
                    message.block,
                    message.attempts,
                    message.expires_at_ms,
                    message.visible_at_ms,
                ),
            )
        self.notify(message.partition)

    def drop(self, keys: Collection[_Key]) -> None:
        """Forget the windows and leases of these partitions (their owner is
        elsewhere now, or they are read again from scratch)."""
        if not keys:
            return
        for key in keys:
            self._windows.pop(key, None)
        self._leases = {i: lease for i, lease in self._leases.items() if lease.key not in keys}
        self._where = {i: key for i, key in self._where.items() if key not in keys}

    def statistics(self) -> tuple[int, int]:
        """(leases, references held in windows)."""
        return len(self._leases), sum(len(w.queued) for w in self._windows.values())

    def holds(self, idem: str) -> bool:
        """Whether ``idem`` is leased or queued in a window."""
        return idem in self._leases or idem in self._where

    def held_attempts(self) -> list[tuple[str, int]]:
        """``(idem, attempts)`` of every lease: what a clean shutdown records
        (a claim itself does not write the count, to keep it off the commit
        path; a release or an expiry does)."""
        return [(idem, lease.attempts) for idem, lease in self._leases.items()]

    # --- operations ---------------------------------------------------------

    async def claim(
        self, key: _Key, *, limit: int, now_ms: int, policy: DeliveryPolicy
    ) -> tuple[Claim, list[tuple[str, MessageState, str | None]]]:
        """Lease up to ``limit`` messages; returns the claim and the settlements
        it made (dead-lettered, expired) for the caller's bookkeeping."""
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(due_mark=now_ms)
        async with window.lock:
            window.last_used_ms = now_ms
            settlements: list[tuple[str, MessageState, str | None]] = []
            self._sweep(key, window, now_ms, policy, settlements)
            await self._read_due(key, window, now_ms, limit)
            await self._read_ahead(key, window, now_ms, limit)
            taken = self._take(key, window, limit, now_ms, policy, settlements)
            if settlements:
                await self._backing.settle_many(settlements, now_ms)
            messages = await self._backing.load([ref.idem for ref in taken]) if taken else {}
            leases: list[Lease] = []
            for ref in taken:
                message = messages.get(ref.idem)
                if ref.idem not in window.claiming:
                    continue  # settled or deferred while we read
                window.claiming.discard(ref.idem)
                self._where.pop(ref.idem, None)
                if message is None or message.state is not MessageState.PENDING:
                    continue
                leases.append(self._lease(key, window, ref, message, now_ms, policy))
            claim = Claim(
                leases=tuple(leases),
                dead=tuple(idem for idem, state, _ in settlements if state is MessageState.DEAD),
                expired=tuple(
                    idem for idem, state, _ in settlements if state is MessageState.EXPIRED
                ),
                next_visible_ms=self._next_visible(window),
            )
        self._claims += 1
        if self._claims % 1024 == 0:
            self._evict_idle(now_ms)
        return claim, settlements

    def extend(self, idem: str, token: int, deadline_ms: int) -> bool:
        lease = self._leases.get(idem)
        window = self._windows.get(lease.key) if lease is not None else None
        if lease is None or window is None or lease.token != token:
            return False
        lease.deadline_ms = deadline_ms
        heapq.heappush(window.expiry, (lease.expires_at_ms, token, idem))
        return True

    async def release(
        self, releases: Sequence[Release], *, now_ms: int, policy: DeliveryPolicy
    ) -> list[Released]:
        out: list[Released] = []
        dead: list[tuple[str, MessageState, str | None]] = []
        later: dict[_Key, list[tuple[str, int, int | None]]] = {}
        at_once: list[tuple[str, int]] = []
        for release in releases:
            lease = self._leases.get(release.idem)
            window = self._windows.get(lease.key) if lease is not None else None
            if lease is None or window is None or lease.token != release.token:
                out.append(Released(stale=True))
                continue
            del self._leases[release.idem]
            window.leased -= 1
            outcome = lifecycle.on_release(
                lease.attempts,
                failure=release.failure,
                delivered=release.delivered,
                now_ms=now_ms,
                policy=policy,
            )
            attempts, visible_at = outcome.attempts, outcome.visible_at_ms
            if outcome.phase is Phase.DEAD:
                dead.append((release.idem, MessageState.DEAD, outcome.reason))
                out.append(Released(dead=True))
                continue
            if outcome.phase is Phase.DEFERRED:
                later.setdefault(lease.key, []).append((release.idem, visible_at, attempts))
            else:
                self._enqueue(lease.key, window, replace(lease.ref, attempts=attempts, exact=True))
                if release.delivered:  # else the count on disk is already right
                    at_once.append((release.idem, attempts))
                self.notify(lease.key)
            out.append(Released(visible_at_ms=visible_at))
        if at_once:
            self._backing.record_attempts(at_once)
        for key, items in later.items():
            await self._reschedule(key, items)
        if dead:
            await self._backing.settle_many(dead, now_ms)
        return out

    async def defer(self, idem: str, visible_at_ms: int, now_ms: int) -> bool:
        lease = self._leases.get(idem)
        attempts = lease.attempts if lease is not None else None
        key = lease.key if lease is not None else self._where.get(idem)
        if key is None:
            message = (await self._backing.load([idem])).get(idem)
            if message is None or not lifecycle.allows(message.state, Event.DEFER):
                return False
            key = message.partition
        self.forget(idem)
        if key not in self._windows:
            self._windows[key] = _Window(due_mark=now_ms, last_used_ms=now_ms)
        (changed,) = await self._reschedule(key, [(idem, visible_at_ms, attempts)])
        if changed and lifecycle.on_defer(visible_at_ms, now_ms) is Phase.PENDING:
            loaded = (await self._backing.load([idem])).get(idem)
            if loaded is not None:
                self.returned(loaded)
        return changed

    async def _reschedule(self, key: _Key, items: list[tuple[str, int, int | None]]) -> list[bool]:
        """Write new claimable times for messages of one partition.

        Under the window's lock, so no claim reads the schedule meanwhile;
        a time at or before the schedule watermark lowers it (a claim that
        began earlier set the watermark from a later clock reading).
        """
        window = self._windows[key]
        async with window.lock:
            changed = await self._backing.reschedule_many(items)
            for (_, visible_at, _), done in zip(items, changed, strict=True):
                if done:
                    window.schedule(visible_at)
                    if visible_at <= window.due_mark:
                        window.due_mark = visible_at - 1
            return changed

    # --- claim steps --------------------------------------------------------

    def _sweep(
        self,
        key: _Key,
        window: _Window,
        now_ms: int,
        policy: DeliveryPolicy,
        settlements: list[tuple[str, MessageState, str | None]],
    ) -> None:
        """Leases whose deadline and backoff passed without news: their
        holder is gone. The message is claimable again, or dead."""
        counted: list[tuple[str, int]] = []
        while window.expiry and window.expiry[0][0] <= now_ms:
            at_ms, token, idem = heapq.heappop(window.expiry)
            lease = self._leases.get(idem)
            if lease is None or lease.token != token or lease.expires_at_ms != at_ms:
                continue
            del self._leases[idem]
            window.leased -= 1
            outcome = lifecycle.on_lapse(lease.attempts, now_ms, policy)
            if outcome.phase is Phase.DEAD:
                settlements.append((idem, MessageState.DEAD, outcome.reason))
            else:
                # PENDING at once, its count unchanged (the claim counted it).
                self._enqueue(key, window, replace(lease.ref, attempts=lease.attempts, exact=True))
                counted.append((idem, lease.attempts))
        if counted:
            self._backing.record_attempts(counted)

    async def _read_due(self, key: _Key, window: _Window, now_ms: int, limit: int) -> None:
        if not window.next_due_known:
            window.next_due = await self._backing.next_due(key, window.due_mark)
            window.next_due_known = True
        if window.next_due is None or window.next_due > now_ms:
            return
        batch = max(limit, self._page)
        refs = await self._backing.due(key, window.due_mark, now_ms, window.cursor, batch)
        for ref in refs:
            if ref.idem not in self._leases and ref.idem not in window.queued:
                self._enqueue(key, window, ref)
        # A full batch may leave more due at the same instant: resume there.
        window.due_mark = refs[-1].visible_at_ms - 1 if len(refs) >= batch else now_ms
        window.next_due = await self._backing.next_due(key, window.due_mark)

    async def _read_ahead(self, key: _Key, window: _Window, now_ms: int, limit: int) -> None:
        while not window.caught_up and len(window.queued) < limit:
            upto = self._backing.released_upto(key)
            rows = await self._backing.page(key, window.cursor, upto, now_ms, self._page)
            for ref in rows:
                if ref.block <= window.cursor:
                    continue
                window.cursor = ref.block
                if ref.idem in self._leases or ref.idem in window.queued:
                    continue
                self._enqueue(key, window, ref, first=True)
            if len(rows) < self._page:
                # Nothing else claimable up to ``upto``; what was skipped
                # (deferred) is found by the schedule read.
                window.cursor = max(window.cursor, upto)
                window.caught_up = self._backing.released_upto(key) == upto

    def _take(
        self,
        key: _Key,
        window: _Window,
        limit: int,
        now_ms: int,
        policy: DeliveryPolicy,
        settlements: list[tuple[str, MessageState, str | None]],
    ) -> list[Ref]:
        taken: list[Ref] = []
        while len(taken) < limit and (window.retry or window.ready):
            ref = (window.retry or window.ready).popleft()
            if window.queued.get(ref.idem) is not ref:
                continue  # left the window meanwhile
            del window.queued[ref.idem]
            self._where.pop(ref.idem, None)
            phase, reason = lifecycle.on_claim(ref.attempts, ref.expires_at_ms, now_ms, policy)
            if phase is Phase.LEASED:
                window.claiming.add(ref.idem)
                self._where[ref.idem] = key
                taken.append(ref)
            else:
                settlements.append((ref.idem, _SETTLED_AS[phase], reason))
        return taken

    def _lease(
        self,
        key: _Key,
        window: _Window,
        ref: Ref,
        message: StoredMessage,
        now_ms: int,
        policy: DeliveryPolicy,
    ) -> Lease:
        counted = ref.attempts if ref.exact else max(ref.attempts, message.attempts)
        attempts = lifecycle.claimed_attempts(counted)
        lease = _Lease(
            key=key,
            ref=ref,
            token=next(self._tokens),
            attempts=attempts,
            deadline_ms=now_ms + policy.lease_ms,
            grace_ms=lifecycle.lapse_after_ms(attempts, policy),
        )
        self._leases[ref.idem] = lease
        window.leased += 1
        heapq.heappush(window.expiry, (lease.expires_at_ms, lease.token, ref.idem))
        return Lease(replace(message, attempts=attempts), lease.token, lease.deadline_ms)

    def _next_visible(self, window: _Window) -> int | None:
        while window.expiry:
            at_ms, token, idem = window.expiry[0]
            lease = self._leases.get(idem)
            if lease is not None and lease.token == token and lease.expires_at_ms == at_ms:
                break
            heapq.heappop(window.expiry)
        times = [t for t in (window.next_due, window.expiry[0][0] if window.expiry else None) if t]
        return min(times) if times else None

    def _evict_idle(self, now_ms: int) -> None:
        for key, window in list(self._windows.items()):
            if (
                window.leased == 0
                and not window.lock.locked()
                and now_ms - window.last_used_ms > _IDLE_WINDOW_MS
            ):
                for idem in window.queued:
                    self._where.pop(idem, None)
                del self._windows[key]

    def _enqueue(self, key: _Key, window: _Window, ref: Ref, *, first: bool = False) -> None:
        window.queued[ref.idem] = ref
        self._where[ref.idem] = key
        (window.ready if first else window.retry).append(ref)
