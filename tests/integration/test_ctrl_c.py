"""Ctrl-C stops an SDK application at once, whichever of its threads the kernel picks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import pytest

from ensync.testing import TestServer, run_engine
from ensync.testing.process import dies_with_parent
from tests.support.timing import seconds

# An application idle in `async for` (its loop asleep until the next
# heartbeat, 30 s away), on the standard `asyncio.run` Ctrl-C handling. The
# SIGINT is sent to another of its threads, as the kernel may do with a
# process's signal (the gRPC library's threads are candidates too).
_IDLE_CONSUMER = textwrap.dedent(
    """
    import asyncio, contextlib, os, signal, sys, threading, time
    from ensync import EnSyncEngine
    from ensync.websocket import EnSyncEngine as WebSocketEngine

    async def main() -> None:
        url = os.environ["URL"]
        engine = (WebSocketEngine if url.startswith("ws") else EnSyncEngine)(url)
        try:
            client = await engine.create_client(os.environ["APP_KEY"])
            sub = await client.subscribe("orders/created", app_secret_key=os.environ["SECRET"])
            bystander = threading.Thread(target=time.sleep, args=(60,), daemon=True)
            bystander.start()
            asyncio.get_running_loop().call_later(
                0.3, signal.pthread_kill, bystander.ident, signal.SIGINT
            )
            print("idle", flush=True)
            async for message in sub:
                print("unexpected", message.idem)
        finally:
            await engine.close()
            print("closed", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    """
)


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with run_engine() as running:
        yield running


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_sigint_on_another_thread_stops_the_application_at_once(
    server: TestServer, transport: str
) -> None:
    app = await server.create_app("consumer")
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run,
        dies_with_parent([sys.executable, "-c", _IDLE_CONSUMER]),
        env={
            **os.environ,
            "URL": server.grpc_url if transport == "grpc" else server.ws_url,
            "APP_KEY": app.app_key,
            "SECRET": app.secret_key,
        },
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["idle", "closed"]
    # Without a wakeup, the loop would notice at its next heartbeat (30 s).
    assert elapsed < seconds(10)
