"""Observers (core/observers.py): who gets a copy of a stored message."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.model import Delivery, EngineStats
from ensync.server.core.observers import Observers
from ensync.server.core.sessions import Session
from ensync.server.store.base import Appended, AppRecord, NewMessage
from tests.unit.server.fakes import FakeRouter

APP = AppRecord(name="warehouse", app_id="A" * 44, key_hash=b"k", created_at_ms=0)
OTHER = AppRecord(name="shop", app_id="B" * 44, key_hash=b"j", created_at_ms=0)


@dataclass
class Sink:
    room: int = 100
    copies: list[Delivery] = field(default_factory=list)

    def observed(self, delivery: Delivery) -> bool:
        if len(self.copies) >= self.room:
            return False
        self.copies.append(delivery)
        return True


def session(app: AppRecord = APP) -> Session:
    return Session(
        client_id="c-" + app.name,
        client_hash="h",
        app=app,
        router=FakeRouter(),
        connected_at_ms=0,
        last_seen_ms=0,
    )


def stored(name: str, recipient: str = APP.app_id, idem: str = "m") -> NewMessage:
    return NewMessage(
        idem=idem,
        recipient=recipient,
        name=name,
        payload="envelope",
        metadata="{}",
        sender=OTHER.app_id,
        created_at_ms=5,
    )


def test_copies_go_to_matching_observers_of_the_recipient_only() -> None:
    stats = EngineStats()
    observers = Observers(4, stats)
    mine, other = Sink(), Sink()
    observers.observe(session(), "orders/*", mine)
    observers.observe(session(OTHER), "#", other)
    batch = [stored("orders/created", idem="m1"), stored("billing/paid", idem="m2")]
    observers.copy(batch, [Appended("m1", 7), Appended("m2", 1)])
    (copy,) = mine.copies
    assert (copy.idem, copy.name, copy.block, copy.attempt) == ("m1", "orders/created", 7, 0)
    assert (copy.payload, copy.sender, copy.created_at_ms) == ("envelope", OTHER.app_id, 5)
    assert other.copies == []  # another app's messages are not its business
    assert stats.observed == 1


def test_duplicates_failures_closed_sessions_and_denied_names_are_not_copied() -> None:
    stats = EngineStats()
    observers = Observers(4, stats)
    limited = AppRecord(
        name="limited",
        app_id=APP.app_id,
        key_hash=b"l",
        created_at_ms=0,
        subscribe_rules=("orders/#",),
    )
    sink, gone_sink = Sink(), Sink()
    observers.observe(session(limited), "#", sink)
    gone = session()
    observers.observe(gone, "#", gone_sink)
    gone.closed = True
    batch = [stored("orders/a", idem=i) for i in ("dup", "err", "ok")] + [stored("payroll/run")]
    results = [
        Appended("dup", 1, duplicate=True),
        Appended("err", 0, error="disk full"),
        Appended("ok", 2),
        Appended("m", 3),
    ]
    observers.copy(batch, results)
    assert [c.idem for c in sink.copies] == ["ok"]
    assert gone_sink.copies == []


def test_a_full_sink_loses_copies_and_they_are_counted() -> None:
    stats = EngineStats()
    observers = Observers(4, stats)
    sink = Sink(room=1)
    observers.observe(session(), "#", sink)
    observers.copy(
        [stored("a", idem="m1"), stored("a", idem="m2")], [Appended("m1", 1), Appended("m2", 2)]
    )
    assert (stats.observed, stats.observed_missed) == (1, 1)


def test_patterns_are_checked_limited_and_removed() -> None:
    observers = Observers(2, EngineStats())
    me, sink = session(), Sink()
    with pytest.raises(ServiceError) as bad:
        observers.observe(me, "a/#/b", sink)
    assert bad.value.code is ErrorCode.INVALID_ARGUMENT
    observers.observe(me, "a/*", sink)
    observers.observe(me, "a/*", sink)  # again: no second copy, no second slot
    observers.observe(me, "b/*", sink)
    with pytest.raises(ServiceError) as over:
        observers.observe(me, "c/*", sink)
    assert over.value.code is ErrorCode.LIMIT_EXCEEDED
    assert observers.unobserve(me, "a/*", sink)
    assert not observers.unobserve(me, "a/*", sink)
    observers.drop_sink(sink)
    assert not observers
