"""``ensync dev-cluster``: NATS servers and engine nodes that work together,
that all stop on Ctrl-C, and that die with it when it is killed hard."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ensync import EnSyncEngine, Message
from tests.support.processes import alive, descendants
from tests.support.timing import eventually, seconds

__all__: list[str] = []

pytestmark = [pytest.mark.slow, pytest.mark.timeout(seconds(180))]


async def test_dev_cluster_serves_apps_on_every_node_and_stops_on_ctrl_c() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ensync.cli.main",
        "dev-cluster",
        "--nodes",
        "2",
        "--nats",
        "3",
        "--app",
        "shop",
        "--app",
        "warehouse",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), seconds(120))
        info = json.loads(line)
        assert len(info["nats"]) == 3
        assert info["store"].endswith("?replicas=3")
        shop, warehouse = info["apps"]
        engine = EnSyncEngine(info["grpc"])
        try:
            publisher = await engine.create_client(shop["app_key"])
            consumer = await engine.create_client(
                warehouse["app_key"], app_secret_key=warehouse["secret_key"]
            )
            got: list[Message] = []
            (await consumer.subscribe("orders/created")).on(got.append)
            await publisher.publish("orders/created", [warehouse["app_id"]], {"id": 7})
            await eventually(lambda: [m.payload for m in got] == [{"id": 7}])
        finally:
            await engine.close()
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), seconds(60)) == 0
        assert not await asyncio.to_thread(os.path.exists, info["directory"])  # removed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_dev_cluster_killed_hard_takes_its_children_along(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "ensync.cli.main", "dev-cluster", "--nodes", "2", "--nats", "3", "--json"),
        *("--dir", str(tmp_path / "cluster")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    children: set[int] = set()
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), seconds(120))  # all running
        children = await asyncio.to_thread(descendants, process.pid)
        assert len(children) == 5  # 3 NATS servers, 2 engine nodes
        process.kill()  # as a test timing out does: no chance to stop anything
        await process.wait()
        await eventually(
            lambda: not any(alive(pid) for pid in children),
            timeout_s=5,
            what="the children of a killed dev-cluster to die",
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in children:  # this test fails without leaving them behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_dev_cluster_refuses_bad_sizes() -> None:
    for args in (["--nodes", "0"], ["--nats", "2"]):
        done = subprocess.run(
            [sys.executable, "-m", "ensync.cli.main", "dev-cluster", *args],
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
        assert done.returncode == 2, args
