"""Dead letters: listed from their ``ns.d.<app>.*.*`` records, and redriven
(the record ends and the message leaves the line again, claimable now)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ensync.server.store.base import DeadRef, MessageState, StoredMessage
from ensync.server.store.jetstream._common import TOMBSTONE_TTL_S, Common
from ensync.server.store.jetstream.api import ConflictError, Out
from ensync.server.store.jetstream.records import GONE, Live, is_gone

__all__ = ["DeadLetters"]


class DeadLetters(Common):
    """``list_dead``, ``list_dead_refs`` and ``redrive`` of the JetStream backend."""

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
                        ttl_s=TOMBSTONE_TTL_S,
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
