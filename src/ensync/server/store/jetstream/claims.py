"""Claims: the index of a partition's returned messages, and leasing.

A claim takes what came back and is due (released, deferred, leases that
ran out; the index is a heap by claimable time) and then first deliveries
from the partition's cursor, and writes it all, the cursor included, in
one atomic batch.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import replace

import orjson

from ensync.server.store.base import Claim, DeliveryPolicy, Lease, MessageState, StoredMessage
from ensync.server.store.book import limit_reason
from ensync.server.store.jetstream._common import PAGE, Part, new_token, pause_after_conflict
from ensync.server.store.jetstream.api import ConflictError, Out
from ensync.server.store.jetstream.leases import Leases
from ensync.server.store.jetstream.records import Live, is_gone, message_from, settled_json

__all__ = ["Claims"]

# Most messages one claim writes (an atomic batch holds at most MAX_BATCH).
_CLAIM_MAX = 400
# A claim that keeps colliding gives up sooner than other writes: it returns
# nothing and comes back a moment later (the other node took what was there).
_CLAIM_TRIES = 8


class Claims(Leases):
    """``claim`` of :class:`~ensync.server.store.base.DeliveryState`."""

    async def _load(self, part: Part) -> None:
        """Read the partition's cursor and every message that left its line."""
        api = self._check_api()
        cursor, lives = await asyncio.gather(
            api.get_one(self.names.state, {"last_by_subj": self.names.cursor(part.token)}),
            api.get_after(self.names.state, self.names.lives_of(part.token), 1, PAGE),
        )
        if len(lives) >= PAGE:
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
        part.loaded_at = time.monotonic()

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
                for attempt in range(_CLAIM_TRIES):
                    candidates: list[str] = []
                    try:
                        return await self._claim_once(
                            part, min(limit, _CLAIM_MAX), now_ms, policy, candidates
                        )
                    except ConflictError:
                        # Another node claimed first (or is claiming): a moment later
                        # (two nodes retrying in step would collide again), read what
                        # it did and try again.
                        await pause_after_conflict(attempt)
                        await self._load(part)
                        await self._learn(part, candidates)
            except BaseException:
                part.stale = True  # what the claim took off the schedule is read again
                raise
        # Still colliding: nothing this time, and the caller is told to come back.
        asyncio.get_running_loop().call_later(0.05, self._notify, part.key)
        return Claim(next_visible_ms=self._next_visible(part, policy))

    def _due(self, part: Part, now_ms: int, policy: DeliveryPolicy, limit: int) -> list[str]:
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

    def _next_visible(self, part: Part, policy: DeliveryPolicy) -> int | None:
        while part.heap:
            at, idem, rev = part.heap[0]
            live = part.live.get(idem)
            if live is not None and live.rev == rev and live.claimable_at(policy) == at:
                return at
            heapq.heappop(part.heap)
            if live is not None and live.rev == rev:
                heapq.heappush(part.heap, (live.claimable_at(policy), idem, rev))
        return None

    async def _learn(self, part: Part, idems: list[str]) -> None:
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
        part: Part,
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
                    token=new_token(),
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
                    token=new_token(),
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
