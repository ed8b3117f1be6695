"""Leases and settlements: extend, release, defer, settle.

Every write expects the revision of the message's state subjects; if
another node wrote first (or is writing), the message is read again after
a short random pause, at most ``RETRIES`` times (or the lease is stale: it
was not this node's any more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ensync.server.store.base import (
    DeliveryPolicy,
    MessageState,
    Release,
    Released,
    Settlement,
    StoreError,
)
from ensync.server.store.book import limit_reason
from ensync.server.store.jetstream._common import RETRIES, Common, Key, Part, pause_after_conflict
from ensync.server.store.jetstream.api import MAX_BATCH, ConflictError, Out
from ensync.server.store.jetstream.records import Live, is_gone

__all__ = ["Leases"]

# Lease ends written per atomic batch: each is at most two messages of it.
_PER_BATCH = MAX_BATCH // 2 - 1


class Leases(Common):
    """Lease ends and settlements of :class:`~ensync.server.store.base.DeliveryState`."""

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
        plan: list[tuple[int, Release, Part, Live]] = []
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
        for start in range(0, len(plan), _PER_BATCH):
            await self._write_releases(plan[start : start + _PER_BATCH], out, now_ms, policy)
        return [item if item is not None else Released(stale=True) for item in out]

    async def _write_releases(
        self,
        plan: list[tuple[int, Release, Part, Live]],
        out: list[Released | None],
        now_ms: int,
        policy: DeliveryPolicy,
    ) -> None:
        api = self._check_api()
        names = self.names
        outs: list[Out] = []
        changes: list[tuple[int, str, Part, Live | None, int, Released]] = []
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
        ready: set[Key] = set()
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
        for attempt in range(RETRIES):
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
                await pause_after_conflict(attempt)
                continue
            self._set_live(part, idem, later)
            if visible_at_ms <= now_ms:
                self._announce([part.key], returned=True)
            return True
        raise StoreError("deferring kept conflicting with other engine nodes")

    async def _locate(self, idem: str) -> tuple[Part, Live | None, int, int, int | None] | None:
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

    async def settle(self, settlements: Sequence[Settlement], *, now_ms: int) -> list[bool]:
        """Settle pending messages, ending any lease on them; ``False`` for
        each one unknown or already settled."""
        self._check_open()
        for item in settlements:
            if item.state is MessageState.PENDING:
                raise ValueError("settle() moves a message out of PENDING; use redrive()")
        items = [(item.idem, item.state, item.reason) for item in settlements]
        done: list[bool] = []
        for start in range(0, len(items), _PER_BATCH):
            done += await self._settle_known(items[start : start + _PER_BATCH], now_ms)
        return done

    async def _settle_known(
        self, items: Sequence[tuple[str, MessageState, str | None]], now_ms: int
    ) -> list[bool]:
        """Settle in one atomic batch; if another node changed one of them
        meanwhile, one by one."""
        api = self._check_api()
        done = [False] * len(items)
        plan: list[tuple[int, Part]] = []
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
        for attempt in range(RETRIES):
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
                await pause_after_conflict(attempt)
                continue
            self._settled_here([(idem, part)])
            return True
        raise StoreError("settling kept conflicting with other engine nodes")

    def _settled_here(self, settled: Sequence[tuple[str, Part]]) -> None:
        counts: dict[str, int] = {}
        for idem, part in settled:
            self._drop_live(idem)
            counts[part.key[0]] = counts.get(part.key[0], 0) - 1
        self._count(counts)
