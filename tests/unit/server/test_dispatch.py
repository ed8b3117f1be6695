"""The delivery state machine (:mod:`ensync.server.core.dispatch`) alone:
fake routers and sinks, claims answered by hand, time as an integer. No
engine, no event loop, no store."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from ensync.server.config import EngineConfig
from ensync.server.core.dispatch import ClaimRequest, Dispatcher
from ensync.server.core.model import Delivery, EngineStats
from ensync.server.core.sessions import Session
from ensync.server.store.base import AppRecord, Claim, Lease, Release, StoredMessage
from tests.unit.server.fakes import FakeRouter, FakeSink

__all__: list[str] = []

T0 = 1_700_000_000_000
APP = AppRecord(name="bob", app_id="app-bob", key_hash=b"bob", created_at_ms=0)
OTHER_APP = AppRecord(name="carol", app_id="app-carol", key_hash=b"carol", created_at_ms=0)
NAME = "orders/created"
KEY = (APP.app_id, NAME)
DEADLINE_MS = 1_000
# A session timeout of 30 s: the session sweep runs every 10 s.
CONFIG = EngineConfig(window=4, session_timeout_ms=30_000, ack_deadline_ms=DEADLINE_MS)
SWEEP_MS = 10_000
# Sessions dropped after 3 s of silence, looked for every second.
QUICK = dataclasses.replace(CONFIG, session_timeout_ms=3_000)
QUICK_SWEEP_MS = 1_000
_tokens = itertools.count(1)


class Core:
    """A dispatcher and the sessions a test made, with the driver's chores."""

    def __init__(self, config: EngineConfig = CONFIG) -> None:
        self.stats = EngineStats()
        self.dispatcher = Dispatcher(config, self.stats)
        self.now = T0

    def connect(
        self, client_id: str, router: FakeRouter | None = None, app: AppRecord = APP
    ) -> Session:
        session = Session(
            client_id=client_id,
            client_hash=f"hash-{client_id}",
            app=app,
            router=router or FakeRouter(),
            connected_at_ms=self.now,
            last_seen_ms=self.now,
        )
        self.dispatcher.add_session(session, self.now)
        return session

    def subscriber(self, client_id: str, router: FakeRouter | None = None) -> Session:
        session = self.connect(client_id, router)
        self.dispatcher.subscribe(session, NAME)
        return session

    def claims(self) -> list[ClaimRequest]:
        return list(self.dispatcher.claims())

    def answer(
        self,
        request: ClaimRequest,
        *idems: str,
        dead: tuple[str, ...] = (),
        expired: tuple[str, ...] = (),
        next_visible_ms: int | None = None,
    ) -> list[Lease]:
        """The store leased ``idems`` for ``request`` (and settled ``dead`` and
        ``expired`` instead of leasing them)."""
        leases = [lease(idem, self.now) for idem in idems]
        claim = Claim(tuple(leases), dead, expired, next_visible_ms)
        self.dispatcher.claimed(request.key, request.limit, claim, self.now)
        return leases

    def deliver(self, *idems: str) -> list[Lease]:
        """One claim of the partition, answered with ``idems``."""
        (request,) = self.claims()
        return self.answer(request, *idems)

    def tick(self, now_ms: int) -> list[tuple[tuple[str, str], Release]]:
        self.now = now_ms
        self.dispatcher.tick(now_ms)
        return self.dispatcher.leases.take_releases()


def message(idem: str, attempts: int = 1) -> StoredMessage:
    return StoredMessage(
        idem=idem,
        recipient=APP.app_id,
        name=NAME,
        block=int(idem.rsplit("-", 1)[-1]) if idem[-1].isdigit() else 1,
        payload=f"ciphertext-of-{idem}",
        metadata="{}",
        sender="app-alice",
        created_at_ms=T0,
        attempts=attempts,
    )


def lease(idem: str, now_ms: int, attempts: int = 1) -> Lease:
    return Lease(message(idem, attempts), next(_tokens), now_ms + DEADLINE_MS)


def deliveries(session: Session) -> list[Delivery]:
    router = session.router
    assert isinstance(router, FakeRouter)
    return router.received


def received(session: Session) -> list[str]:
    return [delivery.idem for delivery in deliveries(session)]


# --- round robin, window, credits ---------------------------------------------------------


def test_claims_ask_for_what_the_subscribers_can_take() -> None:
    core = Core()
    assert core.claims() == []  # nobody subscribed
    core.subscriber("a")
    core.subscriber("b")
    assert core.claims() == [ClaimRequest(KEY, 2 * CONFIG.window)]
    assert core.claims() == []  # claiming already
    assert core.dispatcher.gauges() == (1, 1, 0)


def test_claimed_messages_go_round_robin() -> None:
    core = Core()
    a, b = core.subscriber("a"), core.subscriber("b")
    core.deliver("m-1", "m-2", "m-3", "m-4", "m-5")
    assert received(a) == ["m-1", "m-3", "m-5"]
    assert received(b) == ["m-2", "m-4"]
    assert len(core.dispatcher.leases) == 5
    assert core.stats.delivered == 5


def test_round_robin_skips_subscribers_without_room() -> None:
    core = Core()
    a = core.subscriber("a")
    b = core.subscriber("b", FakeRouter(FakeSink(credits=1)))
    core.deliver("m-1", "m-2", "m-3", "m-4")
    assert received(a) == ["m-1", "m-3", "m-4"]
    assert received(b) == ["m-2"]


def test_the_window_bounds_claims_and_a_freed_slot_claims_again() -> None:
    core = Core()
    core.subscriber("a")
    (request,) = core.claims()
    assert request.limit == CONFIG.window
    core.answer(request, "m-1", "m-2", "m-3", "m-4")
    # Full: the partition stays marked but is not claimed.
    assert core.claims() == []
    core.dispatcher.leases.settled("m-2")
    # No notify needed: answered in full, the partition is still marked.
    assert core.claims() == [ClaimRequest(KEY, 1)]


def test_credits_bound_claims() -> None:
    core = Core()
    core.subscriber("a", FakeRouter(FakeSink(credits=2)))
    assert core.claims() == [ClaimRequest(KEY, 2)]


def test_a_claim_answered_in_full_claims_again_and_a_short_one_waits_for_news() -> None:
    core = Core()
    core.subscriber("a")
    (request,) = core.claims()
    core.answer(request, "m-1", dead=("d-1",), expired=("x-1", "x-2"))
    assert (core.stats.dead_lettered, core.stats.expired) == (1, 2)
    (again,) = core.claims()  # there may be more
    assert again == ClaimRequest(KEY, CONFIG.window - 1)
    core.answer(again, "m-2")  # fewer than asked: nothing more for now
    assert core.claims() == []
    core.dispatcher.notify(*KEY)
    assert core.claims() == [ClaimRequest(KEY, CONFIG.window - 2)]


def test_notify_of_a_partition_nobody_here_subscribes_to_is_ignored() -> None:
    core = Core()
    core.subscriber("a")
    core.deliver()
    core.dispatcher.notify(APP.app_id, "other/name")
    core.dispatcher.notify(OTHER_APP.app_id, NAME)
    assert core.claims() == []


def test_leases_for_a_subscriber_that_left_go_back_uncounted() -> None:
    core = Core()
    a = core.subscriber("a")
    (request,) = core.claims()
    core.dispatcher.unsubscribe(a, NAME)
    leases = core.answer(request, "m-1", "m-2")
    assert core.dispatcher.leases.take_releases() == [
        (KEY, Release(lease.message.idem, lease.token, delivered=False)) for lease in leases
    ]
    assert len(core.dispatcher.leases) == 0


def test_leases_beyond_the_room_left_go_back_uncounted() -> None:
    core = Core()
    core.subscriber("a", FakeRouter(FakeSink(credits=1)))
    (request,) = core.claims()
    _, second = core.answer(request, "m-1", "m-2")
    assert core.dispatcher.leases.take_releases() == [
        (KEY, Release("m-2", second.token, delivered=False))
    ]
    assert core.dispatcher.leases.get("m-1") is not None


def test_a_delivery_carries_the_message_and_its_attempt() -> None:
    core = Core()
    a = core.subscriber("a")
    (request,) = core.claims()
    core.dispatcher.claimed(
        request.key, request.limit, Claim(leases=(lease("m-1", core.now, attempts=3),)), core.now
    )
    (delivery,) = deliveries(a)
    assert (delivery.idem, delivery.name, delivery.attempt) == ("m-1", NAME, 3)
    assert delivery.payload == "ciphertext-of-m-1"
    assert (core.stats.delivered, core.stats.redelivered) == (1, 1)


# --- leases ------------------------------------------------------------------------------------


def test_a_lease_past_its_deadline_goes_back_as_a_failure() -> None:
    core = Core()
    a = core.subscriber("a")
    (held,) = core.deliver("m-1")
    assert core.dispatcher.next_deadline() == held.deadline_ms
    assert core.tick(held.deadline_ms - 1) == []
    assert core.tick(held.deadline_ms) == [
        (KEY, Release("m-1", held.token, failure="ack deadline passed"))
    ]
    assert core.dispatcher.leases.get("m-1") is None
    assert a.subscriptions[NAME].in_flight == set()


def test_an_extended_lease_goes_back_at_its_new_deadline_only() -> None:
    core = Core()
    core.subscriber("a")
    (held,) = core.deliver("m-1")
    core.dispatcher.leases.extended("m-1", held.deadline_ms + 500)
    assert core.dispatcher.next_deadline() == held.deadline_ms + 500  # the old entry is stale
    assert core.tick(held.deadline_ms) == []
    (released,) = core.tick(held.deadline_ms + 500)
    assert released[1].failure == "ack deadline passed"


def test_a_settled_lease_never_goes_back() -> None:
    core = Core()
    core.subscriber("a")
    (held,) = core.deliver("m-1")
    core.dispatcher.leases.settled("m-1")
    core.dispatcher.leases.settled("m-1")  # twice, or a lease of another core: nothing
    core.dispatcher.leases.extended("m-1", held.deadline_ms + 5)  # too late: nothing
    assert core.dispatcher.next_deadline() == T0 + SWEEP_MS  # only the sweep is left
    assert core.tick(held.deadline_ms + 5) == []
    assert len(core.dispatcher.leases) == 0


def test_give_back_hands_the_lease_to_the_caller() -> None:
    core = Core()
    a = core.subscriber("a")
    (held,) = core.deliver("m-1")
    given = core.dispatcher.leases.give_back("m-1")
    assert given is not None
    assert (given.token, given.recipient, given.subscription) == (
        held.token,
        APP.app_id,
        a.subscriptions[NAME],
    )
    assert core.dispatcher.leases.give_back("m-1") is None
    assert core.dispatcher.leases.take_releases() == []  # the caller releases it
    assert core.tick(held.deadline_ms) == []


# --- pause, routes, sessions ------------------------------------------------------------------


def test_pause_gives_leases_back_at_once_and_continue_claims_again() -> None:
    core = Core()
    a = core.subscriber("a")
    one, two = core.deliver("m-1", "m-2")
    core.dispatcher.pause(a, NAME, "maintenance")
    assert sorted(core.dispatcher.leases.take_releases(), key=lambda r: r[1].idem) == [
        (KEY, Release("m-1", one.token)),
        (KEY, Release("m-2", two.token)),
    ]
    assert core.claims() == []  # paused: no room
    assert core.tick(one.deadline_ms) == []  # their deadlines are gone with them
    core.dispatcher.resume(a, NAME)
    assert core.claims() == [ClaimRequest(KEY, CONFIG.window)]


def test_a_pause_before_the_subscribe_holds_deliveries() -> None:
    core = Core()
    a = core.connect("a")
    core.dispatcher.pause(a, NAME, "not yet")
    core.dispatcher.subscribe(a, NAME)
    assert core.claims() == []
    core.dispatcher.resume(a, NAME)
    core.dispatcher.resume(a, NAME)  # not paused any more: nothing
    assert core.claims() == [ClaimRequest(KEY, CONFIG.window)]


def test_a_closed_outbox_gives_leases_back_and_a_reopened_one_claims() -> None:
    core = Core()
    router = FakeRouter()
    a = core.subscriber("a", router)
    (held,) = core.deliver("m-1")
    router.open = False
    core.dispatcher.routes_changed(a)
    assert core.dispatcher.leases.take_releases() == [(KEY, Release("m-1", held.token))]
    assert core.claims() == []  # no outbox, no room
    router.open = True
    core.dispatcher.routes_changed(a)
    assert core.claims() == [ClaimRequest(KEY, CONFIG.window)]


def test_ending_a_session_gives_its_leases_back_and_drops_its_partitions() -> None:
    core = Core()
    a = core.subscriber("a")
    (held,) = core.deliver("m-1")
    core.dispatcher.end_session(a)
    core.dispatcher.end_session(a)  # once is enough
    assert core.dispatcher.leases.take_releases() == [(KEY, Release("m-1", held.token))]
    assert core.dispatcher.sessions == {}
    assert core.dispatcher.gauges() == (0, 0, 0)
    assert not core.dispatcher.unsubscribe(a, NAME)


def test_subscribing_twice_keeps_one_subscription_and_marks_the_partition() -> None:
    core = Core()
    a = core.subscriber("a")
    core.deliver()
    core.dispatcher.subscribe(a, NAME)
    assert len(a.subscriptions) == 1
    assert core.claims() == [ClaimRequest(KEY, CONFIG.window)]


def test_the_sweep_ends_silent_detached_sessions_only() -> None:
    core = Core(QUICK)
    silent = core.subscriber("silent", FakeRouter(attached=False))
    (held,) = core.deliver("m-1")
    core.dispatcher.leases.extended("m-1", T0 + 60_000)
    core.subscriber("live")  # attached: stays however long it is quiet
    seen = core.connect("seen", FakeRouter(attached=False))
    assert core.dispatcher.next_deadline() == T0 + QUICK_SWEEP_MS
    for step in range(1, 4):
        seen.last_seen_ms = T0 + step * QUICK_SWEEP_MS
        assert core.tick(T0 + step * QUICK_SWEEP_MS) == []
        assert core.dispatcher.take_closed() == []
    releases = core.tick(T0 + 4 * QUICK_SWEEP_MS)  # 4 s without a word from "silent"
    assert core.dispatcher.take_closed() == [silent]
    assert releases == [(KEY, Release("m-1", held.token))]
    assert set(core.dispatcher.sessions) == {"live", "seen"}
    assert silent.closed


def test_the_sweep_stops_with_the_last_session_and_starts_with_the_next() -> None:
    core = Core(QUICK)
    a = core.connect("a")
    core.dispatcher.end_session(a)
    core.tick(T0 + QUICK_SWEEP_MS)
    assert core.dispatcher.next_deadline() is None
    core.connect("b")
    assert core.dispatcher.next_deadline() == T0 + 2 * QUICK_SWEEP_MS


def test_configure_changes_the_window_and_the_sweep() -> None:
    core = Core()
    core.subscriber("a")
    core.dispatcher.configure(dataclasses.replace(CONFIG, window=9, session_timeout_ms=600))
    assert core.claims() == [ClaimRequest(KEY, 9)]
    core.tick(T0 + SWEEP_MS)  # the sweep armed before runs, then every 200 ms
    assert core.dispatcher.next_deadline() == T0 + SWEEP_MS + 200


# --- waiting: claims that failed, deferrals, backoff ------------------------------------------


def test_a_failed_claim_is_tried_again_a_second_later() -> None:
    core = Core()
    core.subscriber("a")
    (request,) = core.claims()
    core.dispatcher.claim_failed(request.key, core.now)
    assert core.claims() == []
    assert core.dispatcher.gauges() == (1, 0, 1)
    assert core.dispatcher.next_deadline() == T0 + 1_000
    core.tick(T0 + 999)
    assert core.claims() == []
    core.tick(T0 + 1_000)
    assert core.claims() == [request]


def test_a_claim_that_says_when_more_is_visible_wakes_the_partition_then() -> None:
    core = Core()
    core.subscriber("a")
    (request,) = core.claims()
    core.answer(request, next_visible_ms=T0 + 300)
    assert core.claims() == []
    assert core.dispatcher.next_deadline() == T0 + 300
    core.tick(T0 + 300)
    assert core.claims() == [request]


def test_a_wake_up_in_the_past_is_due_now() -> None:
    core = Core()
    core.subscriber("a")
    (request,) = core.claims()
    core.now = T0 + 50
    core.answer(request, next_visible_ms=T0 + 10)
    assert core.dispatcher.next_deadline() == T0 + 50


def test_the_earliest_wake_up_wins_and_later_ones_are_stale() -> None:
    core = Core()
    core.subscriber("a")
    core.deliver()
    core.dispatcher.wake(KEY, T0 + 500)
    core.dispatcher.wake(KEY, T0 + 800)  # later than the one set: ignored
    core.dispatcher.wake(KEY, T0 + 200)
    core.dispatcher.wake(("app-nobody", NAME), T0 + 100)  # nobody subscribes: ignored
    assert core.dispatcher.next_deadline() == T0 + 200
    core.tick(T0 + 200)
    (request,) = core.claims()
    core.answer(request)
    # The wake-up at 500 was replaced: what remains due is the sweep.
    assert core.dispatcher.next_deadline() == T0 + SWEEP_MS
    core.tick(T0 + 500)
    assert core.claims() == []


def test_next_deadline_is_the_soonest_of_leases_wake_ups_and_the_sweep() -> None:
    core = Core()
    core.subscriber("a")
    assert core.dispatcher.next_deadline() == T0 + 10_000  # the sweep, at most every 10 s
    (held,) = core.deliver("m-1")
    assert core.dispatcher.next_deadline() == held.deadline_ms
    core.dispatcher.wake(KEY, T0 + 400)
    assert core.dispatcher.next_deadline() == T0 + 400


@pytest.mark.parametrize("holders", [1, 3])
def test_many_deadlines_at_once_all_go_back(holders: int) -> None:
    core = Core()
    for index in range(holders):
        core.subscriber(f"c{index}")
    leases = core.deliver(*(f"m-{i}" for i in range(holders * CONFIG.window)))
    released = core.tick(T0 + DEADLINE_MS)
    assert sorted(release.token for _, release in released) == sorted(
        lease.token for lease in leases
    )
    assert len(core.dispatcher.leases) == 0
    assert core.claims() == [ClaimRequest(KEY, holders * CONFIG.window)]


def test_a_message_leased_again_while_a_client_here_holds_it_is_not_sent_twice() -> None:
    # A partition's owner that lost its leases (the slot was read again, or
    # moved) leases a message this core still holds: the client keeps it
    # under the new lease, and a second copy would reach it after its ack.
    core = Core()
    a = core.subscriber("a")
    core.subscriber("b")
    (first,) = core.deliver("m-1")
    core.now += DEADLINE_MS // 2
    (again,) = core.answer(ClaimRequest(KEY, 1), "m-1")  # the store's answer to a claim
    assert received(a) == ["m-1"]
    assert core.stats.delivered == 1
    held = core.dispatcher.leases.get("m-1")
    assert held is not None
    assert (held.token, held.deadline_ms) == (again.token, again.deadline_ms)
    # The first lease's deadline is stale; the new one's is what counts.
    assert core.tick(first.deadline_ms) == []
    ((_, released),) = core.tick(again.deadline_ms)
    assert (released.idem, released.token) == ("m-1", again.token)


def test_a_message_leased_again_goes_to_another_client_if_its_holder_cannot_settle_it() -> None:
    core = Core()
    router = FakeRouter()
    a = core.subscriber("a", router)
    b = core.subscriber("b")
    core.deliver("m-1")
    router.open = False  # a's outbox is gone: it cannot settle what it holds
    core.now += DEADLINE_MS // 2
    (again,) = core.answer(ClaimRequest(KEY, 1), "m-1")
    assert received(a) == ["m-1"]
    assert received(b) == ["m-1"]
    held = core.dispatcher.leases.get("m-1")
    assert held is not None
    assert (held.subscription.session, held.token) == (b, again.token)
    assert "m-1" not in a.subscriptions[NAME].in_flight
