from __future__ import annotations

import asyncio

import pytest

from ensync.client.events import EventEmitter


async def test_sync_and_async_listeners_and_removal() -> None:
    emitter = EventEmitter()
    seen: list[object] = []
    done = asyncio.Event()

    async def later(value: object) -> None:
        seen.append(("async", value))
        done.set()

    remove = emitter.on("error", lambda value: seen.append(("sync", value)))
    emitter.on("error", later)
    emitter.emit("error", 1)
    await asyncio.wait_for(done.wait(), 1)
    assert seen == [("sync", 1), ("async", 1)]
    remove()
    remove()  # twice is harmless
    done.clear()
    emitter.emit("error", 2)
    await asyncio.wait_for(done.wait(), 1)
    assert seen[-1] == ("async", 2)
    assert ("sync", 2) not in seen


def test_a_failing_listener_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    emitter = EventEmitter()
    seen: list[int] = []

    def broken(value: int) -> None:
        raise RuntimeError("listener bug")

    emitter.on("disconnect", broken)
    emitter.on("disconnect", seen.append)
    emitter.emit("disconnect", 7)
    assert seen == [7]
    assert "listener bug" in caplog.text


def test_unknown_event() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        EventEmitter().on("connect", print)  # type: ignore[arg-type]
