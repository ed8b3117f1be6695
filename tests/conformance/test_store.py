"""The store contract (``ensync.server.store.base``), run unchanged against
every backend of :data:`tests.conformance.stores.BACKENDS`, on a fake clock.

Backend-specific checks live in ``test_sqlite.py``; two engine cores over
one store in ``test_two_cores.py``.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ensync.server.store import (
    AppExistsError,
    AppRecord,
    MessageState,
    Release,
    Released,
    Settlement,
    Store,
    StoreError,
)
from tests.conformance.stores import (
    BACKENDS,
    NAME,
    OTHER_NAME,
    OTHER_RECIPIENT,
    POLICY,
    RECIPIENT,
    SENDER,
    T0,
    Location,
    app,
    append,
    claim,
    idems,
    location_of,
    new,
)

__all__: list[str] = []


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
async def location(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[Location]:
    async for place in location_of(request, tmp_path):
        yield place


@pytest.fixture
async def store(location: Location) -> Store:
    return await location.open()


# --- append: numbering, records, failures --------------------------------------


async def test_append_numbers_each_partition_from_one_in_order(store: Store) -> None:
    results = await append(
        store,
        new("a1"),
        new("b1", name=OTHER_NAME),
        new("a2"),
        new("c1", recipient=OTHER_RECIPIENT),
    )
    assert [(r.idem, r.block, r.duplicate, r.error) for r in results] == [
        ("a1", 1, False, None),
        ("b1", 1, False, None),
        ("a2", 2, False, None),
        ("c1", 1, False, None),
    ]
    later = await append(store, new("a3"))
    assert later[0].block == 3


async def test_get_returns_every_field(store: Store) -> None:
    full = new(
        "m-1",
        payload_metadata='{"byte_size": 3}',
        expires_at_ms=T0 + 99_999,
        dedupe_key="key-1",
    )
    await append(store, full, new("m-2"))
    stored = await store.get("m-1")
    assert stored is not None
    assert (stored.idem, stored.recipient, stored.name, stored.block) == ("m-1", RECIPIENT, NAME, 1)
    assert (stored.payload, stored.metadata, stored.sender) == (
        "ciphertext-of-m-1",
        '{"persist": true}',
        SENDER,
    )
    assert (stored.created_at_ms, stored.payload_metadata, stored.expires_at_ms) == (
        T0,
        '{"byte_size": 3}',
        T0 + 99_999,
    )
    assert (stored.state, stored.attempts, stored.dedupe_key) == (
        MessageState.PENDING,
        0,
        "key-1",
    )
    assert await store.get("unknown") is None


async def test_append_nothing_is_allowed(store: Store) -> None:
    assert await append(store) == []


async def test_a_known_idem_fails_alone(store: Store) -> None:
    await append(store, new("m-1"))
    results = await append(store, new("m-2"), new("m-1"), new("m-3"))
    assert [r.error is None for r in results] == [True, False, True]
    assert "already stored" in (results[1].error or "")
    assert (await store.get("m-1")) is not None
    stored = [r.block for r in results if r.error is None]
    assert 1 < stored[0] < stored[1]  # a failed record may leave a gap, never a repeat
    assert idems(await claim(store)) == ["m-1", "m-2", "m-3"]


async def test_persist_false_messages_are_claimable_like_the_others(store: Store) -> None:
    await append(store, new("durable-1"), new("volatile", persist=False), new("durable-2"))
    claimed = await claim(store)
    assert idems(claimed) == ["durable-1", "volatile", "durable-2"]
    assert [lease.message.block for lease in claimed.leases] == [1, 2, 3]
    stored = await store.get("volatile")
    assert stored is not None
    assert stored.payload == "ciphertext-of-volatile"


# --- deduplication ---------------------------------------------------------------


async def test_a_repeated_idempotency_key_returns_the_original(store: Store) -> None:
    await append(store, new("m-1", dedupe_key="k"))
    (again,) = await append(store, new("m-2", dedupe_key="k"), now_ms=T0 + 1_000)
    assert (again.idem, again.block, again.duplicate) == ("m-1", 1, True)
    assert await store.get("m-2") is None
    # The key is per (sender, recipient): others store their own message.
    other_sender, other_recipient = await append(
        store,
        new("m-3", dedupe_key="k", sender="someone-else"),
        new("m-4", dedupe_key="k", recipient=OTHER_RECIPIENT),
    )
    assert not other_sender.duplicate
    assert not other_recipient.duplicate
    assert idems(await claim(store)) == ["m-1", "m-3"]


async def test_a_key_outside_the_window_is_new(store: Store) -> None:
    await append(store, new("m-1", dedupe_key="k", created_at_ms=T0))
    results = await store.append(
        [new("m-2", dedupe_key="k", created_at_ms=T0 + 10)], now_ms=T0 + 10, dedupe_since_ms=T0 + 1
    )
    assert (results[0].idem, results[0].duplicate) == ("m-2", False)


async def test_a_key_repeated_in_one_batch_or_at_once_is_stored_once(store: Store) -> None:
    together = await append(store, new("m-1", dedupe_key="k"), new("m-2", dedupe_key="k"))
    assert [(r.idem, r.duplicate) for r in together] == [("m-1", False), ("m-1", True)]
    concurrent = await asyncio.gather(
        *(append(store, new(f"c-{i}", dedupe_key="c")) for i in range(10))
    )
    originals = {result.idem for (result,) in concurrent}
    assert len(originals) == 1
    assert sum(not result.duplicate for (result,) in concurrent) == 1


# --- claims ------------------------------------------------------------------------


async def test_claim_leases_first_deliveries_in_block_order(store: Store) -> None:
    await append(store, *(new(f"m-{i}") for i in range(1, 6)))
    first = await claim(store, limit=2)
    assert idems(first) == ["m-1", "m-2"]
    lease = first.leases[0]
    assert lease.message.payload == "ciphertext-of-m-1"
    assert lease.message.attempts == 1
    assert lease.deadline_ms == T0 + POLICY.lease_ms
    assert first.leases[0].token != first.leases[1].token
    second = await claim(store, limit=10)
    assert idems(second) == ["m-3", "m-4", "m-5"]
    assert idems(await claim(store)) == []  # everything is leased


async def test_partitions_are_claimed_separately(store: Store) -> None:
    await append(store, new("a"), new("b", name=OTHER_NAME), new("c", recipient=OTHER_RECIPIENT))
    assert idems(await claim(store, name=OTHER_NAME)) == ["b"]
    assert idems(await claim(store, recipient=OTHER_RECIPIENT)) == ["c"]
    assert idems(await claim(store)) == ["a"]


async def test_a_lease_that_runs_out_makes_the_message_claimable_again(store: Store) -> None:
    await append(store, new("m-1"))
    (lease,) = (await claim(store)).leases
    assert idems(await claim(store, now_ms=lease.deadline_ms - 1)) == []
    # The first failed delivery waits POLICY.backoff_ms[0] == 0 more.
    again = await claim(store, now_ms=lease.deadline_ms)
    assert idems(again) == ["m-1"]
    assert again.leases[0].message.attempts == 2
    assert again.leases[0].token != lease.token
    # The old holder's token is stale now.
    assert not await store.extend("m-1", lease.token, T0 + 10_000)
    stale = await store.release([Release("m-1", lease.token)], now_ms=T0, policy=POLICY)
    assert stale == [Released(stale=True)]


async def test_extend_moves_the_deadline(store: Store) -> None:
    await append(store, new("m-1"))
    (lease,) = (await claim(store)).leases
    assert await store.extend("m-1", lease.token, lease.deadline_ms + 5_000)
    assert idems(await claim(store, now_ms=lease.deadline_ms + 4_999)) == []
    assert idems(await claim(store, now_ms=lease.deadline_ms + 5_000)) == ["m-1"]


async def test_release_without_failure_makes_it_claimable_at_once(store: Store) -> None:
    await append(store, new("m-1"), new("m-2"))
    leases = (await claim(store)).leases
    heard: list[tuple[str, str]] = []
    stop = store.watch(lambda recipient, name: heard.append((recipient, name)))
    try:
        released = await store.release(
            [Release("m-2", leases[1].token)], now_ms=T0 + 10, policy=POLICY
        )
    finally:
        stop()
    assert released == [Released(visible_at_ms=T0 + 10)]
    assert (RECIPIENT, NAME) in heard
    again = await claim(store, now_ms=T0 + 10)
    assert idems(again) == ["m-2"]
    assert again.leases[0].message.attempts == 2


async def test_release_after_a_failure_waits_out_the_backoff(store: Store) -> None:
    await append(store, new("m-1"))
    for attempt, wait in ((1, 0), (2, 500)):
        (lease,) = (await claim(store, now_ms=T0 + 10_000 * attempt)).leases
        assert lease.message.attempts == attempt
        now = T0 + 10_000 * attempt + 1
        (outcome,) = await store.release(
            [Release("m-1", lease.token, "handler failed")], now_ms=now, policy=POLICY
        )
        assert outcome == Released(visible_at_ms=now + wait)
        if wait:
            early = await claim(store, now_ms=now + wait - 1)
            assert idems(early) == []
            assert early.next_visible_ms == now + wait


async def test_the_delivery_limit_dead_letters_on_release(store: Store) -> None:
    await append(store, new("m-1"))
    now = T0
    for _ in range(POLICY.max_deliveries - 1):
        (lease,) = (await claim(store, now_ms=now)).leases
        await store.release([Release("m-1", lease.token)], now_ms=now, policy=POLICY)
    (lease,) = (await claim(store, now_ms=now)).leases
    assert lease.message.attempts == POLICY.max_deliveries
    (outcome,) = await store.release(
        [Release("m-1", lease.token, "cannot parse")], now_ms=now, policy=POLICY
    )
    assert outcome == Released(dead=True)
    (letter,) = await store.list_dead(RECIPIENT, 10)
    assert letter.idem == "m-1"
    assert letter.state is MessageState.DEAD
    assert letter.dead_reason == (
        f"delivery limit reached: {POLICY.max_deliveries} attempts without a settlement"
        " (last: cannot parse)"
    )
    assert idems(await claim(store, now_ms=now + 100_000)) == []


async def test_a_claim_that_never_reached_a_client_does_not_count(store: Store) -> None:
    # A subscriber that leaves while the store answers (or a client whose
    # credits ran out) gives claimed messages back undelivered, maybe many
    # times: that must never use up the message's delivery limit.
    await append(store, new("m-1"))
    now = T0
    for _ in range(3 * POLICY.max_deliveries):
        (lease,) = (await claim(store, now_ms=now)).leases
        assert lease.message.attempts == 1
        (outcome,) = await store.release(
            [Release("m-1", lease.token, delivered=False)], now_ms=now, policy=POLICY
        )
        assert outcome == Released(visible_at_ms=now)
    (lease,) = (await claim(store, now_ms=now)).leases
    assert lease.message.attempts == 1
    assert await store.list_dead(RECIPIENT, 10) == []


async def test_the_delivery_limit_dead_letters_a_lease_that_ran_out(store: Store) -> None:
    await append(store, new("m-1"), new("m-2"))
    now = T0
    for _ in range(POLICY.max_deliveries):
        claimed = await claim(store, now_ms=now, limit=1)
        assert idems(claimed) == ["m-1"]
        now = claimed.leases[0].deadline_ms + POLICY.backoff_after(
            claimed.leases[0].message.attempts
        )
    last = await claim(store, now_ms=now, limit=1)
    assert last.dead == ("m-1",)
    assert idems(last) == ["m-2"]
    letter = await store.get("m-1")
    assert letter is not None
    assert letter.state is MessageState.DEAD
    assert "ack deadline passed" in (letter.dead_reason or "")


async def test_an_expired_message_is_settled_not_delivered(store: Store) -> None:
    await append(store, new("late", expires_at_ms=T0 + 5), new("fine"))
    claimed = await claim(store, now_ms=T0 + 5)
    assert claimed.expired == ("late",)
    assert idems(claimed) == ["fine"]
    expired = await store.get("late")
    assert expired is not None
    assert expired.state is MessageState.EXPIRED


# --- defer -------------------------------------------------------------------------


async def test_defer_hides_a_message_until_its_time(store: Store) -> None:
    await append(store, *(new(f"m-{i}") for i in range(1, 5)))
    leases = {lease.message.idem: lease for lease in (await claim(store)).leases}
    assert await store.defer("m-2", T0 + 3_000, T0)
    assert await store.defer("m-4", T0 + 2_000, T0)
    # The deferral ends the lease: the old token is stale.
    assert not await store.extend("m-2", leases["m-2"].token, T0 + 9_000)
    await store.settle(
        [Settlement("m-1", MessageState.ACKED), Settlement("m-3", MessageState.ACKED)],
        now_ms=T0,
    )
    early = await claim(store, now_ms=T0 + 1_999)
    assert idems(early) == []
    assert early.next_visible_ms == T0 + 2_000
    assert idems(await claim(store, now_ms=T0 + 3_000)) == ["m-4", "m-2"]


async def test_defer_keeps_the_attempt_count_and_zero_means_now(store: Store) -> None:
    await append(store, new("m-1"))
    await claim(store)
    assert await store.defer("m-1", T0, T0)
    (lease,) = (await claim(store)).leases
    assert lease.message.attempts == 2


async def test_defer_of_a_message_never_claimed(store: Store) -> None:
    await append(store, *(new(f"m-{i}") for i in range(1, 4)))
    assert await store.defer("m-1", T0 + 500, T0)
    assert idems(await claim(store)) == ["m-2", "m-3"]
    assert idems(await claim(store, now_ms=T0 + 499)) == []
    assert idems(await claim(store, now_ms=T0 + 500)) == ["m-1"]


async def test_defer_refuses_unknown_and_settled_messages(store: Store) -> None:
    await append(store, new("m-1"))
    await store.settle([Settlement("m-1", MessageState.ACKED)], now_ms=T0)
    assert not await store.defer("m-1", T0 + 1, T0)
    assert not await store.defer("unknown", T0 + 1, T0)


# --- settle, dead letters, redrive, prune ----------------------------------------------


async def test_settle_moves_a_pending_message_once_and_ends_its_lease(store: Store) -> None:
    await append(store, new("m-1"), new("m-2"))
    (lease, _) = (await claim(store)).leases
    done = await store.settle(
        [Settlement("m-1", MessageState.ACKED), Settlement("unknown", MessageState.ACKED)],
        now_ms=T0 + 7,
    )
    assert done == [True, False]
    assert await store.settle([Settlement("m-1", MessageState.ACKED)], now_ms=T0 + 8) == [False]
    acked = await store.get("m-1")
    assert acked is not None
    assert (acked.state, acked.settled_at_ms) == (MessageState.ACKED, T0 + 7)
    stale = await store.release([Release("m-1", lease.token)], now_ms=T0, policy=POLICY)
    assert stale == [Released(stale=True)]
    assert idems(await claim(store, now_ms=T0 + 60_000)) == ["m-2"]


async def test_settle_to_pending_is_refused(store: Store) -> None:
    await append(store, new("m-1"))
    with pytest.raises(ValueError, match="PENDING"):
        await store.settle([Settlement("m-1", MessageState.PENDING)], now_ms=T0)


async def test_dead_letters_are_listed_newest_first_and_redriven(store: Store) -> None:
    await append(store, new("m-1"), new("m-2"), new("m-3", recipient=OTHER_RECIPIENT))
    await store.settle([Settlement("m-1", MessageState.DEAD, "first")], now_ms=T0 + 1)
    await store.settle([Settlement("m-2", MessageState.DEAD, "second")], now_ms=T0 + 2)
    dead = await store.list_dead(RECIPIENT, 10)
    assert [(m.idem, m.dead_reason) for m in dead] == [("m-2", "second"), ("m-1", "first")]
    assert [m.idem for m in await store.list_dead(RECIPIENT, 1)] == ["m-2"]
    assert await store.list_dead(OTHER_RECIPIENT, 10) == []
    assert [r.idem for r in await store.list_dead_refs(RECIPIENT)] == ["m-1", "m-2"]
    assert await store.redrive("m-1", T0 + 5)
    assert not await store.redrive("m-1", T0 + 5)  # no longer dead
    assert not await store.redrive("m-3", T0 + 5)  # never dead
    again = await claim(store, now_ms=T0 + 5)
    assert idems(again) == ["m-1"]
    assert again.leases[0].message.attempts == 1
    assert [m.idem for m in await store.list_dead(RECIPIENT, 10)] == ["m-2"]
    # Without bodies, oldest first: what `ensync dlq redrive` walks.
    assert [(r.settled_at_ms, r.idem, r.name) for r in await store.list_dead_refs(RECIPIENT)] == [
        (T0 + 2, "m-2", dead[0].name)
    ]
    assert await store.list_dead_refs(OTHER_RECIPIENT) == []
    # Redriven here and already leased: adopting it again would deliver it twice.
    assert await store.adopt_redriven() == 0
    assert idems(await claim(store, now_ms=T0 + 6)) == []


async def test_backlog_counts_pending_messages_per_recipient(store: Store) -> None:
    await append(
        store,
        *(new(f"b{i}", recipient=RECIPIENT if i < 3 else OTHER_RECIPIENT) for i in range(5)),
    )
    assert await store.backlog() == {RECIPIENT: 3, OTHER_RECIPIENT: 2}
    await store.settle(
        [Settlement("b0", MessageState.ACKED), Settlement("b3", MessageState.DEAD, "x")], now_ms=T0
    )
    assert await store.backlog() == {RECIPIENT: 2, OTHER_RECIPIENT: 1}


async def test_prune_deletes_what_was_settled_before_the_cutoff(store: Store) -> None:
    await append(store, new("old"), new("new"), new("pending"))
    await store.settle([Settlement("old", MessageState.ACKED)], now_ms=T0 + 10)
    await store.settle([Settlement("new", MessageState.DEAD, "x")], now_ms=T0 + 20)
    assert await store.prune(T0 + 15) == 1
    assert await store.get("old") is None
    assert await store.get("new") is not None
    assert await store.prune(T0 + 15) == 0
    # Numbering goes on after pruning.
    (later,) = await append(store, new("later"))
    assert later.block == 4


# --- deep partitions ---------------------------------------------------------------


async def test_a_deep_backlog_is_claimed_in_order_without_repeats(store: Store) -> None:
    total = 1_200
    await append(store, *(new(f"m-{i:05d}") for i in range(total)))
    seen: list[str] = []
    while True:
        claimed = await claim(store, limit=97)
        if not claimed.leases:
            break
        seen += idems(claimed)
        await store.settle(
            [Settlement(idem, MessageState.ACKED) for idem in idems(claimed)], now_ms=T0
        )
    assert seen == [f"m-{i:05d}" for i in range(total)]


async def test_messages_appended_while_claiming_keep_their_order(store: Store) -> None:
    await append(store, *(new(f"a-{i}") for i in range(3)))
    seen = idems(await claim(store, limit=2))
    await append(store, *(new(f"b-{i}") for i in range(3)))
    seen += idems(await claim(store, limit=2))
    await append(store, new("c-0"))
    seen += idems(await claim(store))
    assert seen == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2", "c-0"]


async def test_watchers_hear_of_appends(store: Store) -> None:
    heard: list[tuple[str, str]] = []
    stop = store.watch(lambda recipient, name: heard.append((recipient, name)))
    await append(store, new("m-1"), new("m-2", name=OTHER_NAME))
    stop()
    await append(store, new("m-3"))
    assert sorted(set(heard)) == sorted({(RECIPIENT, NAME), (RECIPIENT, OTHER_NAME)})


# --- apps --------------------------------------------------------------------------


async def test_apps_are_found_by_key_hash_id_and_name(store: Store) -> None:
    orders, warehouse = app("orders"), app("warehouse")
    await store.create_app(warehouse)
    await store.create_app(orders)
    assert await store.get_app_by_key_hash(orders.key_hash) == orders
    assert await store.get_app(warehouse.app_id) == warehouse
    assert await store.get_app_by_name("orders") == orders
    assert await store.list_apps() == [orders, warehouse]
    assert await store.get_app_by_key_hash(b"unknown") is None
    assert await store.get_app("unknown") is None
    assert await store.get_app_by_name("unknown") is None


@pytest.mark.parametrize(
    "duplicate",
    [
        app("orders", app_id="fresh-id", key_hash=b"fresh-hash"),
        app("fresh-name", app_id="id-of-orders", key_hash=b"fresh-hash"),
        app("fresh-name", app_id="fresh-id", key_hash=b"hash-of-orders"),
    ],
    ids=["same-name", "same-app-id", "same-key-hash"],
)
async def test_create_app_refuses_duplicates(store: Store, duplicate: AppRecord) -> None:
    await store.create_app(app("orders"))
    with pytest.raises(AppExistsError):
        await store.create_app(duplicate)
    assert await store.list_apps() == [app("orders")]


async def test_update_app_revokes_rekeys_and_changes_rules(store: Store) -> None:
    await store.create_app(app("orders"))
    changed = app("orders", revoked=True, key_hash=b"new-hash", publish_rules=("orders/*",))
    await store.update_app(changed)
    assert await store.get_app_by_name("orders") == changed
    assert await store.get_app_by_key_hash(b"new-hash") == changed
    assert await store.get_app_by_key_hash(app("orders").key_hash) is None


async def test_update_app_refuses_unknown_names_and_conflicts(store: Store) -> None:
    await store.create_app(app("orders"))
    await store.create_app(app("warehouse"))
    with pytest.raises(LookupError):
        await store.update_app(app("nobody"))
    with pytest.raises(AppExistsError):
        await store.update_app(app("orders", app_id="id-of-warehouse"))
    with pytest.raises(AppExistsError):
        await store.update_app(app("orders", key_hash=b"hash-of-warehouse"))
    assert await store.list_apps() == [app("orders"), app("warehouse")]


# --- concurrency and lifecycle ----------------------------------------------------------


async def test_concurrent_appends_all_land_numbered_once(location: Location) -> None:
    store = await location.open()
    results = await asyncio.gather(*(append(store, new(f"m-{i}")) for i in range(300)))
    blocks = sorted(result.block for (result,) in results)
    assert blocks == list(range(1, 301))


async def test_concurrent_claims_never_share_a_message(store: Store) -> None:
    await append(store, *(new(f"m-{i}") for i in range(500)))
    claims = await asyncio.gather(*(claim(store, limit=7) for _ in range(100)))
    taken = [idem for claimed in claims for idem in idems(claimed)]
    assert len(taken) == len(set(taken)) == 500


def every_call(store: Store) -> list[Callable[[], Awaitable[object]]]:
    """One call of every contract method except open, close and watch."""
    return [
        lambda: store.create_app(app("late")),
        lambda: store.get_app_by_key_hash(b"x"),
        lambda: store.get_app("x"),
        lambda: store.get_app_by_name("x"),
        lambda: store.list_apps(),
        lambda: store.update_app(app("late")),
        lambda: append(store, new("late")),
        lambda: store.get("m"),
        lambda: store.list_dead(RECIPIENT, 10),
        lambda: store.redrive("m", 1),
        lambda: store.backlog(),
        lambda: store.prune(1),
        lambda: claim(store),
        lambda: store.extend("m", 1, 1),
        lambda: store.release([Release("m", 1)], now_ms=T0, policy=POLICY),
        lambda: store.defer("m", 1, 1),
        lambda: store.settle([Settlement("m", MessageState.ACKED)], now_ms=T0),
    ]


async def test_calls_after_close_raise_store_error(store: Store) -> None:
    await append(store, new("m"))
    await store.close()
    await store.close()  # idempotent
    for call in every_call(store):
        with pytest.raises(StoreError):
            await call()


async def test_calls_before_open_raise_store_error(location: Location) -> None:
    store = location.new()
    for call in every_call(store):
        with pytest.raises(StoreError):
            await call()


async def test_a_store_cannot_be_opened_twice(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.open()
    await store.close()
    with pytest.raises(StoreError):
        await store.open()


async def test_a_cancelled_caller_leaves_the_store_usable(store: Store) -> None:
    calls = [asyncio.ensure_future(append(store, new(f"m{i}"))) for i in range(10)] + [
        asyncio.ensure_future(store.get("m1")) for _ in range(5)
    ]
    await asyncio.sleep(0)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    # A write already handed to the backend may or may not have landed; the
    # store must simply go on working.
    (after,) = await append(store, new("after"))
    assert after.error is None
    assert await store.get("after") is not None


async def test_dead_letter_refs_merge_memory_only_and_durable_ones_oldest_first(
    store: Store,
) -> None:
    await append(store, new("d-1"), new("v-1", persist=False), new("d-2"))
    await store.settle([Settlement("v-1", MessageState.DEAD, "v")], now_ms=T0 + 1)
    await store.settle([Settlement("d-2", MessageState.DEAD, "d")], now_ms=T0 + 2)
    await store.settle([Settlement("d-1", MessageState.DEAD, "d")], now_ms=T0 + 3)
    refs = await store.list_dead_refs(RECIPIENT)
    assert [(r.settled_at_ms, r.idem) for r in refs] == [
        (T0 + 1, "v-1"),
        (T0 + 2, "d-2"),
        (T0 + 3, "d-1"),
    ]
