"""What the sqlite backend promises beyond the contract: durability across
reopening and process death, group commit, locking, its schema and its
migrations, and :func:`open_store`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from ensync.server.store import (
    MemoryStore,
    MessageState,
    Release,
    Settlement,
    SqliteStore,
    StoreError,
    open_store,
)
from ensync.server.store.sqlite import SCHEMA_VERSION, rows
from tests.conformance.stores import (
    POLICY,
    RECIPIENT,
    T0,
    app,
    append,
    claim,
    idems,
    new,
)
from tests.support.timing import eventually

__all__: list[str] = []

DATA = pathlib.Path(__file__).parent / "data"
# The same content, written by the engines of schema versions 1, 2 and 3.
OLD_FILES = [DATA / "v1.db", DATA / "v2.db", DATA / "v3.db"]


def db(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "ensync.db"


# --- durability ------------------------------------------------------------------


async def test_everything_survives_reopening(tmp_path: pathlib.Path) -> None:
    async with SqliteStore(db(tmp_path)) as store:
        await store.create_app(app("orders", revoked=True))
        await append(
            store,
            new("m1"),
            new("m2"),
            new("m3"),
            new("m4", dedupe_key="k"),
            new("v", persist=False),
        )
        await store.settle([Settlement("m1", MessageState.ACKED)], now_ms=T0 + 10)
        await store.settle([Settlement("m2", MessageState.DEAD, "bad")], now_ms=T0 + 20)
        await store.defer("m3", T0 + 5_000, T0)
        await store.prune(T0 + 15)
        (leased,) = (await claim(store, limit=1)).leases
        assert leased.message.idem == "m4"
    async with SqliteStore(db(tmp_path)) as reopened:
        assert await reopened.get("m1") is None  # pruned
        assert await reopened.get("v") is None  # persist: false lives in memory only
        (dead,) = await reopened.list_dead(RECIPIENT, 10)
        assert (dead.idem, dead.dead_reason, dead.settled_at_ms) == ("m2", "bad", T0 + 20)
        assert await reopened.list_apps() == [app("orders", revoked=True)]
        # Leases die with the process; deferrals and the attempt count do not.
        claimed = await claim(reopened, now_ms=T0 + 1)
        assert idems(claimed) == ["m4"]
        assert claimed.leases[0].message.attempts == 2
        await reopened.settle([Settlement("m4", MessageState.ACKED)], now_ms=T0 + 2)
        waiting = await claim(reopened, now_ms=T0 + 4_999)
        assert idems(waiting) == []
        assert waiting.next_visible_ms == T0 + 5_000
        assert idems(await claim(reopened, now_ms=T0 + 5_000)) == ["m3"]
        # Numbering and the idempotency window continue.
        fresh, repeated = await append(reopened, new("m5"), new("m6", dedupe_key="k"))
        assert fresh.block == 6
        assert (repeated.idem, repeated.duplicate) == ("m4", True)


async def test_an_append_is_durable_when_it_returns(tmp_path: pathlib.Path) -> None:
    crashed = SqliteStore(db(tmp_path))
    await crashed.open()
    try:
        await append(crashed, new("m1"))
        # No close(): a second store sees the data as a restarted engine would.
        async with SqliteStore(db(tmp_path)) as survivor:
            stored = await survivor.get("m1")
            assert stored is not None
            assert stored.block == 1
    finally:
        await crashed.close()


async def test_a_second_store_on_the_same_file_sees_writes(tmp_path: pathlib.Path) -> None:
    # The engine serves while `ensync app create` writes an app from another process.
    async with SqliteStore(db(tmp_path)) as engine:
        await append(engine, new("m1"))
        async with SqliteStore(db(tmp_path)) as cli:
            await cli.create_app(app("warehouse"))
            assert await cli.get("m1") is not None
        assert await engine.get_app_by_name("warehouse") == app("warehouse")


async def test_a_dead_letter_redriven_by_another_process_is_adopted(
    tmp_path: pathlib.Path,
) -> None:
    # `ensync dlq redrive` beside a running engine: the engine's windows read
    # past the message long ago; it learns of the redrive from the file.
    async with SqliteStore(db(tmp_path)) as engine:
        await append(engine, new("m1"), new("m2"))
        claimed = await claim(engine, now_ms=T0)
        assert idems(claimed) == ["m1", "m2"]
        await engine.settle([Settlement("m1", MessageState.DEAD, "bad")], now_ms=T0 + 1)
        await engine.settle([Settlement("m2", MessageState.ACKED)], now_ms=T0 + 1)
        async with SqliteStore(db(tmp_path)) as cli:
            assert await cli.redrive("m1", T0 + 2)
        assert idems(await claim(engine, now_ms=T0 + 3)) == []  # not seen yet
        assert await engine.adopt_redriven() == 1
        again = await claim(engine, now_ms=T0 + 3)
        assert idems(again) == ["m1"]
        assert again.leases[0].message.attempts == 1
        assert await engine.adopt_redriven() == 0  # taken once
        # Asked a few times a second by a running engine: nothing to take
        # costs no write transaction.
        commits = engine.statistics().commits
        assert await engine.adopt_redriven() == 0
        assert engine.statistics().commits == commits


async def test_close_waits_for_writes_already_queued(tmp_path: pathlib.Path) -> None:
    store = SqliteStore(db(tmp_path))
    await store.open()
    writes = [asyncio.ensure_future(append(store, new(f"m{i}"))) for i in range(100)]
    await asyncio.sleep(0)  # let every append enqueue
    await store.close()
    await asyncio.gather(*writes)
    async with SqliteStore(db(tmp_path)) as reopened:
        (later,) = await append(reopened, new("later"))
        assert later.block == 101


_CRASHING_CHILD = textwrap.dedent(
    """
    import asyncio, os, pathlib, sys
    from ensync.server.store import NewMessage, SqliteStore

    async def main() -> None:
        store = SqliteStore(pathlib.Path(sys.argv[1]))
        await store.open()
        await store.append(
            [NewMessage(idem=f"m{i}", recipient="r", name="n", payload="p", metadata="{}",
                        sender="s", created_at_ms=1) for i in range(1, 101)],
            now_ms=1, dedupe_since_ms=0,
        )
        os._exit(0)  # die at once: no close, no flush, no atexit

    asyncio.run(main())
    """
)


async def test_an_append_survives_the_process_dying(tmp_path: pathlib.Path) -> None:
    path = db(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_CHILD, str(path), env=env, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    async with SqliteStore(path) as store:
        claimed = await store.claim("r", "n", limit=1_000, now_ms=2, policy=POLICY)
        assert len(claimed.leases) == 100


async def test_concurrent_appends_share_commits(tmp_path: pathlib.Path) -> None:
    async with SqliteStore(db(tmp_path)) as store:
        before = store.statistics()
        await asyncio.gather(*(append(store, new(f"m-{i}")) for i in range(200)))
        after = store.statistics()
    assert after.writes - before.writes >= 200
    assert (after.commits - before.commits) * 4 <= after.writes - before.writes


async def test_max_batch_one_commits_every_write(tmp_path: pathlib.Path) -> None:
    async with SqliteStore(db(tmp_path), max_batch=1, synchronous="NORMAL") as store:
        await asyncio.gather(*(append(store, new(f"m{i}")) for i in range(20)))
        stats = store.statistics()
    assert stats.writes == stats.commits
    assert stats.largest_batch == 1


async def test_checkpoints_run_beside_the_writer_and_only_after_commits(
    tmp_path: pathlib.Path,
) -> None:
    path = db(tmp_path)
    async with SqliteStore(path) as store:
        empty = path.stat().st_size
        for round_ in range(4):
            await asyncio.gather(
                *(append(store, new(f"m{round_}-{i}", payload="x" * 4000)) for i in range(50))
            )
        # The writer leaves pages in the WAL; the checkpointer thread copies
        # them into the database file while the store stays open.
        await eventually(
            lambda: store.statistics().checkpoints >= 1 and path.stat().st_size > empty + 400_000
        )
        await asyncio.sleep(0.3)  # a checkpoint of the last commits may still come
        idle = store.statistics().checkpoints
        await asyncio.sleep(0.3)  # three checkpoint periods without a commit
        assert store.statistics().checkpoints == idle


# --- schema and migrations -----------------------------------------------------------


async def test_the_file_uses_wal_and_records_its_schema_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nested" / "dir" / "ensync.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"messages", "partitions", "apps", "messages_due"} <= names


@pytest.mark.parametrize("old_file", OLD_FILES, ids=lambda path: path.stem)
async def test_an_older_data_directory_is_migrated_and_keeps_working(
    tmp_path: pathlib.Path, old_file: pathlib.Path
) -> None:
    # Ten pending messages (three with idempotency keys, one delivered once),
    # one deferred far into the future, one dead, one acked, and one for
    # another app.
    path = db(tmp_path)
    shutil.copy(old_file, path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        bodies = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT idem, payload, metadata, payload_metadata FROM messages"
            )
        }
    assert len(bodies) == 14
    bob, alice = "B" * 43 + "=", "A" * 43 + "="
    async with SqliteStore(path) as store:
        for idem, body in bodies.items():
            kept = await store.get(idem)
            assert kept is not None
            assert (kept.payload, kept.metadata, kept.payload_metadata) == body
        claimed = await store.claim(bob, "orders/created", limit=100, now_ms=T0, policy=POLICY)
        assert idems(claimed) == [f"01backlog{i:02d}" for i in range(1, 11)]
        assert claimed.leases[1].message.attempts == 2  # delivered once before
        await store.settle(
            [Settlement(lease.message.idem, MessageState.ACKED) for lease in claimed.leases],
            now_ms=T0,
        )
        waiting = await store.claim(bob, "orders/created", limit=100, now_ms=T0, policy=POLICY)
        assert idems(waiting) == []
        assert waiting.next_visible_ms == 4_102_444_800_000  # the deferral, still on disk
        (dead,) = await store.list_dead(bob, 10)
        assert (dead.idem, dead.dead_reason) == ("01dead000001", "discarded: bad")
        acked = await store.get("01acked00001")
        assert acked is not None
        assert acked.state is MessageState.ACKED
        assert idems(await store.claim(alice, "billing/due", limit=9, now_ms=T0, policy=POLICY))
        assert [a.name for a in await store.list_apps()] == ["alice", "bob"]
        # Numbering continues after block 13; the old idempotency keys hold.
        fresh, repeated = await store.append(
            [
                new("fresh", recipient=bob, name="orders/created", sender=alice),
                new(
                    "again", recipient=bob, name="orders/created", sender=alice, dedupe_key="key-2"
                ),
            ],
            now_ms=T0,
            dedupe_since_ms=0,
        )
        assert fresh.block == 14
        assert (repeated.idem, repeated.duplicate) == ("01backlog02", True)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "messages_due" in names
    assert "messages_scheduled" not in names
    assert_partial_indexes(path)


def assert_partial_indexes(path: pathlib.Path) -> None:
    with sqlite3.connect(path) as conn:
        indexes = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    conn.close()
    assert indexes["messages_ready"].endswith("(recipient, name, block) WHERE state = 0")
    assert indexes["messages_due"].endswith("(recipient, name, visible_at_ms) WHERE state = 0")
    assert indexes["messages_dead"].endswith("(recipient, settled_at_ms) WHERE state = 2")


async def test_the_hot_queries_use_the_partial_indexes(tmp_path: pathlib.Path) -> None:
    # A partial index serves a query only if the query names the state as
    # a literal; a bound parameter would send SQLite to a table scan.
    path = db(tmp_path)
    async with SqliteStore(path):
        pass
    assert_partial_indexes(path)
    conn = sqlite3.connect(path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        rows.page(RECIPIENT, "n", 0, 100, T0, 10, conn)
        rows.due(RECIPIENT, "n", T0, T0 + 1, 100, 10, conn)
        rows.next_due(RECIPIENT, "n", T0, conn)
        rows.list_dead(RECIPIENT, 10, conn)
        rows.backlog(conn)
        conn.set_trace_callback(None)
        plans = [
            " ".join(str(step[-1]) for step in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in statements
        ]
    finally:
        conn.close()
    assert len(plans) == 5
    pending = ("messages_ready", "messages_due")
    for plan, indexes in zip(
        plans,
        [("messages_ready",), ("messages_due",), ("messages_due",), ("messages_dead",), pending],
        strict=True,
    ):
        assert any(f"USING INDEX {index}" in plan for index in indexes), plan
        assert re.search(r"SCAN messages(?! USING)", plan) is None, plan
        assert "SCAN bodies" not in plan, plan


async def test_a_newer_schema_is_refused(tmp_path: pathlib.Path) -> None:
    path = db(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(path)
    with pytest.raises(StoreError, match="schema version"):
        await store.open()
    await store.close()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: pathlib.Path) -> None:
    path = db(tmp_path)
    path.write_bytes(b"certainly not sqlite " * 100)
    with pytest.raises(StoreError, match=str(path)):
        await SqliteStore(path).open()


async def test_an_unusable_directory_is_reported(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(StoreError):
        await SqliteStore(blocker / "ensync.db").open()


def test_bad_options_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(db(tmp_path), synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        SqliteStore(db(tmp_path), max_batch=0)


# --- locks and failures ----------------------------------------------------------------


async def test_a_lock_held_elsewhere_fails_the_write_then_recovers(
    tmp_path: pathlib.Path,
) -> None:
    path = db(tmp_path)
    async with SqliteStore(path, busy_timeout_ms=50) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            (refused,) = await append(store, new("m1"))
            assert "locked" in (refused.error or "")
            other.execute("ROLLBACK")
        finally:
            other.close()
        (stored,) = await append(store, new("m1"))
        assert stored.error is None
        assert idems(await claim(store)) == ["m1"]


async def test_reads_do_not_wait_behind_a_blocked_writer(tmp_path: pathlib.Path) -> None:
    path = db(tmp_path)
    async with SqliteStore(path, busy_timeout_ms=10_000) as store:
        await append(store, new("m1"))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            blocked = asyncio.ensure_future(append(store, new("m2")))
            async with asyncio.timeout(2):
                assert await store.get("m1") is not None
                assert await store.backlog() == {RECIPIENT: 1}
            assert not blocked.done()  # the positive control: the writer did wait
            other.execute("ROLLBACK")
        finally:
            other.close()
        (result,) = await blocked
        assert result.error is None


async def test_writer_death_fails_pending_and_later_calls(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(db(tmp_path))
    await store.open()
    try:
        await append(store, new("m1"))

        def crash(*_args: object) -> None:
            raise RuntimeError("simulated bug in the writer")

        # Fault injection through a private seam: nothing public can kill the thread.
        monkeypatch.setattr(store._runner, "_run_batch", crash)
        (failed,) = await append(store, new("m2"))
        assert failed.error is not None
        with pytest.raises(StoreError):
            await store.settle([Settlement("m1", MessageState.ACKED)], now_ms=T0)
        with pytest.raises(StoreError):
            await store.get("m1")
        with pytest.raises(StoreError):
            await claim(store)
    finally:
        await store.close()


async def test_lease_bookkeeping_needs_no_fsync_per_claim(tmp_path: pathlib.Path) -> None:
    async with SqliteStore(db(tmp_path)) as store:
        await append(store, *(new(f"m{i}") for i in range(50)))
        before = store.statistics().commits
        leases = (await claim(store, limit=50)).leases
        await store.release(
            [Release(lease.message.idem, lease.token) for lease in leases],
            now_ms=T0,
            policy=POLICY,
        )
        await claim(store, limit=50)
        # Attempt counts are written behind, batched with other writes.
        assert store.statistics().commits - before <= 3


# --- open_store ----------------------------------------------------------------


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
        ("nats://", "is not nats://HOST:PORT"),
        ("nats://a:4222,http://b:4222", "'http://b:4222' is not nats://HOST:PORT"),
        ("nats://a:4222?shards=2", "unknown option 'shards'"),
        ("nats://a:4222?replicas=2", "replicas must be 1, 3 or 5"),
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


async def test_deferred_messages_stay_on_disk_until_they_come_due(tmp_path: pathlib.Path) -> None:
    # Opening reads numbering and recent keys only; a claim reads what is
    # claimable now; the schedule is asked for its next time, not loaded.
    async with SqliteStore(db(tmp_path)) as store:
        await append(store, *(new(f"d-{i}") for i in range(3_000)))
        for i in range(3_000):
            assert await store.defer(f"d-{i}", T0 + 3_600_000 + i, T0)
    async with SqliteStore(db(tmp_path)) as reopened:
        assert reopened.delivery_statistics() == (0, 0)
        waiting = await claim(reopened, now_ms=T0 + 1)
        assert waiting.leases == ()
        assert waiting.next_visible_ms == T0 + 3_600_000
        assert reopened.delivery_statistics() == (0, 0)  # nothing held in memory
        due = await claim(reopened, now_ms=T0 + 3_600_000 + 9, limit=100)
        assert idems(due) == [f"d-{i}" for i in range(10)]
