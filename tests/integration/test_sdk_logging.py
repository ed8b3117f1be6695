"""``enable_logging``: the SDK's records on stderr when asked, silence when not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
