"""Observers: clients that watch an app's new messages without taking them.

An observer (``ensync tail``, ``EnSyncClient.observe``) gets a copy of each
message stored for its app whose name matches its pattern, right after the
batch holding it is stored. Copies carry no lease and are never settled: the
app's consumers get every message exactly as if nobody watched. Only names
the app may subscribe to are copied. A copy goes to the observer's sink and
never blocks the engine: a sink that is full drops it and counts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ensync.protocol.names import allowed, matches, validate_pattern
from ensync.server.core.errors import ServiceError
from ensync.server.core.model import Delivery, EngineStats
from ensync.server.core.sessions import Session
from ensync.server.store.base import Appended, NewMessage

__all__ = ["ObserverSink", "Observers"]


class ObserverSink(Protocol):
    """Where copies for one observing client go (a session's outbox)."""

    def observed(self, delivery: Delivery) -> bool:
        """Take one copy; must not block: ``False`` if it was dropped (full)."""
        ...


@dataclass(eq=False, slots=True)
class _Watch:
    session: Session
    pattern: str
    sink: ObserverSink


class Observers:
    """Every observation, by app.

    Args:
        max_per_client: most patterns one client may observe at once.
        stats: counts the copies (``observed``) and the dropped ones
            (``observed_missed``).
    """

    def __init__(self, max_per_client: int, stats: EngineStats) -> None:
        self.max_per_client = max_per_client
        self._stats = stats
        self._by_app: dict[str, list[_Watch]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_app)

    def observe(self, session: Session, pattern: str, sink: ObserverSink) -> None:
        """Copy ``session``'s app's new messages matching ``pattern`` to ``sink``
        (again: a no-op). Raises INVALID_ARGUMENT for a malformed pattern,
        LIMIT_EXCEEDED past ``max_per_client`` patterns."""
        try:
            validate_pattern(pattern)
        except ValueError as exc:
            raise ServiceError.invalid(str(exc)) from None
        watches = self._by_app.setdefault(session.app_id, [])
        mine = [w for w in watches if w.session is session and w.sink is sink]
        if any(w.pattern == pattern for w in mine):
            return
        if len(mine) >= self.max_per_client:
            raise ServiceError.over_limit(
                "observations_per_client",
                f"this client already observes {len(mine)} patterns, "
                f"the limit is {self.max_per_client}",
            )
        watches.append(_Watch(session, pattern, sink))

    def unobserve(self, session: Session, pattern: str, sink: ObserverSink) -> bool:
        """Stop one observation; ``False`` if there was none."""
        return self._remove(
            session.app_id,
            lambda w: w.session is session and w.sink is sink and w.pattern == pattern,
        )

    def drop_sink(self, sink: ObserverSink) -> None:
        """The sink is gone (its session stream ended): every observation through it ends."""
        for app_id in list(self._by_app):
            self._remove(app_id, lambda w: w.sink is sink)

    def copy(self, batch: Sequence[NewMessage], results: Sequence[Appended]) -> None:
        """Hand copies of what ``append`` stored (not duplicates, not failures)
        to the observers of each recipient app."""
        by_app = self._by_app
        for message, result in zip(batch, results, strict=True):
            watches = by_app.get(message.recipient)
            if not watches or result.duplicate or result.error is not None:
                continue
            copy: Delivery | None = None
            for watch in watches:
                session = watch.session
                if session.closed or not matches(watch.pattern, message.name):
                    continue
                if not allowed(session.app.subscribe_rules, message.name):
                    continue
                if copy is None:
                    copy = Delivery(
                        idem=result.idem,
                        name=message.name,
                        block=result.block,
                        payload=message.payload,
                        metadata=message.metadata,
                        sender=message.sender,
                        created_at_ms=message.created_at_ms,
                        attempt=0,
                    )
                if watch.sink.observed(copy):
                    self._stats.observed += 1
                else:
                    self._stats.observed_missed += 1

    def _remove(self, app_id: str, doomed: _Predicate) -> bool:
        watches = self._by_app.get(app_id)
        if not watches:
            return False
        kept = [w for w in watches if not doomed(w)]
        if kept:
            self._by_app[app_id] = kept
        else:
            del self._by_app[app_id]
        return len(kept) != len(watches)


class _Predicate(Protocol):
    def __call__(self, watch: _Watch, /) -> bool: ...
