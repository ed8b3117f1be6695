"""What ``ensync bench --soak`` published, and what became of each message.

The consumers' handler gives each message's first delivery the verb its key
draws (ack most, defer, discard or replay some, ignore a few) and acks any
later one; the ledger records what was confirmed, what was settled and what
arrived that nobody published. Once the engine has stopped, the store has
the last word on the messages no handler saw settled (:meth:`SoakLedger.account`).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ensync.bench.common import ErrorTally
from ensync.bench.soak_report import describe_stuck
from ensync.client.subscription import Subscription
from ensync.errors import EnSyncError
from ensync.models import Message
from ensync.server.core.apps import NewApp
from ensync.server.store.base import MessageState
from ensync.server.store.sqlite import SqliteStore

__all__ = ["VERBS", "Accounting", "SoakLedger", "verb_for"]

# Out of 100, by a hash of the message key: what its first delivery gets.
VERBS = (("ack", 80), ("defer", 8), ("discard", 5), ("replay", 5), ("ignore", 2))


def verb_for(key: str) -> str:
    """The verb a message's first delivery gets, drawn from its key."""
    point = zlib.crc32(key.encode()) % 100
    for verb, share in VERBS:
        if point < share:
            return verb
        point -= share
    return "ack"


@dataclass(frozen=True, slots=True)
class Accounting:
    """What the stopped store says of the messages no handler saw settled."""

    settled_in_store: int
    stuck: list[str]
    store_pending: int
    dead_letters: dict[str, int]


class SoakLedger:
    """Messages published and settled, by key, and every verb counted."""

    def __init__(self, publisher_id: str, filler: str, errors: ErrorTally) -> None:
        self.publisher_id = publisher_id
        self.filler = filler
        self.errors = errors
        self.verbs: Counter[str] = Counter()
        self.published: dict[str, str] = {}  # key -> idem, publish confirmed
        self.uncertain: set[str] = set()  # the publish call failed
        self.settled: dict[str, str] = {}  # key -> "acked" | "discarded"
        self._unknown: set[str] = set()
        self._deliveries: Counter[str] = Counter()

    @property
    def unsettled(self) -> int:
        """Confirmed messages no handler has seen settled yet."""
        return sum(1 for key in self.published if key not in self.settled)

    def unknown_keys(self) -> set[str]:
        """Keys delivered that no publish call stands for (not even a failed one)."""
        return {
            key for key in self._unknown if key not in self.published and key not in self.uncertain
        }

    def count_settled(self, how: str) -> int:
        """Messages the handlers settled ``how`` (``"acked"``, ``"discarded"``)."""
        return sum(1 for value in self.settled.values() if value == how)

    def handler(self, sub: Subscription) -> Callable[[Message], Awaitable[None]]:
        """The handler of one of the consumers' subscriptions."""

        async def handle(message: Message) -> None:
            payload = message.payload
            key = payload.get("key") if isinstance(payload, dict) else None
            self.verbs["delivered"] += 1
            if not isinstance(key, str) or message.sender != self.publisher_id:
                self.verbs["corrupt"] += 1
                return
            if key not in self.published and key not in self.uncertain:
                # The publish call may still be on its way back.
                self._unknown.add(key)
            if payload.get("data") != self.filler:
                self.verbs["corrupt"] += 1
            if key in self.settled:
                self.verbs["delivered_after_settled"] += 1
            self._deliveries[key] += 1
            # The first delivery gets the key's verb; a later one (after a
            # defer, an ignore or a lost link) is acked.
            verb = verb_for(key) if self._deliveries[key] == 1 else "ack"
            if self._deliveries[key] > 1:
                self.verbs["redelivered"] += 1
            try:
                await self._apply(sub, message, key, verb)
            except EnSyncError as exc:
                self.errors.add(exc, verb)

        return handle

    async def _apply(self, sub: Subscription, message: Message, key: str, verb: str) -> None:
        idem = message.idem
        if verb == "ack":
            await sub.ack(idem, message.block)
            self.settled[key] = "acked"
        elif verb == "defer":
            await sub.defer(idem, 200 + zlib.crc32(idem.encode()) % 1800, "soak")
        elif verb == "discard":
            await sub.discard(idem, "soak")
            self.settled[key] = "discarded"
        elif verb == "replay":
            before = await sub.replay(idem)
            self._check_replay(before, key, acked=False)
            await sub.ack(idem, message.block)
            self.settled[key] = "acked"
            after = await sub.replay(idem)
            self._check_replay(after, key, acked=True)
            self.verbs["replay"] += 2
            verb = "ack"
        self.verbs[verb] += 1

    def _check_replay(self, replayed: Message, key: str, *, acked: bool) -> None:
        info = replayed.replay_info
        payload = replayed.payload
        if (
            info is None
            or info.was_acknowledged is not acked
            or not isinstance(payload, dict)
            or payload.get("key") != key
        ):
            self.verbs["replay_mismatch"] += 1

    async def account(self, store: SqliteStore, recipients: Sequence[NewApp]) -> Accounting:
        """Look every message no handler saw settled up in the (stopped, open) store."""
        settled_in_store = 0
        stuck: list[str] = []
        for key, idem in self.published.items():
            if key in self.settled:
                continue
            stored = await store.get(idem)
            if stored is not None and stored.state is not MessageState.PENDING:
                settled_in_store += 1
            else:
                stuck.append(describe_stuck(key, idem, stored))
        store_pending = sum((await store.backlog()).values())
        dead: Counter[str] = Counter()
        for app in recipients:
            for message in await store.list_dead(app.app_id, 10_000_000):
                dead[(message.dead_reason or "").split(":", 1)[0]] += 1
        return Accounting(settled_in_store, stuck, store_pending, dict(dead))
