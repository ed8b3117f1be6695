"""Engine nodes over one NATS JetStream store (``--store nats://...``): apps
managed from the command line reach every node, a message published on one
node is delivered on another, and a node's death loses nothing confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ensync import EnSyncEngine, Message
from ensync.server.store import open_store
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.testing.nats_server import nats_cluster, nats_server_binary
from ensync.testing.process import EngineProcess, dies_with_parent, running_engine
from tests.support.cli import ensync, free_port
from tests.support.nats import namespace_for, nats_url
from tests.support.timing import eventually, seconds

__all__: list[str] = []

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path: pathlib.Path) -> str:
    return f"{nats_url()}?namespace={namespace_for(tmp_path)}"


def create_app(store: str, name: str, tmp_path: pathlib.Path) -> dict[str, Any]:
    done = ensync(
        "app", "create", name, "--json", "--store", store, "--data", str(tmp_path / "cli")
    )
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)
    return created


@contextlib.asynccontextmanager
async def nodes(
    store: str, tmp_path: pathlib.Path, count: int
) -> AsyncIterator[list[EngineProcess]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_engine(tmp_path / f"node-{i}", extra_args=["--store", store])
            )
            for i in range(count)
        ]


async def test_a_message_published_on_one_node_is_delivered_on_another(
    store: str, tmp_path: pathlib.Path
) -> None:
    shop = create_app(store, "shop", tmp_path)
    warehouse = create_app(store, "warehouse", tmp_path)
    async with nodes(store, tmp_path, 2) as (a, b):
        publisher_engine = EnSyncEngine(a.grpc_url)
        publisher = await publisher_engine.create_client(shop["app_key"])
        consumer_engine = EnSyncEngine(b.grpc_url)
        consumer = await consumer_engine.create_client(
            warehouse["app_key"], app_secret_key=warehouse["secret_key"]
        )
        got: list[Message] = []
        subscription = await consumer.subscribe("orders/created")
        subscription.on(got.append)
        sent = [
            await publisher.publish("orders/created", [warehouse["app_id"]], {"i": i})
            for i in range(20)
        ]
        await eventually(lambda: len(got) == 20, what="20 deliveries on the other node")
        assert [m.idem for m in got] == sent
        assert [m.payload for m in got] == [{"i": i} for i in range(20)]
        # An app created now, beside the running nodes, can connect to either.
        late = create_app(store, "late", tmp_path)
        late_engine = EnSyncEngine(b.grpc_url)
        await late_engine.create_client(late["app_key"])
        await late_engine.close()
        listing = ensync("app", "list", "--json", "--store", store, "--data", str(tmp_path / "cli"))
        assert sorted(app["name"] for app in json.loads(listing.stdout)) == [
            "late",
            "shop",
            "warehouse",
        ]
        await publisher_engine.close()
        await consumer_engine.close()
        assert a.log_problems() == []
        assert b.log_problems() == []


async def test_a_command_with_a_one_host_url_leaves_a_clusters_replicas_alone(
    tmp_path: pathlib.Path,
) -> None:
    async with nats_cluster(tmp_path / "nats", size=3) as servers:
        cluster = ",".join(server.url for server in servers) + "?replicas=3"
        one_host = servers[0].url
        data = str(tmp_path / "cli")
        made = await asyncio.to_thread(
            ensync, "app", "create", "shop", "--json", "--store", cluster, "--data", data
        )
        assert made.returncode == 0, made.stderr
        # Without ?replicas, a command uses the streams as they are.
        listing = await asyncio.to_thread(
            ensync, "app", "list", "--json", "--store", one_host, "--data", data
        )
        assert listing.returncode == 0, listing.stderr
        assert [app["name"] for app in json.loads(listing.stdout)] == ["shop"]
        assert await replicas_of_streams(one_host) == [3] * 2
        # A node whose URL asks for other replicas is refused, and says what to write.
        refused = await asyncio.to_thread(
            ensync,
            "serve",
            "--store",
            one_host + "?replicas=1",
            "--data",
            str(tmp_path / "node"),
            "--grpc",
            f"127.0.0.1:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
        )
        assert refused.returncode == 1
        assert "Traceback" not in refused.stderr
        assert (
            "ensync: cannot serve: streams ENSYNC_APPS, ENSYNC_OWNED have 3 replicas,"
            " this store URL asks for 1: add ?replicas=3 to the store URL"
        ) in refused.stderr
        assert await replicas_of_streams(one_host) == [3] * 2


async def replicas_of_streams(url: str) -> list[int]:
    store = open_store(url, pathlib.Path("."), serve=False)
    assert isinstance(store, OwnedStore)
    await store.open()
    try:
        streams = (store.names.apps, store.names.owned)
        api = store.api
        return [
            (await api.request(f"$JS.API.STREAM.INFO.{stream}"))["config"]["num_replicas"]
            for stream in streams
        ]
    finally:
        await store.close()


def test_a_bad_store_url_is_refused_before_connecting(tmp_path: pathlib.Path) -> None:
    done = ensync(
        "app", "list", "--store", "nats://127.0.0.1:1?replicas=2", "--data", str(tmp_path)
    )
    assert done.returncode == 2
    assert "replicas must be 1, 3 or 5" in done.stderr


def test_a_nats_that_would_refuse_large_messages_is_named_at_start(
    tmp_path: pathlib.Path,
) -> None:
    # A NATS server in its default configuration takes messages up to 1 MB;
    # a 1 MB payload makes a ~2 MB record.
    port = free_port()
    with (tmp_path / "plain.log").open("wb") as log:
        plain = subprocess.Popen(
            dies_with_parent(
                [nats_server_binary(), "-js", "-sd", str(tmp_path / "js"), "-p", str(port)]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + seconds(30)
        while not _listening(port):
            assert time.monotonic() < deadline, "nats-server did not listen"
            time.sleep(0.05)
        done = ensync(
            "serve",
            "--store",
            f"nats://127.0.0.1:{port}",
            "--data",
            str(tmp_path / "node"),
            "--grpc",
            f"127.0.0.1:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
        )
        assert done.returncode == 1
        assert "set max_payload to at least 3MB" in done.stderr
    finally:
        plain.terminate()
        plain.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True
