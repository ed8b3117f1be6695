"""The JetStream backend beyond the shared contract: several store instances
(engine nodes) over one JetStream, store URLs, and failures to connect."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from ensync.server.store import (
    Lease,
    MemoryStore,
    MessageState,
    Release,
    Released,
    Settlement,
    StoreError,
    open_store,
)
from ensync.server.store.base import SessionRecord, SessionRegistry
from ensync.server.store.jetstream import JetStreamStore, StreamConfigError, appends
from ensync.server.store.jetstream._common import (
    CONFLICT_PAUSE_CAP_S,
    CONFLICT_PAUSE_FIRST_S,
    RETRIES,
    conflict_pause_s,
)
from ensync.server.store.jetstream.api import ConflictError, Out, RejectedError, _answer
from ensync.server.store.jetstream.records import Names
from ensync.server.store.jetstream.streams import stream_configs, stream_problems
from tests.conformance.stores import NAME, POLICY, RECIPIENT, T0, app, append, claim, idems, new
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually

__all__: list[str] = []


@pytest.fixture
async def nodes(tmp_path: pathlib.Path) -> AsyncIterator[tuple[JetStreamStore, JetStreamStore]]:
    """Two store instances over one namespace: two engine nodes' view."""
    namespace = namespace_for(tmp_path)
    a = JetStreamStore([nats_url()], namespace=namespace, node="a", refresh_s=0.1)
    b = JetStreamStore([nats_url()], namespace=namespace, node="b", refresh_s=0.1)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_nodes_number_one_partition_together_without_repeats(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    results = await asyncio.gather(
        *(
            append(node, new(f"{name}-{i}"))
            for i in range(60)
            for name, node in (("a", a), ("b", b))
        )
    )
    assert sorted(r.block for (r,) in results) == list(range(1, 121))
    # Block order is delivery order, whichever node claims.
    seen: list[str] = []
    while claimed := await claim(b, limit=50):
        if not claimed.leases:
            break
        seen += idems(claimed)
        assert [lease.message.block for lease in claimed.leases] == sorted(
            lease.message.block for lease in claimed.leases
        )
    blocks = {r.idem: r.block for (r,) in results}
    assert [blocks[idem] for idem in seen] == list(range(1, 121))


async def test_a_key_retried_through_another_node_is_stored_once(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    (first,) = await append(a, new("m-1", dedupe_key="k"))
    (again,) = await append(b, new("m-2", dedupe_key="k"), now_ms=T0 + 1_000)
    assert (again.idem, again.block, again.duplicate) == ("m-1", first.block, True)
    assert await b.get("m-2") is None
    together = await asyncio.gather(
        *(
            append(node, new(f"c-{i}-{n}", dedupe_key="c"))
            for i in range(5)
            for n, node in ((0, a), (1, b))
        )
    )
    assert len({result.idem for (result,) in together}) == 1


async def test_competing_nodes_never_lease_a_message_twice(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    await append(a, *(new(f"m-{i}") for i in range(300)))
    claims = await asyncio.gather(*(claim(node, limit=7) for _ in range(30) for node in (a, b)))
    taken = [idem for claimed in claims for idem in idems(claimed)]
    assert len(taken) == len(set(taken))
    rest = []
    for node in (a, b, a):
        while more := idems(await claim(node, limit=100)):
            rest += more
    assert sorted(taken + rest) == sorted(f"m-{i}" for i in range(300))


async def test_a_lease_left_by_a_dead_node_comes_back_on_another(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    await append(a, new("m-1"), new("m-2"))
    (lease, _) = (await claim(a)).leases
    waiting = await claim(b)  # b finds both leased, and when they run out
    assert idems(waiting) == []
    assert waiting.next_visible_ms == lease.deadline_ms
    await a.close()  # a dies holding both leases
    assert idems(await claim(b, now_ms=lease.deadline_ms - 1)) == []
    again = await claim(b, now_ms=lease.deadline_ms)
    assert idems(again) == ["m-1", "m-2"]
    assert [lease.message.attempts for lease in again.leases] == [2, 2]


async def test_a_node_that_read_a_partition_earlier_finds_the_leases_of_a_dead_one(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    assert idems(await claim(b)) == []  # b serves the partition; nothing there yet
    heard: list[tuple[str, str]] = []
    b.watch(lambda recipient, name: heard.append((recipient, name)))
    await append(a, new("m-1"))
    (lease,) = (await claim(a)).leases
    await a.close()
    heard.clear()
    # b re-reads the leases of partitions it serves and says they changed.
    await eventually(lambda: (RECIPIENT, NAME) in heard, what="b re-reading the leases")
    waiting = await claim(b)
    assert (idems(waiting), waiting.next_visible_ms) == ([], lease.deadline_ms)
    assert idems(await claim(b, now_ms=lease.deadline_ms)) == ["m-1"]


async def test_what_one_node_settles_or_defers_the_other_respects(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    await append(a, new("m-1"), new("m-2"), new("m-3"))
    leases = {lease.message.idem: lease for lease in (await claim(a)).leases}
    # A client that moved to b settles and defers through b.
    assert await b.settle([Settlement("m-1", MessageState.ACKED)], now_ms=T0) == [True]
    assert await b.defer("m-2", T0 + 5_000, T0)
    # a's leases on them are gone: releasing is stale, settling again is refused.
    released = await a.release(
        [Release("m-1", leases["m-1"].token), Release("m-2", leases["m-2"].token)],
        now_ms=T0,
        policy=POLICY,
    )
    assert [r.stale for r in released] == [True, True]
    assert await a.settle([Settlement("m-1", MessageState.ACKED)], now_ms=T0) == [False]
    assert await a.settle([Settlement("m-3", MessageState.ACKED)], now_ms=T0) == [True]
    stored = await a.get("m-1")
    assert stored is not None
    assert stored.state is MessageState.ACKED
    assert idems(await claim(a, now_ms=T0 + 5_000)) == ["m-2"]


async def test_a_node_hears_of_another_nodes_appends(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    heard: list[tuple[str, str]] = []
    b.watch(lambda recipient, name: heard.append((recipient, name)))
    await append(a, new("m-1"))
    await eventually(lambda: heard == [(RECIPIENT, NAME)], what="b hearing of a's append")


async def test_apps_written_on_one_node_are_read_on_the_other(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    await a.create_app(app("orders"))
    assert await b.get_app_by_name("orders") == app("orders")
    revoked = app("orders", revoked=True)
    await b.update_app(revoked)
    assert await a.get_app_by_key_hash(revoked.key_hash) == revoked


async def test_memory_only_bodies_stay_out_of_the_file_stream(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, _ = nodes
    await append(a, new("v-1", persist=False, payload="secret-ish"))
    info = await a._check_open().request(f"$JS.API.STREAM.INFO.{a.names.volatile}")
    assert info["config"]["storage"] == "memory"
    assert info["state"]["messages"] == 1
    stored = await a.get("v-1")
    assert stored is not None
    assert (stored.payload, stored.persist) == ("secret-ish", False)


async def test_an_unreachable_nats_is_named() -> None:
    store = JetStreamStore(["nats://127.0.0.1:9"])
    with pytest.raises(StoreError, match=r"cannot reach NATS at nats://127.0.0.1:9"):
        await store.open()


def test_store_urls_name_servers_and_options(tmp_path: pathlib.Path) -> None:
    store = open_store("nats://a:4222, tls://b:4222?replicas=3&namespace=prod", tmp_path)
    assert isinstance(store, JetStreamStore)
    assert store.names.messages == "PROD_MESSAGES"
    assert store._servers == ["nats://a:4222", "tls://b:4222"]
    assert store._replicas == 3


def test_a_nats_store_without_nats_py_says_what_to_install(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'ensync\[cluster\]'"):
        open_store("nats://127.0.0.1:4222", tmp_path)


async def test_sessions_registered_on_one_node_are_found_on_the_other(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    a, b = nodes
    record = SessionRecord("id-of-alice", b"key-hash", "client-hash", T0)
    await a.register_sessions([("client-1", record)], ttl_ms=60_000)
    assert await b.find_session("client-1") == record
    assert await b.find_session("client-2") is None
    assert isinstance(a, SessionRegistry)
    assert not isinstance(MemoryStore(), SessionRegistry)  # one node: nothing to share


async def test_more_lease_ends_than_one_atomic_batch_holds(
    nodes: tuple[JetStreamStore, JetStreamStore],
) -> None:
    # A session that ends with a full window releases it all at once; an
    # engine coalescing acks settles as many. JetStream's atomic batches
    # hold 1,000 messages.
    a, _ = nodes
    total = 1_700
    await append(a, *(new(f"m-{i}") for i in range(total)))
    leases: list[Lease] = []
    while claimed := (await claim(a, limit=400)).leases:
        leases += claimed
    assert len(leases) == total
    released = await a.release(
        [Release(lease.message.idem, lease.token) for lease in leases[:1_100]],
        now_ms=T0,
        policy=POLICY,
    )
    assert released == [Released(visible_at_ms=T0)] * 1_100
    settled = await a.settle(
        [Settlement(lease.message.idem, MessageState.ACKED) for lease in leases[1_100:]],
        now_ms=T0,
    )
    assert settled == [True] * 600
    assert await a.backlog() == {RECIPIENT: 1_100}


# --- conflicts on replicated streams ------------------------------------------------


@pytest.mark.parametrize("code", [10071, 10163, 10164])
def test_every_answer_that_an_expectation_failed_is_a_conflict(code: int) -> None:
    # 10071 from one server; 10164 (and 10163 while a write to the subject is
    # still being replicated) from a replicated stream.
    answer = orjson.dumps({"error": {"code": 400, "err_code": code, "description": "wrong"}})
    with pytest.raises(ConflictError) as raised:
        _answer(answer)
    assert raised.value.code == code


def test_other_refusals_are_not_conflicts() -> None:
    answer = orjson.dumps({"error": {"code": 400, "err_code": 10201, "description": "dup"}})
    with pytest.raises(RejectedError, match=r"\(10201\): dup"):
        _answer(answer)


async def test_an_append_that_always_conflicts_gives_up_after_a_bounded_number_of_tries(
    nodes: tuple[JetStreamStore, JetStreamStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch that expects on one subject twice is answered 10164 every time.
    a, _ = nodes
    api = a._check_open()
    tries: list[int] = []
    pauses: list[int] = []

    async def conflicting(messages: Sequence[Out]) -> int:
        tries.append(len(messages))
        raise ConflictError(10164, "wrong last sequence")

    async def pause(attempt: int) -> None:
        pauses.append(attempt)

    monkeypatch.setattr(api, "atomic", conflicting)
    monkeypatch.setattr(appends, "pause_after_conflict", pause)
    (result,) = await append(a, new("m-1"))
    assert result.error is not None
    assert "kept conflicting" in result.error
    assert len(tries) == RETRIES
    assert pauses == list(range(RETRIES))


def test_pauses_after_conflicts_are_random_and_grow_to_a_cap() -> None:
    for attempt in range(12):
        window = min(CONFLICT_PAUSE_CAP_S, CONFLICT_PAUSE_FIRST_S * 2**attempt)
        pauses = [conflict_pause_s(attempt) for _ in range(50)]
        assert all(0 <= pause <= window for pause in pauses)
        assert len(set(pauses)) > 1
    assert conflict_pause_s(40) <= CONFLICT_PAUSE_CAP_S


# --- streams: created when absent, never changed -----------------------------------


async def _stream_config(store: JetStreamStore, stream: str) -> dict[str, Any]:
    info = await store._check_open().request(f"$JS.API.STREAM.INFO.{stream}")
    config: dict[str, Any] = info["config"]
    return config


async def test_open_never_changes_an_existing_stream_and_names_what_differs(
    tmp_path: pathlib.Path,
) -> None:
    url = f"{nats_url()}?namespace={namespace_for(tmp_path)}"
    first = open_store(url, tmp_path)
    assert isinstance(first, JetStreamStore)
    await first.open()
    try:
        names = first.names
        # A URL that asks for other replicas than the streams have is refused.
        three = open_store(url + "&replicas=3", tmp_path)
        with pytest.raises(StreamConfigError) as refused:
            await three.open()
        assert str(refused.value).startswith(
            f"streams {names.messages}, {names.volatile}, {names.state}, {names.apps},"
            f" {names.counts} have 1 replica, this store URL asks for 3:"
            " add ?replicas=1 to the store URL"
        )
        assert (await _stream_config(first, names.state))["num_replicas"] == 1
        # An operator's limit is neither undone nor accepted silently.
        state = await _stream_config(first, names.state)
        await first._check_open().request(
            f"$JS.API.STREAM.UPDATE.{names.state}", {**state, "max_age": 3600 * 10**9}
        )
        again = open_store(url, tmp_path)
        with pytest.raises(StreamConfigError) as differs:
            await again.open()
        assert f"stream {names.state}: max_age is 3600 s, ensync needs no limit" in str(
            differs.value
        )
        assert "ensync never changes an existing stream" in str(differs.value)
        assert (await _stream_config(first, names.state))["max_age"] == 3600 * 10**9
        # Set back, the streams are used as they are, with or without ?replicas=1.
        await first._check_open().request(f"$JS.API.STREAM.UPDATE.{names.state}", state)
        for same in (url, url + "&replicas=1"):
            store = open_store(same, tmp_path)
            await store.open()
            await store.close()
    finally:
        await first.close()


def test_a_mismatch_of_replicas_says_what_the_url_should_say() -> None:
    names = Names("prod")
    configs = stream_configs(names)
    found = {config["name"]: {**config, "num_replicas": 3} for config in configs}
    message = stream_problems(configs, found, 1)
    assert message.startswith(
        "streams PROD_MESSAGES, PROD_VOLATILE, PROD_STATE, PROD_APPS, PROD_COUNTS have"
        " 3 replicas, this store URL asks for 1: add ?replicas=3 to the store URL"
    )
    assert "nats stream edit PROD_MESSAGES --replicas 1" in message
    assert stream_problems(configs, found, 3) == ""
    assert stream_problems(configs, found, None) == ""  # no ?replicas: as they are
    one = {names.state: {**found[names.state], "num_replicas": 1}}
    assert stream_problems(configs, one, 3).startswith(
        "stream PROD_STATE has 1 replica, this store URL asks for 3: add ?replicas=1"
    )
    lacking = {names.apps: {**found[names.apps], "subjects": [], "allow_atomic": False}}
    assert stream_problems(configs, lacking, None) == (
        "existing streams are not configured as ensync needs them (stream PROD_APPS:"
        " subjects lack prod.app.>; allow_atomic is false, ensync needs true). ensync never"
        " changes an existing stream: set these back with the NATS CLI (nats stream edit"
        " PROD_APPS ...), delete the streams if their data can go, or use another namespace"
        " (?namespace=NAME)"
    )
