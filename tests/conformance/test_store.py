"""The store contract, run unchanged against every backend.

Every test takes the ``store`` fixture (an opened store of each backend) or
``location`` (a factory of stores sharing one place, for reopening). Tests
that need durability take ``persistent_location``, which only yields
backends whose data outlives the store object. To add a backend, add a
:class:`Backend` to :data:`BACKENDS`.

The end of the file holds checks specific to the sqlite backend (group
commit, locking, crash safety) and to :func:`open_store`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensync.server.store import (
    AppExistsError,
    AppRecord,
    MemoryStore,
    MessageState,
    SqliteStore,
    Store,
    StoredMessage,
    StoreError,
    open_store,
)
from ensync.server.store.sqlite import SCHEMA_VERSION

__all__: list[str] = []

RECIPIENT = "app-recipient"
OTHER_RECIPIENT = "app-other"
NAME = "orders/created"
OTHER_NAME = "orders/cancelled"


# --- backends -----------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """How to build a store of one backend in a directory."""

    name: str
    persistent: bool  # data outlives the store object
    group_commit: bool  # concurrent writes share commits
    factory: Callable[[pathlib.Path], Store]


BACKENDS = (
    Backend("memory", persistent=False, group_commit=False, factory=lambda _: MemoryStore()),
    Backend(
        "sqlite",
        persistent=True,
        group_commit=True,
        factory=lambda directory: SqliteStore(directory / "ensync.db"),
    ),
)


class Location:
    """Builds stores of one backend that share one place; closes them all at teardown."""

    def __init__(self, backend: Backend, directory: pathlib.Path) -> None:
        self.backend = backend
        self.directory = directory
        self.created: list[Store] = []

    def new(self) -> Store:
        store = self.backend.factory(self.directory)
        self.created.append(store)
        return store

    async def open(self) -> Store:
        store = self.new()
        await store.open()
        return store

    async def close_all(self) -> None:
        for store in self.created:
            await store.close()


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
async def location(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[Location]:
    place = Location(request.param, tmp_path)
    try:
        yield place
    finally:
        await place.close_all()


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS if b.persistent])
async def persistent_location(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[Location]:
    place = Location(request.param, tmp_path)
    try:
        yield place
    finally:
        await place.close_all()


@pytest.fixture
async def store(location: Location) -> Store:
    return await location.open()


# --- helpers ------------------------------------------------------------------


def message(idem: str, block: int, **changes: Any) -> StoredMessage:
    """A pending message to RECIPIENT/NAME unless ``changes`` say otherwise."""
    base = StoredMessage(
        idem=idem,
        recipient=RECIPIENT,
        name=NAME,
        block=block,
        payload=f"ciphertext-of-{idem}",
        metadata='{"persist": true}',
        sender="app-sender",
        created_at_ms=1_000 + block,
    )
    return dataclasses.replace(base, **changes)


def app(name: str, **changes: Any) -> AppRecord:
    base = AppRecord(
        name=name,
        app_id=f"id-of-{name}",
        key_hash=f"hash-of-{name}".encode(),
        created_at_ms=5_000,
    )
    return dataclasses.replace(base, **changes)


def idems(messages: list[StoredMessage]) -> list[str]:
    return [m.idem for m in messages]


def counters(store: Store) -> tuple[int, int]:
    """(writes, commits) of a store's statistics()."""
    assert isinstance(store, MemoryStore | SqliteStore)
    stats = store.statistics()
    return stats.writes, stats.commits


# --- append / get / last_block ------------------------------------------------


async def test_append_then_get_returns_every_field(store: Store) -> None:
    full = message(
        "m-1",
        7,
        payload_metadata='{"alg": "hybrid"}',
        attempts=2,
        visible_at_ms=123,
        expires_at_ms=99_999,
    )
    bare = message("m-2", 8)
    await store.append([full, bare])
    assert await store.get("m-1") == full
    assert await store.get("m-2") == bare
    assert await store.get("unknown") is None


async def test_append_nothing_is_allowed(store: Store) -> None:
    await store.append([])
    assert await store.last_block(RECIPIENT, NAME) == 0


async def test_append_with_a_known_idem_stores_nothing(store: Store) -> None:
    await store.append([message("m-1", 1)])
    with pytest.raises(StoreError):
        await store.append([message("m-2", 2), message("m-1", 3)])
    with pytest.raises(StoreError):
        await store.append([message("m-3", 4), message("m-3", 5)])
    assert await store.get("m-2") is None
    assert await store.get("m-3") is None
    assert await store.get("m-1") == message("m-1", 1)
    assert await store.last_block(RECIPIENT, NAME) == 1


async def test_last_block_is_the_highest_block_per_partition(store: Store) -> None:
    assert await store.last_block(RECIPIENT, NAME) == 0
    await store.append([message("a", 1), message("b", 2)])
    await store.append([message("c", 5, name=OTHER_NAME)])
    # A late, lower block never lowers the mark.
    await store.append([message("d", 1)])
    assert await store.last_block(RECIPIENT, NAME) == 2
    assert await store.last_block(RECIPIENT, OTHER_NAME) == 5
    assert await store.last_block(OTHER_RECIPIENT, NAME) == 0


# --- fetch_ready --------------------------------------------------------------


async def test_fetch_ready_returns_one_partition_in_block_order(store: Store) -> None:
    await store.append([message("b3", 3), message("b1", 1)])
    await store.append(
        [
            message("other-name", 2, name=OTHER_NAME),
            message("other-app", 2, recipient=OTHER_RECIPIENT),
            message("b2", 2),
        ]
    )
    ready = await store.fetch_ready(RECIPIENT, NAME, after_block=0, now_ms=10_000, limit=10)
    assert idems(ready) == ["b1", "b2", "b3"]
    assert ready[1] == message("b2", 2)


async def test_fetch_ready_starts_after_block(store: Store) -> None:
    await store.append([message(f"b{i}", i) for i in range(1, 6)])
    ready = await store.fetch_ready(RECIPIENT, NAME, after_block=3, now_ms=0, limit=10)
    assert idems(ready) == ["b4", "b5"]
    assert await store.fetch_ready(RECIPIENT, NAME, after_block=5, now_ms=0, limit=10) == []


async def test_fetch_ready_skips_messages_not_visible_yet(store: Store) -> None:
    await store.append(
        [
            message("now", 1, visible_at_ms=100),
            message("later", 2, visible_at_ms=101),
            message("earlier", 3, visible_at_ms=50),
        ]
    )
    ready = await store.fetch_ready(RECIPIENT, NAME, after_block=0, now_ms=100, limit=10)
    assert idems(ready) == ["now", "earlier"]
    ready = await store.fetch_ready(RECIPIENT, NAME, after_block=0, now_ms=101, limit=10)
    assert idems(ready) == ["now", "later", "earlier"]


async def test_fetch_ready_honours_limit(store: Store) -> None:
    await store.append([message(f"b{i}", i) for i in range(1, 6)])
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 0, limit=2)) == ["b1", "b2"]
    assert await store.fetch_ready(RECIPIENT, NAME, 0, 0, limit=0) == []


async def test_fetch_ready_returns_only_pending_messages(store: Store) -> None:
    await store.append([message(f"b{i}", i) for i in range(1, 5)])
    await store.append([message("appended-acked", 5, state=MessageState.ACKED, settled_at_ms=1)])
    assert await store.settle("b1", MessageState.ACKED, at_ms=10)
    assert await store.settle("b2", MessageState.DEAD, at_ms=10, reason="bad")
    assert await store.settle("b3", MessageState.EXPIRED, at_ms=10)
    ready = await store.fetch_ready(RECIPIENT, NAME, after_block=0, now_ms=0, limit=10)
    assert idems(ready) == ["b4"]


# --- settle -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (MessageState.ACKED, None),
        (MessageState.DEAD, "discarded by client: bad input"),
        (MessageState.EXPIRED, "ttl"),
    ],
)
async def test_settle_moves_a_pending_message_once(
    store: Store, state: MessageState, reason: str | None
) -> None:
    await store.append([message("m", 1)])
    assert await store.settle("m", state, at_ms=2_000, reason=reason) is True
    settled = await store.get("m")
    assert settled == message("m", 1, state=state, settled_at_ms=2_000, dead_reason=reason)
    # Idempotent: a second settle, to any state, changes nothing.
    assert await store.settle("m", MessageState.DEAD, at_ms=3_000, reason="again") is False
    assert await store.settle("m", state, at_ms=3_000, reason=reason) is False
    assert await store.get("m") == settled


async def test_settle_unknown_idem_returns_false(store: Store) -> None:
    assert await store.settle("nope", MessageState.ACKED, at_ms=1) is False
    assert await store.get("nope") is None


async def test_settle_to_pending_is_refused(store: Store) -> None:
    await store.append([message("m", 1)])
    with pytest.raises(ValueError, match="PENDING"):
        await store.settle("m", MessageState.PENDING, at_ms=1)
    assert await store.get("m") == message("m", 1)


# --- reschedule / record_attempts ---------------------------------------------


async def test_reschedule_hides_a_pending_message_until_its_time(store: Store) -> None:
    await store.append([message("m", 1), message("n", 2)])
    assert await store.reschedule("m", visible_at_ms=5_000, attempts=3) is True
    assert await store.get("m") == message("m", 1, visible_at_ms=5_000, attempts=3)
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 4_999, 10)) == ["n"]
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 5_000, 10)) == ["m", "n"]


async def test_reschedule_refuses_settled_and_unknown_messages(store: Store) -> None:
    await store.append([message("m", 1)])
    await store.settle("m", MessageState.ACKED, at_ms=10)
    before = await store.get("m")
    assert await store.reschedule("m", visible_at_ms=5_000, attempts=3) is False
    assert await store.get("m") == before
    assert await store.reschedule("unknown", visible_at_ms=5_000, attempts=3) is False


async def test_record_attempts_sets_counts_and_skips_unknown_idems(store: Store) -> None:
    await store.append([message("a", 1), message("b", 2)])
    await store.record_attempts([("a", 2), ("unknown", 9), ("b", 1), ("a", 3)])
    await store.record_attempts([])
    assert await store.get("a") == message("a", 1, attempts=3)
    assert await store.get("b") == message("b", 2, attempts=1)
    assert await store.get("unknown") is None


# --- fetch_scheduled ----------------------------------------------------------


async def test_fetch_scheduled_lists_deferred_pending_messages_by_time(store: Store) -> None:
    await store.append(
        [
            message("visible", 1, visible_at_ms=100),
            message("late", 2, visible_at_ms=900),
            message("soon", 3, visible_at_ms=500),
            message("other-app", 1, recipient=OTHER_RECIPIENT, visible_at_ms=700),
            message("tie", 4, visible_at_ms=500),
            message("settled", 5, visible_at_ms=600),
        ]
    )
    await store.settle("settled", MessageState.ACKED, at_ms=1)
    scheduled = await store.fetch_scheduled(after_ms=100, limit=10)
    assert idems(scheduled) == ["soon", "tie", "other-app", "late"]
    assert idems(await store.fetch_scheduled(after_ms=500, limit=10)) == ["other-app", "late"]
    assert idems(await store.fetch_scheduled(after_ms=100, limit=2)) == ["soon", "tie"]
    assert await store.fetch_scheduled(after_ms=100, limit=0) == []
    assert await store.fetch_scheduled(after_ms=900, limit=10) == []


# --- dead letters -------------------------------------------------------------


async def test_list_dead_is_newest_first_with_reasons(store: Store) -> None:
    await store.append([message(f"m{i}", i) for i in range(1, 6)])
    await store.append([message("other", 1, recipient=OTHER_RECIPIENT)])
    await store.settle("m1", MessageState.DEAD, at_ms=100, reason="discarded: bad")
    await store.settle("m2", MessageState.DEAD, at_ms=300, reason="max deliveries (5) reached")
    await store.settle("m3", MessageState.DEAD, at_ms=200, reason="discarded: late")
    await store.settle("m4", MessageState.ACKED, at_ms=400)
    await store.settle("other", MessageState.DEAD, at_ms=500, reason="elsewhere")
    dead = await store.list_dead(RECIPIENT, limit=10)
    assert [(m.idem, m.dead_reason) for m in dead] == [
        ("m2", "max deliveries (5) reached"),
        ("m3", "discarded: late"),
        ("m1", "discarded: bad"),
    ]
    assert all(m.state is MessageState.DEAD for m in dead)
    assert idems(await store.list_dead(RECIPIENT, limit=2)) == ["m2", "m3"]
    assert await store.list_dead(RECIPIENT, limit=0) == []
    assert idems(await store.list_dead(OTHER_RECIPIENT, limit=10)) == ["other"]
    assert await store.list_dead("app-without-letters", limit=10) == []


async def test_redrive_returns_a_dead_letter_to_the_queue(store: Store) -> None:
    await store.append([message("m", 1, attempts=0), message("n", 2)])
    await store.record_attempts([("m", 5)])
    await store.settle("m", MessageState.DEAD, at_ms=100, reason="max deliveries")
    assert await store.redrive("m", now_ms=700) is True
    assert await store.get("m") == message("m", 1, visible_at_ms=700)
    assert await store.list_dead(RECIPIENT, limit=10) == []
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 700, 10)) == ["m", "n"]
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 699, 10)) == ["n"]
    assert await store.redrive("m", now_ms=800) is False  # pending now


async def test_redrive_refuses_what_is_not_dead(store: Store) -> None:
    await store.append([message("pending", 1), message("acked", 2), message("expired", 3)])
    await store.settle("acked", MessageState.ACKED, at_ms=1)
    await store.settle("expired", MessageState.EXPIRED, at_ms=1)
    for idem in ("pending", "acked", "expired", "unknown"):
        before = await store.get(idem)
        assert await store.redrive(idem, now_ms=10) is False
        assert await store.get(idem) == before


# --- prune --------------------------------------------------------------------


async def test_prune_deletes_only_messages_settled_before_the_cutoff(store: Store) -> None:
    await store.append([message(f"m{i}", i) for i in range(1, 7)])
    await store.settle("m1", MessageState.ACKED, at_ms=100)
    await store.settle("m2", MessageState.DEAD, at_ms=150, reason="bad")
    await store.settle("m3", MessageState.EXPIRED, at_ms=199)
    await store.settle("m4", MessageState.ACKED, at_ms=200)  # at the cutoff: kept
    await store.reschedule("m5", visible_at_ms=50, attempts=1)
    assert await store.prune(settled_before_ms=200) == 3
    for idem in ("m1", "m2", "m3"):
        assert await store.get(idem) is None
    for idem in ("m4", "m5", "m6"):
        assert await store.get(idem) is not None
    assert await store.list_dead(RECIPIENT, 10) == []
    assert idems(await store.fetch_ready(RECIPIENT, NAME, 0, 1_000, 10)) == ["m5", "m6"]
    assert await store.last_block(RECIPIENT, NAME) == 6
    assert await store.prune(settled_before_ms=200) == 0


async def test_prune_keeps_last_block_of_an_emptied_partition(store: Store) -> None:
    await store.append([message("m1", 41), message("m2", 42)])
    await store.settle("m1", MessageState.ACKED, at_ms=1)
    await store.settle("m2", MessageState.ACKED, at_ms=1)
    assert await store.prune(settled_before_ms=1_000) == 2
    assert await store.last_block(RECIPIENT, NAME) == 42


async def test_prune_skips_redriven_messages(store: Store) -> None:
    await store.append([message("m", 1)])
    await store.settle("m", MessageState.DEAD, at_ms=100, reason="bad")
    await store.redrive("m", now_ms=150)
    assert await store.prune(settled_before_ms=1_000) == 0
    assert await store.settle("m", MessageState.ACKED, at_ms=2_000)
    assert await store.prune(settled_before_ms=1_000) == 0
    assert await store.prune(settled_before_ms=2_001) == 1


# --- apps ---------------------------------------------------------------------


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


async def test_update_app_revokes_and_rekeys(store: Store) -> None:
    await store.create_app(app("orders"))
    revoked = app("orders", revoked=True, key_hash=b"new-hash")
    await store.update_app(revoked)
    assert await store.get_app_by_name("orders") == revoked
    assert await store.get_app_by_key_hash(b"new-hash") == revoked
    assert await store.get_app_by_key_hash(app("orders").key_hash) is None
    assert await store.get_app(revoked.app_id) == revoked


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


# --- concurrency ----------------------------------------------------------------


async def test_concurrent_appends_all_land_and_share_commits(location: Location) -> None:
    store = await location.open()
    tasks, per_task = 200, 10
    writes_before, commits_before = counters(store)

    async def publisher(task: int) -> None:
        for block in range(1, per_task + 1):
            name = f"orders/{task}"
            await store.append([message(f"t{task}-b{block}", block, name=name)])

    async with asyncio.TaskGroup() as group:
        for task in range(tasks):
            group.create_task(publisher(task))

    for task in range(tasks):
        name = f"orders/{task}"
        assert await store.last_block(RECIPIENT, name) == per_task
        ready = await store.fetch_ready(RECIPIENT, name, 0, 0, limit=per_task + 1)
        assert [m.block for m in ready] == list(range(1, per_task + 1))
    writes, commits = counters(store)
    assert writes - writes_before == tasks * per_task
    assert commits - commits_before <= writes - writes_before
    if location.backend.group_commit:
        assert (commits - commits_before) * 4 <= writes - writes_before


async def test_concurrent_reads_and_writes_agree(store: Store) -> None:
    await store.append([message(f"m{i}", i) for i in range(1, 51)])

    async def ack(i: int) -> bool:
        return await store.settle(f"m{i}", MessageState.ACKED, at_ms=i)

    results = await asyncio.gather(*(ack(i) for i in range(1, 51)), *(ack(i) for i in range(1, 51)))
    assert sorted(results) == [False] * 50 + [True] * 50
    assert await store.fetch_ready(RECIPIENT, NAME, 0, 0, 100) == []


async def test_a_cancelled_caller_leaves_the_store_usable(store: Store) -> None:
    calls = [asyncio.ensure_future(store.append([message(f"m{i}", i)])) for i in range(1, 11)] + [
        asyncio.ensure_future(store.get("m1")) for _ in range(5)
    ]
    await asyncio.sleep(0)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    # A write already handed to the backend may or may not have landed; the
    # store must simply go on working.
    await store.append([message("after", 20)])
    assert await store.last_block(RECIPIENT, NAME) == 20
    assert await store.get("after") == message("after", 20)


# --- lifecycle ----------------------------------------------------------------


def every_call(store: Store) -> list[Callable[[], Awaitable[object]]]:
    """One call of every contract method except open and close."""
    return [
        lambda: store.create_app(app("late")),
        lambda: store.get_app_by_key_hash(b"x"),
        lambda: store.get_app("x"),
        lambda: store.get_app_by_name("x"),
        lambda: store.list_apps(),
        lambda: store.update_app(app("late")),
        lambda: store.append([message("late", 1)]),
        lambda: store.append([]),
        lambda: store.last_block(RECIPIENT, NAME),
        lambda: store.get("m"),
        lambda: store.fetch_ready(RECIPIENT, NAME, 0, 0, 10),
        lambda: store.fetch_scheduled(0, 10),
        lambda: store.settle("m", MessageState.ACKED, 1),
        lambda: store.reschedule("m", 1, 1),
        lambda: store.record_attempts([("m", 1)]),
        lambda: store.record_attempts([]),
        lambda: store.list_dead(RECIPIENT, 10),
        lambda: store.redrive("m", 1),
        lambda: store.prune(1),
    ]


async def test_calls_after_close_raise_store_error(store: Store) -> None:
    await store.append([message("m", 1)])
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


async def test_close_waits_for_writes_already_queued(persistent_location: Location) -> None:
    store = await persistent_location.open()
    writes = [asyncio.ensure_future(store.append([message(f"m{i}", i)])) for i in range(1, 101)]
    await asyncio.sleep(0)  # let every append enqueue
    await store.close()
    await asyncio.gather(*writes)
    reopened = await persistent_location.open()
    assert await reopened.last_block(RECIPIENT, NAME) == 100


# --- persistence (backends whose data outlives the store object) --------------


async def test_everything_survives_reopening(persistent_location: Location) -> None:
    store = await persistent_location.open()
    await store.create_app(app("orders", revoked=True))
    await store.append([message("m1", 1), message("m2", 2), message("m3", 3)])
    await store.settle("m1", MessageState.ACKED, at_ms=10)
    await store.settle("m2", MessageState.DEAD, at_ms=20, reason="bad")
    await store.prune(settled_before_ms=15)
    await store.close()

    reopened = await persistent_location.open()
    assert await reopened.last_block(RECIPIENT, NAME) == 3
    assert await reopened.get("m1") is None
    dead = message("m2", 2, state=MessageState.DEAD, settled_at_ms=20, dead_reason="bad")
    assert await reopened.list_dead(RECIPIENT, 10) == [dead]
    assert idems(await reopened.fetch_ready(RECIPIENT, NAME, 0, 0, 10)) == ["m3"]
    assert await reopened.list_apps() == [app("orders", revoked=True)]


async def test_last_block_survives_pruning_and_reopening(persistent_location: Location) -> None:
    store = await persistent_location.open()
    await store.append([message("m1", 17)])
    await store.settle("m1", MessageState.ACKED, at_ms=1)
    assert await store.prune(settled_before_ms=2) == 1
    await store.close()
    reopened = await persistent_location.open()
    assert await reopened.last_block(RECIPIENT, NAME) == 17


async def test_an_append_is_durable_when_it_returns(persistent_location: Location) -> None:
    crashed = await persistent_location.open()
    await crashed.append([message("m1", 1)])
    # No close(): a second store sees the data as a restarted engine would.
    survivor = await persistent_location.open()
    assert await survivor.get("m1") == message("m1", 1)
    assert await survivor.last_block(RECIPIENT, NAME) == 1


async def test_a_second_store_on_the_same_place_sees_writes(
    persistent_location: Location,
) -> None:
    # The engine serves while `ensync app create` writes an app from another process.
    engine = await persistent_location.open()
    await engine.append([message("m1", 1)])
    cli = await persistent_location.open()
    await cli.create_app(app("warehouse"))
    assert await cli.get("m1") == message("m1", 1)
    await cli.close()
    assert await engine.get_app_by_name("warehouse") == app("warehouse")
    await engine.append([message("m2", 2)])
    assert await engine.last_block(RECIPIENT, NAME) == 2


# --- differential: every backend against a naive model --------------------------


class Model:
    """The contract written as plainly as possible: linear scans and sorts."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, StoredMessage]] = {}
        self.last: dict[tuple[str, str], int] = {}
        self.seq = 0

    def pending(self) -> Iterator[tuple[int, StoredMessage]]:
        return (row for row in self.rows.values() if row[1].state is MessageState.PENDING)

    def append(self, messages: list[StoredMessage]) -> None:
        new = [m.idem for m in messages]
        if len(set(new)) != len(new) or any(i in self.rows for i in new):
            raise StoreError("duplicate")
        for m in messages:
            self.seq += 1
            self.rows[m.idem] = (self.seq, m)
            self.last[m.partition] = max(self.last.get(m.partition, m.block), m.block)

    def fetch_ready(
        self, recipient: str, name: str, after: int, now: int, limit: int
    ) -> list[StoredMessage]:
        rows = sorted(
            (m.block, seq, m)
            for seq, m in self.pending()
            if m.partition == (recipient, name) and m.block > after and m.visible_at_ms <= now
        )
        return [m for _, _, m in rows[: max(limit, 0)]]

    def fetch_scheduled(self, after: int, limit: int) -> list[StoredMessage]:
        rows = sorted(
            (m.visible_at_ms, seq, m) for seq, m in self.pending() if m.visible_at_ms > after
        )
        return [m for _, _, m in rows[: max(limit, 0)]]

    def list_dead(self, recipient: str, limit: int) -> list[StoredMessage]:
        rows = sorted(
            (
                (m.settled_at_ms is not None, m.settled_at_ms or 0, seq, m)
                for seq, m in self.rows.values()
                if m.recipient == recipient and m.state is MessageState.DEAD
            ),
            reverse=True,
        )
        return [row[3] for row in rows[: max(limit, 0)]]

    def change(self, idem: str, when: Callable[[StoredMessage], bool], **changes: Any) -> bool:
        if idem not in self.rows or not when(self.rows[idem][1]):
            return False
        seq, m = self.rows[idem]
        self.rows[idem] = (seq, dataclasses.replace(m, **changes))
        return True

    def prune(self, before: int) -> int:
        doomed = [
            i
            for i, (_, m) in self.rows.items()
            if m.state is not MessageState.PENDING
            and m.settled_at_ms is not None
            and m.settled_at_ms < before
        ]
        for idem in doomed:
            del self.rows[idem]
        return len(doomed)


def is_pending(m: StoredMessage) -> bool:
    return m.state is MessageState.PENDING


_idem = st.sampled_from([f"m{i}" for i in range(8)])
_partition = st.sampled_from([(RECIPIENT, NAME), (RECIPIENT, OTHER_NAME), (OTHER_RECIPIENT, NAME)])
_time = st.integers(0, 6).map(lambda t: t * 100)
_late_time = st.integers(3, 6).map(lambda t: t * 100)
_settled_state = st.sampled_from([MessageState.ACKED, MessageState.DEAD, MessageState.EXPIRED])


@st.composite
def _messages(draw: st.DrawFn) -> StoredMessage:
    recipient, name = draw(_partition)
    state = draw(st.sampled_from([MessageState.PENDING] * 3 + list(MessageState)))
    return message(
        draw(_idem),
        draw(st.integers(-2, 9)),
        recipient=recipient,
        name=name,
        visible_at_ms=draw(_time),
        state=state,
        settled_at_ms=None if state is MessageState.PENDING else draw(st.none() | _time),
        dead_reason=draw(st.none() | st.text(max_size=5)),
    )


_operation = st.one_of(
    st.tuples(st.just("append"), st.lists(_messages(), max_size=3)),
    st.tuples(st.just("settle"), _idem, _settled_state, _time, st.none() | st.text(max_size=5)),
    st.tuples(st.just("reschedule"), _idem, _time, st.integers(0, 5)),
    st.tuples(st.just("record_attempts"), st.lists(st.tuples(_idem, st.integers(0, 5)))),
    st.tuples(st.just("redrive"), _idem, _time),
    st.tuples(st.just("prune"), _time),
    st.tuples(
        st.just("fetch_ready"), _partition, st.integers(-3, 4), _late_time, st.integers(0, 4)
    ),
    st.tuples(st.just("fetch_scheduled"), _time, st.integers(0, 4)),
    st.tuples(
        st.just("list_dead"), st.sampled_from([RECIPIENT, OTHER_RECIPIENT]), st.integers(0, 4)
    ),
)


async def _apply(target: Store | Model, op: tuple[Any, ...]) -> object:
    """Run ``op`` and return its result, or the type of what it raised."""
    kind, *args = op
    try:
        if isinstance(target, Model):
            return _apply_to_model(target, kind, args)
        result: object = await getattr(target, kind)(*_flatten(kind, args))
        return result
    except StoreError as exc:
        return type(exc)


def _flatten(kind: str, args: list[Any]) -> list[Any]:
    if kind == "fetch_ready":
        (recipient, name), *rest = args
        return [recipient, name, *rest]
    return args


def _apply_to_model(model: Model, kind: str, args: list[Any]) -> object:
    if kind == "settle":
        idem, state, at, reason = args
        return model.change(idem, is_pending, state=state, settled_at_ms=at, dead_reason=reason)
    if kind == "reschedule":
        idem, visible, attempts = args
        return model.change(idem, is_pending, visible_at_ms=visible, attempts=attempts)
    if kind == "record_attempts":
        for idem, attempts in args[0]:
            model.change(idem, lambda _: True, attempts=attempts)
        return None
    if kind == "redrive":
        idem, now = args
        return model.change(
            idem,
            lambda m: m.state is MessageState.DEAD,
            state=MessageState.PENDING,
            attempts=0,
            visible_at_ms=now,
            settled_at_ms=None,
            dead_reason=None,
        )
    if kind == "fetch_ready":
        (recipient, name), after, now, limit = args
        return model.fetch_ready(recipient, name, after, now, limit)
    result: object = getattr(model, kind)(*args)
    return result


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(_messages(), min_size=3, max_size=10, unique_by=lambda m: m.idem),
    st.lists(_operation, min_size=10, max_size=40),
)
def test_backends_agree_with_a_naive_model(
    population: list[StoredMessage], operations: list[tuple[Any, ...]]
) -> None:
    operations = [("append", population), *operations]

    async def scenario(directory: pathlib.Path) -> None:
        stores = [backend.factory(directory) for backend in BACKENDS]
        model = Model()
        try:
            for store in stores:
                await store.open()
            for op in operations:
                expected = await _apply(model, op)
                for store in stores:
                    assert await _apply(store, op) == expected, (op, store)
            for store in stores:
                for idem in [f"m{i}" for i in range(8)]:
                    row = model.rows.get(idem)
                    assert await store.get(idem) == (None if row is None else row[1])
                for recipient, name in model.last:
                    expected_last = model.last[(recipient, name)]
                    assert await store.last_block(recipient, name) == expected_last
        finally:
            for store in stores:
                await store.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(pathlib.Path(directory)))


# --- sqlite specifics -----------------------------------------------------------


async def test_sqlite_file_uses_wal_and_records_its_schema_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nested" / "dir" / "ensync.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"messages", "partitions", "apps"} <= tables


async def test_sqlite_refuses_a_newer_schema(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ensync.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="schema version"):
        await store.open()
    await store.close()


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ensync.db"
    path.write_bytes(b"certainly not sqlite " * 100)
    with pytest.raises(StoreError, match=str(path)):
        await SqliteStore(path).open()


async def test_sqlite_open_reports_an_unusable_directory(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(StoreError):
        await SqliteStore(blocker / "ensync.db").open()


def test_sqlite_rejects_bad_options(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        SqliteStore(tmp_path / "x.db", max_batch=0)


async def test_sqlite_max_batch_one_commits_every_write(tmp_path: pathlib.Path) -> None:
    async with SqliteStore(tmp_path / "ensync.db", max_batch=1, synchronous="NORMAL") as store:
        await asyncio.gather(*(store.append([message(f"m{i}", i)]) for i in range(1, 21)))
        stats = store.statistics()
    assert stats.writes == stats.commits == 20
    assert stats.largest_batch == 1


async def test_sqlite_lock_held_elsewhere_fails_the_write_then_recovers(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "ensync.db"
    async with SqliteStore(path, busy_timeout_ms=50) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked") as caught:
                await store.append([message("m1", 1)])
            assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
            other.execute("ROLLBACK")
        finally:
            other.close()
        await store.append([message("m1", 1)])
        assert await store.get("m1") == message("m1", 1)


async def test_sqlite_reads_do_not_wait_behind_a_blocked_writer(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ensync.db"
    async with SqliteStore(path, busy_timeout_ms=10_000) as store:
        await store.append([message("m1", 1)])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            blocked = asyncio.ensure_future(store.append([message("m2", 2)]))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            async with asyncio.timeout(2):
                assert await store.get("m1") == message("m1", 1)
                assert await store.last_block(RECIPIENT, NAME) == 1
            other.execute("ROLLBACK")
        finally:
            other.close()
        await blocked
        assert await store.last_block(RECIPIENT, NAME) == 2


async def test_sqlite_writer_death_fails_pending_and_later_calls(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "ensync.db")
    await store.open()
    try:
        await store.append([message("m1", 1)])

        def crash(*_args: object) -> None:
            raise RuntimeError("simulated bug in the writer")

        # Fault injection through a private seam: nothing public can kill the thread.
        monkeypatch.setattr(store, "_run_batch", crash)
        with pytest.raises(StoreError):
            await store.append([message("m2", 2)])
        for call in every_call(store):
            with pytest.raises(StoreError):
                await call()
    finally:
        await store.close()


_CRASHING_CHILD = textwrap.dedent(
    """
    import asyncio, os, pathlib, sys
    from ensync.server.store import SqliteStore, StoredMessage

    async def main() -> None:
        store = SqliteStore(pathlib.Path(sys.argv[1]))
        await store.open()
        await store.append([
            StoredMessage(idem=f"m{i}", recipient="r", name="n", block=i, payload="p",
                          metadata="{}", sender="s", created_at_ms=1)
            for i in range(1, 101)
        ])
        os._exit(0)  # die at once: no close, no flush, no atexit

    asyncio.run(main())
    """
)


async def test_sqlite_append_survives_the_process_dying(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ensync.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_CHILD, str(path), env=env, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    async with SqliteStore(path) as store:
        assert await store.last_block("r", "n") == 100
        assert len(await store.fetch_ready("r", "n", 0, 0, 1_000)) == 100


# --- open_store ---------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory", "memory:"])
def test_open_store_builds_a_memory_store(url: str, tmp_path: pathlib.Path) -> None:
    assert isinstance(open_store(url, tmp_path), MemoryStore)


@pytest.mark.parametrize(
    ("url", "relative_path"),
    [
        ("sqlite:", "ensync.db"),
        ("sqlite:other.db", "other.db"),
        ("sqlite:sub/other.db", "sub/other.db"),
    ],
)
def test_open_store_resolves_sqlite_paths_in_the_data_dir(
    url: str, relative_path: str, tmp_path: pathlib.Path
) -> None:
    store = open_store(url, tmp_path)
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / relative_path


def test_open_store_takes_absolute_sqlite_paths(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "elsewhere" / "x.db"
    store = open_store(f"sqlite://{target}", pathlib.Path("/unused"))
    assert isinstance(store, SqliteStore)
    assert store.path == target


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("nats://localhost:4222", "not supported yet"),
        ("postgres://db/ensync", "unsupported store URL 'postgres://db/ensync'"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///", "directory"),
        ("memory:x", "unsupported store URL 'memory:x'"),
        ("", "unsupported store URL ''"),
    ],
)
def test_open_store_names_a_bad_url(url: str, complaint: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=complaint):
        open_store(url, tmp_path)


async def test_backlog_counts_pending_messages_per_recipient(store: Store) -> None:
    messages = [
        message(f"b{i}", i + 1, recipient=RECIPIENT if i < 3 else OTHER_RECIPIENT) for i in range(5)
    ]
    await store.append(messages)
    assert await store.backlog() == {RECIPIENT: 3, OTHER_RECIPIENT: 2}
    await store.settle("b0", MessageState.ACKED, 1)
    await store.settle("b3", MessageState.DEAD, 1, "x")
    assert await store.backlog() == {RECIPIENT: 2, OTHER_RECIPIENT: 1}


async def test_recent_dedupe_keys_rebuild_the_window(store: Store) -> None:
    await store.append(
        [
            message("k1", 1, created_at_ms=100, dedupe_key="key-a"),
            message("k2", 2, created_at_ms=200),
            message("k3", 3, created_at_ms=300, dedupe_key="key-b", sender="other"),
            message("k4", 4, created_at_ms=50, dedupe_key="key-old"),
        ]
    )
    assert (await store.get("k1")) == message("k1", 1, created_at_ms=100, dedupe_key="key-a")
    assert await store.recent_dedupe_keys(100, 10) == [
        ("app-sender", RECIPIENT, "key-a", "k1"),
        ("other", RECIPIENT, "key-b", "k3"),
    ]
    assert await store.recent_dedupe_keys(1000, 10) == []
    assert await store.recent_dedupe_keys(0, 1) == [("other", RECIPIENT, "key-b", "k3")]


async def test_app_rules_round_trip(store: Store) -> None:
    ruled = app("ruled", publish_rules=("orders/*",), subscribe_rules=("billing/#", "x"))
    await store.create_app(ruled)
    assert await store.get_app_by_name("ruled") == ruled
    opened = dataclasses.replace(ruled, publish_rules=("#",))
    await store.update_app(opened)
    assert await store.get_app(ruled.app_id) == opened
    assert (await store.list_apps())[0].subscribe_rules == ("billing/#", "x")
