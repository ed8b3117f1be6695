"""The task owner: close cancels and awaits every task, and no task starts after it."""

from __future__ import annotations

import asyncio

import pytest

from ensync.client.tasks import TaskOwner

__all__: list[str] = []


async def test_close_cancels_and_awaits_every_task() -> None:
    owner = TaskOwner()
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup that takes a loop turn
            cancelled.append(name)
            raise

    tasks = [owner.start(forever(name), name=name) for name in ("a", "b")]
    await asyncio.sleep(0)
    assert len(owner) == 2
    await owner.close()
    assert sorted(cancelled) == ["a", "b"]
    assert all(task is not None and task.done() for task in tasks)
    assert len(owner) == 0


async def test_nothing_starts_after_close() -> None:
    owner = TaskOwner()
    await owner.close()
    ran: list[int] = []

    async def work() -> None:
        ran.append(1)

    assert owner.start(work(), name="late") is None  # closed, never run: no warning
    await asyncio.sleep(0)
    assert ran == []
    assert owner.closed


async def test_a_task_closing_its_own_owner_is_left_to_finish() -> None:
    owner = TaskOwner()
    other = owner.start(asyncio.Event().wait(), name="other")
    finished = asyncio.Event()

    async def closer() -> None:
        await owner.close()
        finished.set()

    owner.start(closer(), name="closer")
    await asyncio.wait_for(finished.wait(), 5)
    assert other is not None
    assert other.cancelled()


async def test_a_failed_task_is_logged_not_left_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = TaskOwner()

    async def broken() -> None:
        raise RuntimeError("a bug")

    task = owner.start(broken(), name="broken")
    assert task is not None
    await asyncio.wait([task])
    await asyncio.sleep(0)  # the done callback
    assert "task broken failed" in caplog.text
    assert "a bug" in caplog.text
    await owner.close()


async def test_wait_lets_tasks_finish_without_cancelling() -> None:
    owner = TaskOwner()
    gate = asyncio.Event()
    slow = owner.start(gate.wait(), name="slow")
    await owner.wait(0.01)
    assert slow is not None
    assert not slow.done()
    gate.set()
    await owner.wait(5)
    assert slow.done()
    assert not slow.cancelled()
    await owner.close()
