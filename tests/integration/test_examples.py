"""The scripts of examples/ run as a new user would run them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ensync.testing import TestServer, run_engine
from ensync.testing.process import dies_with_parent
from tests.support.timing import seconds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with run_engine() as running:
        yield running


def environment(server: TestServer, **values: str) -> dict[str, str]:
    return {**os.environ, "ENSYNC_URL": server.grpc_url, **values}


def _signal_state(pid: int) -> str:
    """Each thread's signal masks (/proc), to tell a lost Ctrl-C from a stuck close."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = (task / "status").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        masks = [
            line.replace("\t", " ")
            for line in status.splitlines()
            if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))
        ]
        lines.append(f"{task.name} {name}: {'; '.join(masks)}")
    return "\n".join(lines)


async def line_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    raw = await asyncio.wait_for(process.stdout.readline(), seconds(30))
    return raw.decode().rstrip("\n")


async def test_the_quickstart_subscriber_prints_what_the_publisher_sends(
    server: TestServer,
) -> None:
    warehouse = await server.create_app("warehouse")
    shop = await server.create_app("shop")
    subscriber = await asyncio.create_subprocess_exec(
        *dies_with_parent([sys.executable, str(EXAMPLES / "subscriber.py")]),  # runs until Ctrl-C
        env=environment(
            server,
            ENSYNC_APP_KEY=warehouse.app_key,
            ENSYNC_SECRET_KEY=warehouse.secret_key,
            # SIGABRT then prints every thread's stack: where it hangs, if it does.
            PYTHONFAULTHANDLER="1",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await line_of(subscriber) == "waiting for messages; Ctrl-C stops"
        sent = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(EXAMPLES / "publisher.py")],
            env=environment(server, ENSYNC_APP_KEY=shop.app_key, ENSYNC_TO=warehouse.app_id),
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        assert re.fullmatch(r"sent [0-9A-Z]{26}\n", sent.stdout), sent.stdout
        assert await line_of(subscriber) == (
            f"orders/status/updated from {shop.app_id}: {{'orderId': 'o-1', 'status': 'shipped'}}"
        )
        subscriber.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            returned = await asyncio.wait_for(subscriber.wait(), seconds(30))
        except TimeoutError:
            signals = _signal_state(subscriber.pid)
            subscriber.send_signal(signal.SIGABRT)
            assert subscriber.stderr is not None
            stacks = await asyncio.wait_for(subscriber.stderr.read(), seconds(10))
            raise AssertionError(
                f"the subscriber did not stop on Ctrl-C:\n{signals}\n"
                + stacks.decode(errors="replace")
            ) from None
        assert returned == 0
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()


async def test_the_tour_runs_every_verb(server: TestServer) -> None:
    app = await server.create_app("shop")
    toured = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(EXAMPLES / "tour.py")],
        # The two keys `ensync app create` prints are all it needs.
        env=environment(server, ENSYNC_APP_KEY=app.app_key, ENSYNC_SECRET_KEY=app.secret_key),
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
    assert toured.returncode == 0, toured.stderr
    assert toured.stdout.splitlines() == [
        "handled {'orderId': 'o-1', 'status': 'shipped'} from shop",
        "replayed {'task': 'pack o-1'} acknowledged: False",
    ]
    (dead,) = await server.engine.store.list_dead(app.app_id, 10)
    assert dead.dead_reason == "discarded: cannot pack"


def test_the_tests_above_run_every_example() -> None:
    # The README and the docs site show these files as they are
    # (tests/docs/test_code_blocks.py counts them as run because of this).
    assert {path.name for path in EXAMPLES.glob("*.py")} == {
        "publisher.py",
        "subscriber.py",
        "tour.py",
    }
