"""``ensync tail``, ``ensync replay`` and ``ensync dlq redrive`` against a
serving engine, run as real processes."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ensync import EnSyncClient, EnSyncEngine, Message
from ensync.testing.process import dies_with_parent
from tests.support.cli import Serving, ensync, serve
from tests.support.timing import eventually, seconds


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[Serving]:
    async with serve(tmp_path) as running:
        yield running


def create(serving: Serving, name: str) -> dict[str, str]:
    created = ensync("app", "create", name, "--data", str(serving.data), "--json")
    assert created.returncode == 0, created.stderr
    app: dict[str, str] = json.loads(created.stdout)
    return app


def keys(serving: Serving, app: dict[str, str]) -> dict[str, str]:
    return {
        "ENSYNC_URL": serving.url,
        "ENSYNC_APP_KEY": app["app_key"],
        "ENSYNC_SECRET_KEY": app["secret_key"],
    }


@pytest.fixture
async def engine(serving: Serving) -> AsyncIterator[EnSyncEngine]:
    running = EnSyncEngine(serving.url)
    try:
        yield running
    finally:
        await running.close()


async def consumer(engine: EnSyncEngine, app: dict[str, str]) -> EnSyncClient:
    return await engine.create_client(app["app_key"], app_secret_key=app["secret_key"])


async def test_tail_prints_new_messages_and_takes_none(
    serving: Serving, engine: EnSyncEngine
) -> None:
    shop, warehouse = create(serving, "shop"), create(serving, "warehouse")
    sender = await engine.create_client(shop["app_key"])
    receiver = await consumer(engine, warehouse)
    got: list[Message] = []
    (await receiver.subscribe("orders/created")).on(got.append)
    tail = await asyncio.create_subprocess_exec(
        *dies_with_parent(
            [sys.executable, "-m", "ensync.cli.main", "tail", "orders/*", "--json", "--count", "2"]
        ),
        env={**os.environ, **keys(serving, warehouse)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tail.stderr is not None
    started = await asyncio.wait_for(tail.stderr.readline(), seconds(30))
    assert started.decode() == "watching 'orders/*'; Ctrl-C stops\n"
    first = await sender.publish("orders/created", [warehouse["app_id"]], {"id": 1})
    await sender.publish("billing/paid", [warehouse["app_id"]], {"id": 2})
    await sender.publish("orders/shipped", [warehouse["app_id"]], {"id": 3})
    out, err = await asyncio.wait_for(tail.communicate(), seconds(30))
    assert tail.returncode == 0, err
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.decode().splitlines()]
    assert [(line["name"], line["payload"]) for line in lines] == [
        ("orders/created", {"id": 1}),
        ("orders/shipped", {"id": 3}),
    ]
    assert lines[0]["idem"] == first
    assert lines[0]["sender"] == shop["app_id"]
    # The real consumer got and acked its message, first time: tail took nothing.
    await eventually(lambda: len(got) == 1)
    assert got[0].attempt == 1
    # For a terminal: one readable line per message.
    text = await asyncio.create_subprocess_exec(
        *dies_with_parent([sys.executable, "-m", "ensync.cli.main", "tail", "#", "--count", "1"]),
        env={**os.environ, **keys(serving, warehouse)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert text.stderr is not None
    await asyncio.wait_for(text.stderr.readline(), seconds(30))
    idem = await sender.publish("billing/paid", [warehouse["app_id"]], {"id": 4})
    out, _ = await asyncio.wait_for(text.communicate(), seconds(30))
    assert f"  billing/paid  {idem}  from " in out.decode()
    assert out.decode().rstrip().endswith('{"id": 4}')


def test_tail_says_it_sees_one_node_of_a_cluster() -> None:
    shown = " ".join(ensync("tail", "--help").stdout.split())
    assert "only the messages published through the node it is connected to" in shown


def test_tail_and_replay_name_what_is_missing(serving: Serving) -> None:
    warehouse = create(serving, "warehouse")
    env = {"ENSYNC_URL": serving.url, "ENSYNC_APP_KEY": warehouse["app_key"]}
    no_secret = ensync("tail", "#", env={**env, "ENSYNC_SECRET_KEY": ""})
    assert (no_secret.returncode, "ENSYNC_SECRET_KEY" in no_secret.stderr) == (2, True)
    bad = ensync("tail", "orders/#/x", env=keys(serving, warehouse))
    assert bad.returncode == 1
    assert "'#' may only be the last segment" in bad.stderr
    unknown = ensync("replay", "nope", env=keys(serving, warehouse))
    assert unknown.returncode == 1
    assert "EnSyncReplayError" in unknown.stderr


async def test_replay_prints_a_message_again(serving: Serving, engine: EnSyncEngine) -> None:
    shop, warehouse = create(serving, "shop"), create(serving, "warehouse")
    sender = await engine.create_client(shop["app_key"])
    receiver = await consumer(engine, warehouse)
    got: list[Message] = []
    (await receiver.subscribe("orders/created")).on(got.append)
    before_ms = int(time.time() * 1000)
    idem = await sender.publish(
        "orders/created", [warehouse["app_id"]], {"id": 7}, {"headers": {"source": "shop"}}
    )
    after_ms = int(time.time() * 1000)
    await eventually(lambda: len(got) == 1)
    env = keys(serving, warehouse)
    await eventually(
        lambda: json.loads(ensync("replay", idem, "--json", env=env).stdout)["was_acknowledged"]
    )
    shown = json.loads(ensync("replay", idem, "--json", env=env).stdout)
    assert (shown["idem"], shown["name"], shown["payload"]) == (idem, "orders/created", {"id": 7})
    assert shown["headers"]["source"] == "shop"
    assert before_ms <= shown["timestamp"] <= after_ms  # when it was published
    text = ensync("replay", idem, env=env)
    assert 'payload:          {"id": 7}' in text.stdout
    logged = datetime.datetime.fromtimestamp(shown["timestamp"] / 1000)
    assert f"timestamp:        {logged:%Y-%m-%d %H:%M:%S}." in text.stdout
    sealed = json.loads(
        ensync("replay", idem, "--json", env={**env, "ENSYNC_SECRET_KEY": ""}).stdout
    )
    assert "payload" not in sealed  # without the secret key: metadata only
    assert sealed["envelope_bytes"] > 0
    assert sealed["metadata"]["headers"]["source"] == "shop"
    assert sealed["timestamp"] == shown["timestamp"]
    # A replay delivers nothing again.
    await asyncio.sleep(0.3)
    assert len(got) == 1


async def test_dlq_redrive_delivers_dead_letters_again_through_the_running_engine(
    serving: Serving, engine: EnSyncEngine
) -> None:
    data = str(serving.data)
    shop, warehouse = create(serving, "shop"), create(serving, "warehouse")
    sender = await engine.create_client(shop["app_key"])
    receiver = await consumer(engine, warehouse)
    for name in ("orders/created", "orders/created", "billing/paid"):
        await sender.publish(name, [warehouse["app_id"]], {"name": name})
    for name in ("orders/created", "billing/paid"):
        sub = await receiver.subscribe(name, auto_ack=False)
        count = 2 if name == "orders/created" else 1
        async for message in sub:
            await sub.discard(message.idem, "not yet")
            count -= 1
            if count == 0:
                break
        await sub.unsubscribe()
    again: list[Message] = []
    (await receiver.subscribe("orders/created")).on(again.append)

    redriven = await asyncio.to_thread(
        ensync,
        *("dlq", "redrive", "--app", "warehouse", "--name", "orders/*", "--rate", "50"),
        *("--data", data),
    )
    assert redriven.returncode == 0, redriven.stderr
    assert redriven.stdout == "redrove 2 dead letters\n"
    assert "redriving [" in redriven.stderr
    assert "2/2" in redriven.stderr
    # The running engine delivers them again, as first deliveries.
    await eventually(lambda: len(again) == 2, timeout_s=10)
    assert sorted(m.payload["name"] for m in again) == ["orders/created"] * 2
    assert all(m.attempt == 1 for m in again)
    left = ensync("dlq", "list", "--json", "--data", data)
    assert [json.loads(line)["name"] for line in left.stdout.splitlines()] == ["billing/paid"]
    none = ensync("dlq", "redrive", "--name", "orders/created", "--data", data)
    assert (none.returncode, none.stdout) == (0, "no dead letters to redrive\n")
    for args, complaint in (
        (("--rate", "0"), "--rate must be above 0"),
        (("--name", "a/#/b"), "--name"),
        (("--app", "ghost"), "no app named 'ghost'"),
    ):
        refused = ensync("dlq", "redrive", *args, "--data", data)
        assert refused.returncode in (1, 2)
        assert complaint in refused.stderr
