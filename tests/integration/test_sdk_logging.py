"""``enable_logging``: the SDK's records on stderr when asked, silence when not."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from ensync.testing import run_engine
from tests.support.timing import seconds

# An engine and a client in one fresh interpreter that configured no logging;
# the engine's address is unreachable after the client connected, so the
# client logs its lost connection (a warning) too.
SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from ensync import EnSyncEngine
    from ensync.testing import run_engine

    async def main(enable: bool) -> None:
        async with run_engine() as server:
            alice = await server.create_app("alice")
            engine = EnSyncEngine(
                server.grpc_url, enable_logging=enable, reconnect_interval=20,
                max_reconnect_attempts=1,
            )
            await engine.create_client(alice.app_key)
        await asyncio.sleep(0.5)  # the engine is gone: the client notices
        await engine.close()

    asyncio.run(main(sys.argv[1] == "on"))
    """
)


def run(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("mode", ["on", "off"])
def test_enable_logging_shows_the_sdk_records_and_off_means_quiet(mode: str) -> None:
    stderr = run(mode)
    if mode == "on":
        assert "INFO ensync.client.connection: connected as client" in stderr
        assert "WARNING ensync.client.connection: connection to the engine lost" in stderr
    else:
        for shown in ("connected as client", "connection to the engine lost", "ensync"):
            assert shown not in stderr, stderr


FORGETFUL = textwrap.dedent(
    """
    import asyncio, sys
    from ensync import EnSyncEngine
    from ensync.websocket import EnSyncEngine as WsEngine

    async def main(url: str, key: str, secret: str, app_id: str) -> None:
        engine = (WsEngine if url.startswith("ws") else EnSyncEngine)(url)
        client = await engine.create_client(key, app_secret_key=secret)
        sub = await client.subscribe("x")
        sub.on(lambda message: None)
        await client.publish("x", [app_id], {"a": 1})
        await asyncio.sleep(0.3)
        # ... and the program ends without close()

    asyncio.run(main(*sys.argv[1:]))
    print("exited")
    """
)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_program_that_forgets_close_exits_quietly(transport: str) -> None:
    async with run_engine() as server:
        app = await server.create_app("alice")
        url = server.grpc_url if transport == "grpc" else server.ws_url
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", FORGETFUL, url, app.app_key, app.secret_key, app.app_id],
            capture_output=True,
            text=True,
            timeout=seconds(60),
            check=False,
        )
    assert (done.returncode, done.stdout) == (0, "exited\n"), done.stderr
    assert done.stderr == ""  # no "aclose(): ... already running", no destroyed tasks
