"""Appends without a coroutine (``AppendsSoon``): what the engine's publish
path uses on the stores of one machine. Every outcome must equal what
``append`` gives."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator

import pytest

from ensync.server.store import MemoryStore, SqliteStore, StoreError
from ensync.server.store.base import Appended, AppendsSoon, NewMessage
from ensync.server.store.sqlite import rows
from tests.conformance.stores import (
    DEDUPE_WINDOW_MS,
    RECIPIENT,
    T0,
    append,
    claim,
    idems,
    new,
)

__all__: list[str] = []


def _sqlite(tmp_path: pathlib.Path) -> SqliteStore:
    return SqliteStore(tmp_path / "ensync.db")


def _memory(_: pathlib.Path) -> MemoryStore:
    return MemoryStore()


@pytest.fixture(params=[_memory, _sqlite], ids=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[SqliteStore | MemoryStore]:
    made = request.param(tmp_path)
    await made.open()
    try:
        yield made
    finally:
        await made.close()


def start(
    store: AppendsSoon, *messages: NewMessage, now_ms: int = T0
) -> asyncio.Future[list[Appended] | StoreError]:
    """Start an append; the future of what its callback heard."""
    heard: asyncio.Future[list[Appended] | StoreError] = asyncio.get_running_loop().create_future()
    store.append_soon(
        list(messages),
        now_ms=now_ms,
        dedupe_since_ms=now_ms - DEDUPE_WINDOW_MS,
        done=heard.set_result,
    )
    return heard


async def test_the_stores_of_one_machine_append_soon(store: SqliteStore | MemoryStore) -> None:
    assert isinstance(store, AppendsSoon)


async def test_a_batch_is_numbered_stored_and_claimable(store: SqliteStore | MemoryStore) -> None:
    outcome = await start(store, new("m1"), new("m2"))
    assert not isinstance(outcome, StoreError)
    assert [(a.idem, a.block, a.error, a.duplicate) for a in outcome] == [
        ("m1", 1, None, False),
        ("m2", 2, None, False),
    ]
    assert idems(await claim(store)) == ["m1", "m2"]
    assert (await store.backlog()) == {RECIPIENT: 2}


async def test_numbering_is_shared_with_append(store: SqliteStore | MemoryStore) -> None:
    await append(store, new("m1"))
    outcome = await start(store, new("m2"))
    assert not isinstance(outcome, StoreError)
    assert [a.block for a in outcome] == [2]


async def test_a_known_idempotency_key_is_a_duplicate(store: SqliteStore | MemoryStore) -> None:
    await append(store, new("m1", dedupe_key="k"))
    outcome = await start(store, new("m2", dedupe_key="k"), now_ms=T0 + 10)
    assert not isinstance(outcome, StoreError)
    assert [(a.idem, a.duplicate) for a in outcome] == [("m1", True)]


async def test_a_key_still_being_stored_waits_for_the_first(
    store: SqliteStore | MemoryStore,
) -> None:
    first = start(store, new("m1", dedupe_key="k"))
    second = start(store, new("m2", dedupe_key="k"), new("m3"))
    outcome = await second
    assert first.done()  # the second batch heard only after the first stored the key
    assert not isinstance(outcome, StoreError)
    assert [(a.idem, a.duplicate) for a in outcome] == [("m1", True), ("m3", False)]
    assert idems(await claim(store)) == ["m1", "m3"]


async def test_a_repeated_idem_fails_alone(store: SqliteStore | MemoryStore) -> None:
    outcome = await start(store, new("m1"), new("m1"))
    assert not isinstance(outcome, StoreError)
    assert [a.error is None for a in outcome] == [True, False]


async def test_a_closed_store_refuses_at_once(tmp_path: pathlib.Path) -> None:
    closed = _sqlite(tmp_path)
    await closed.open()
    await closed.close()
    with pytest.raises(StoreError):
        start(closed, new("m1"))


async def test_a_failed_commit_fails_each_row_and_frees_the_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ensync.db"
    async with SqliteStore(path, busy_timeout_ms=50) as sqlite_store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            outcome = await start(sqlite_store, new("m1", dedupe_key="k"))
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert not isinstance(outcome, StoreError)
        assert "locked" in (outcome[0].error or "")
        retried = await start(sqlite_store, new("m2", dedupe_key="k"))
        assert not isinstance(retried, StoreError)
        assert [(a.idem, a.error, a.duplicate) for a in retried] == [("m2", None, False)]
        assert idems(await claim(sqlite_store)) == ["m2"]


async def test_an_append_heard_is_durable(tmp_path: pathlib.Path) -> None:
    async with _sqlite(tmp_path) as first:
        outcome = await start(first, new("m1"))
        assert not isinstance(outcome, StoreError)
    async with _sqlite(tmp_path) as reopened:
        assert (await reopened.get("m1")) is not None
        assert idems(await claim(reopened)) == ["m1"]


async def test_a_failing_write_fails_its_rows_and_the_store_goes_on(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _sqlite(tmp_path) as sqlite_store:
        real = rows.insert_rows

        def broken(*_args: object) -> list[str | None]:
            raise RuntimeError("simulated bug in a write")

        monkeypatch.setattr(rows, "insert_rows", broken)
        outcome = await start(sqlite_store, new("m1"))
        assert not isinstance(outcome, StoreError)
        assert "simulated bug" in (outcome[0].error or "")
        monkeypatch.setattr(rows, "insert_rows", real)
        retried = await start(sqlite_store, new("m2"))
        assert not isinstance(retried, StoreError)
        assert [a.error for a in retried] == [None]
        assert idems(await claim(sqlite_store)) == ["m2"]
