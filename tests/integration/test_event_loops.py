"""The engine, its command line and the SDK on uvloop, and on the standard loop."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import pytest
import uvloop

from ensync import EnSyncEngine, Message
from ensync._loop import loop_factory, loop_name
from ensync.testing import run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.cli import free_port, start_serve
from tests.support.timing import seconds


def test_ensync_runs_on_the_standard_loop_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ENSYNC_LOOP", raising=False)
    assert (loop_factory(), loop_name()) == (None, "asyncio")
    monkeypatch.setenv("ENSYNC_LOOP", "uvloop")
    assert (loop_factory(), loop_name()) == (uvloop.new_event_loop, "uvloop")


def _first(future: asyncio.Future[Message], message: Message) -> None:
    if not future.done():
        future.set_result(message)


async def _round_trips() -> list[str]:
    """A message through the engine on each transport; the loop's type."""
    seen = [type(asyncio.get_running_loop()).__module__.partition(".")[0]]
    async with run_engine() as server:
        app = await server.create_app("loops")
        for engine in (EnSyncEngine(server.grpc_url), WsEngine(server.ws_url)):
            try:
                client = await engine.create_client(app.app_key, app_secret_key=app.secret_key)
                got: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
                (await client.subscribe("loops/x")).on(functools.partial(_first, got))
                await client.publish("loops/x", [app.app_id], {"on": seen[0]})
                seen.append(str((await asyncio.wait_for(got, seconds(5))).payload["on"]))
            finally:
                await engine.close()
    return seen


@pytest.mark.parametrize("factory", [uvloop.new_event_loop, None], ids=["uvloop", "asyncio"])
def test_the_engine_and_the_sdk_on_either_loop(factory: object) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        seen = runner.run(_round_trips())
    expected = "uvloop" if factory is not None else "asyncio"
    assert seen == [expected] * 3


async def test_ensync_serve_says_which_loop_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENSYNC_LOOP", "uvloop")  # the child inherits it
    process = await start_serve(tmp_path / "data", free_port(), free_port())
    try:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), seconds(30))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "loop: uvloop" in err.decode()
