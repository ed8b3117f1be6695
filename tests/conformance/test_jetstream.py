"""The JetStream backend beyond the shared contract: two engine nodes' stores
over one namespace, store URLs, streams that are never changed, and
failures to connect. (What the owner of a partition does: test_owned_store.py;
calls between nodes: test_cluster_store.py.)"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from ensync.server.core.ids import new_idem
from ensync.server.store import (
    Lease,
    MemoryStore,
    MessageState,
    NewMessage,
    Release,
    Settlement,
    StoreError,
    open_store,
)
from ensync.server.store.base import SessionRecord, SessionRegistry
from ensync.server.store.jetstream import ClusterStore, StreamConfigError
from ensync.server.store.jetstream.api import ConflictError, RejectedError, _answer
from ensync.server.store.jetstream.apps import (
    CONFLICT_PAUSE_CAP_S,
    CONFLICT_PAUSE_FIRST_S,
    conflict_pause_s,
)
from ensync.server.store.jetstream.records import Names
from ensync.server.store.jetstream.streams import stream_configs, stream_problems
from ensync.server.store.ownership import LeaseTiming, slot_of
from tests.conformance.stores import NAME, POLICY, RECIPIENT, T0, app, append, claim, idems, new
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually

__all__: list[str] = []

SLOTS = 8
TIMING = LeaseTiming(ttl_ms=3000, renew_every_ms=300, margin_ms=1200)


@pytest.fixture
async def nodes(tmp_path: pathlib.Path) -> AsyncIterator[tuple[ClusterStore, ClusterStore]]:
    """Two engine nodes' stores over one namespace, each serving half the slots."""
    made = [
        ClusterStore(
            [nats_url()], namespace=namespace_for(tmp_path), slots=SLOTS, node=node, timing=TIMING
        )
        for node in ("a", "b")
    ]
    try:
        for store in made:
            await store.open()
        a, b = made
        await eventually(
            lambda: len(a._table.slots) == len(b._table.slots) == SLOTS // 2,
            15,
            "both nodes serving half the slots",
        )
        yield a, b
    finally:
        for store in made:
            await store.close()


def message(index: int, **changes: Any) -> NewMessage:
    """A publish to RECIPIENT/NAME whose id carries its slot, as the engine makes them."""
    return new(new_idem(T0 + index, slot=slot_of(RECIPIENT, NAME, SLOTS)), **changes)


async def test_nodes_number_one_partition_together_without_repeats(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    sent = [(message(i), node) for i in range(60) for node in (a, b)]
    results = await asyncio.gather(*(append(node, m) for m, node in sent))
    assert sorted(r.block for (r,) in results) == list(range(1, 121))
    # Block order is delivery order, whichever node claims.
    seen: list[str] = []
    while claimed := (await claim(b, limit=50)).leases:
        seen += [lease.message.idem for lease in claimed]
    blocks = {r.idem: r.block for (r,) in results}
    assert [blocks[idem] for idem in seen] == list(range(1, 121))


async def test_a_key_retried_through_another_node_is_stored_once(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    original, retried = message(1, dedupe_key="k"), message(2, dedupe_key="k")
    (first,) = await append(a, original)
    (again,) = await append(b, retried, now_ms=T0 + 1_000)
    assert (again.idem, again.block, again.duplicate) == (original.idem, first.block, True)
    assert await b.get(retried.idem) is None
    together = await asyncio.gather(
        *(append(node, message(10 + i, dedupe_key="c")) for i in range(5) for node in (a, b))
    )
    assert len({result.idem for (result,) in together}) == 1


async def test_competing_nodes_never_lease_a_message_twice(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    sent = [message(i) for i in range(300)]
    await append(a, *sent)
    claims = await asyncio.gather(*(claim(node, limit=7) for _ in range(30) for node in (a, b)))
    taken = [idem for claimed in claims for idem in idems(claimed)]
    assert len(taken) == len(set(taken))
    rest = []
    for node in (a, b, a):
        while more := idems(await claim(node, limit=100)):
            rest += more
    assert sorted(taken + rest) == sorted(m.idem for m in sent)


async def test_a_lease_taken_through_a_node_that_died_comes_back_on_another(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    owner, other = (a, b) if a.serves(slot_of(RECIPIENT, NAME, SLOTS)) else (b, a)
    sent = [message(1), message(2)]
    await append(other, *sent)
    (lease, _) = (await claim(other)).leases  # a client of the other node's
    waiting = await claim(owner)  # both leased, and the owner says until when
    assert idems(waiting) == []
    assert waiting.next_visible_ms == lease.deadline_ms
    await other.close()  # the node goes, its client's leases with it
    assert idems(await claim(owner, now_ms=lease.deadline_ms - 1)) == []
    again = await claim(owner, now_ms=lease.deadline_ms)
    assert idems(again) == [m.idem for m in sent]
    assert [lease.message.attempts for lease in again.leases] == [2, 2]


async def test_what_one_node_settles_or_defers_the_other_respects(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    m1, m2, m3 = (message(i) for i in range(3))
    await append(a, m1, m2, m3)
    leases = {lease.message.idem: lease for lease in (await claim(a)).leases}
    # A client that moved to b settles and defers through b.
    assert await b.settle([Settlement(m1.idem, MessageState.ACKED)], now_ms=T0) == [True]
    assert await b.defer(m2.idem, T0 + 5_000, T0)
    # a's leases on them are gone: releasing is stale, settling again is refused.
    released = await a.release(
        [Release(m1.idem, leases[m1.idem].token), Release(m2.idem, leases[m2.idem].token)],
        now_ms=T0,
        policy=POLICY,
    )
    assert [r.stale for r in released] == [True, True]
    assert await a.settle([Settlement(m1.idem, MessageState.ACKED)], now_ms=T0) == [False]
    assert await a.settle([Settlement(m3.idem, MessageState.ACKED)], now_ms=T0) == [True]
    stored = await a.get(m1.idem)
    assert stored is not None
    assert stored.state is MessageState.ACKED
    assert idems(await claim(a, now_ms=T0 + 5_000)) == [m2.idem]


async def test_apps_written_on_one_node_are_read_on_the_other(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    await a.create_app(app("orders"))
    assert await b.get_app_by_name("orders") == app("orders")
    revoked = app("orders", revoked=True)
    await b.update_app(revoked)
    assert await a.get_app_by_key_hash(revoked.key_hash) == revoked


async def test_memory_only_messages_stay_out_of_the_stream(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    volatile = message(1, persist=False, payload="secret-ish")
    await append(a, volatile)
    stored = await b.get(volatile.idem)
    assert stored is not None
    assert (stored.payload, stored.persist) == ("secret-ish", False)
    found = await a.api.get_after(a.names.owned, f"{a.names.owned_prefix}.m.>", 1, 100)
    assert [got for got in found if b"secret-ish" in got.data] == []


async def test_sessions_registered_on_one_node_are_found_on_the_other(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = nodes
    record = SessionRecord("id-of-alice", b"key-hash", "client-hash", T0)
    await a.register_sessions([("client-1", record)], ttl_ms=60_000)
    assert await b.find_session("client-1") == record
    assert await b.find_session("client-2") is None
    assert isinstance(a, SessionRegistry)
    assert not isinstance(MemoryStore(), SessionRegistry)  # one node: nothing to share


async def test_more_settlements_than_one_atomic_batch_holds(
    nodes: tuple[ClusterStore, ClusterStore],
) -> None:
    # A session that ends with a full window releases it all at once; an
    # engine coalescing settlements settles as many. JetStream's atomic
    # batches hold 1,000 messages, and each dead letter is a record.
    a, b = nodes
    total = 1_700
    sent = [message(i) for i in range(total)]
    await append(a, *sent)
    leased: list[Lease] = []
    while claimed := (await claim(a, limit=400)).leases:
        leased += claimed
    assert len(leased) == total
    released = await b.release(
        [Release(lease.message.idem, lease.token) for lease in leased[:1_100]],
        now_ms=T0,
        policy=POLICY,
    )
    assert [r.stale for r in released] == [False] * 1_100
    dead = await b.settle(
        [Settlement(lease.message.idem, MessageState.DEAD, "x") for lease in leased[1_100:]],
        now_ms=T0,
    )
    assert dead == [True] * (total - 1_100)
    assert len(await a.list_dead(RECIPIENT, 2_000)) == total - 1_100


async def test_an_unreachable_nats_is_named() -> None:
    store = ClusterStore(["nats://127.0.0.1:9"])
    with pytest.raises(StoreError, match=r"cannot reach NATS at nats://127.0.0.1:9"):
        await store.open()


def test_store_urls_name_servers_and_options(tmp_path: pathlib.Path) -> None:
    store = open_store("nats://a:4222, tls://b:4222?replicas=3&namespace=prod", tmp_path)
    assert isinstance(store, ClusterStore)
    assert (store.names.apps, store.names.owned) == ("PROD_APPS", "PROD_OWNED")
    assert store._servers == ["nats://a:4222", "tls://b:4222"]
    assert store._replicas == 3
    assert store._serve
    assert not open_store("nats://a:4222", tmp_path, serve=False)._serve  # type: ignore[attr-defined]


def test_a_nats_store_without_nats_py_says_what_to_install(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"pip install 'ensync\[cluster\]'"):
        open_store("nats://127.0.0.1:4222", tmp_path)


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


def test_pauses_after_conflicts_are_random_and_grow_to_a_cap() -> None:
    for attempt in range(12):
        window = min(CONFLICT_PAUSE_CAP_S, CONFLICT_PAUSE_FIRST_S * 2**attempt)
        pauses = [conflict_pause_s(attempt) for _ in range(50)]
        assert all(0 <= pause <= window for pause in pauses)
        assert len(set(pauses)) > 1
    assert conflict_pause_s(40) <= CONFLICT_PAUSE_CAP_S


# --- streams: created when absent, never changed -----------------------------------


async def _stream_config(store: ClusterStore, stream: str) -> dict[str, Any]:
    info = await store.api.request(f"$JS.API.STREAM.INFO.{stream}")
    config: dict[str, Any] = info["config"]
    return config


async def test_open_never_changes_an_existing_stream_and_names_what_differs(
    tmp_path: pathlib.Path,
) -> None:
    url = f"{nats_url()}?namespace={namespace_for(tmp_path)}"
    first = open_store(url, tmp_path, serve=False)
    assert isinstance(first, ClusterStore)
    await first.open()
    try:
        names = first.names
        # A URL that asks for other replicas than the streams have is refused.
        three = open_store(url + "&replicas=3", tmp_path, serve=False)
        with pytest.raises(StreamConfigError) as refused:
            await three.open()
        assert str(refused.value).startswith(
            f"streams {names.apps}, {names.owned} have 1 replica, this store URL asks for 3:"
            " add ?replicas=1 to the store URL"
        )
        assert (await _stream_config(first, names.owned))["num_replicas"] == 1
        # An operator's limit is neither undone nor accepted silently.
        owned = await _stream_config(first, names.owned)
        await first.api.request(
            f"$JS.API.STREAM.UPDATE.{names.owned}", {**owned, "max_age": 3600 * 10**9}
        )
        again = open_store(url, tmp_path, serve=False)
        with pytest.raises(StreamConfigError) as differs:
            await again.open()
        assert f"stream {names.owned}: max_age is 3600 s, ensync needs no limit" in str(
            differs.value
        )
        assert "ensync never changes an existing stream" in str(differs.value)
        assert (await _stream_config(first, names.owned))["max_age"] == 3600 * 10**9
        # Set back, the streams are used as they are, with or without ?replicas=1.
        await first.api.request(f"$JS.API.STREAM.UPDATE.{names.owned}", owned)
        for same in (url, url + "&replicas=1"):
            store = open_store(same, tmp_path, serve=False)
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
        "streams PROD_APPS, PROD_OWNED have 3 replicas, this store URL asks for 1:"
        " add ?replicas=3 to the store URL"
    )
    assert "nats stream edit PROD_APPS --replicas 1" in message
    assert stream_problems(configs, found, 3) == ""
    assert stream_problems(configs, found, None) == ""  # no ?replicas: as they are
    one = {names.owned: {**found[names.owned], "num_replicas": 1}}
    assert stream_problems(configs, one, 3).startswith(
        "stream PROD_OWNED has 1 replica, this store URL asks for 3: add ?replicas=1"
    )
    lacking = {names.apps: {**found[names.apps], "subjects": [], "allow_atomic": False}}
    assert stream_problems(configs, lacking, None) == (
        "existing streams are not configured as ensync needs them (stream PROD_APPS:"
        " subjects lack prod.app.>; allow_atomic is false, ensync needs true). ensync never"
        " changes an existing stream: set these back with the NATS CLI (nats stream edit"
        " PROD_APPS ...), delete the streams if their data can go, or use another namespace"
        " (?namespace=NAME)"
    )
