"""The call limiter: a bound on calls in flight, the rest served in order."""

from __future__ import annotations

import asyncio

import pytest

from ensync import errors
from ensync.client.limiter import CallLimiter, LimiterStatistics


async def _hold(limiter: CallLimiter, release: asyncio.Event, order: list[int], n: int) -> None:
    async with limiter.slot():
        order.append(n)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_than_the_limit_run_and_the_rest_go_in_arrival_order() -> None:
    limiter = CallLimiter(2)
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(_hold(limiter, release, order, n)) for n in range(5)]
    await _settle()
    assert order == [0, 1]
    assert limiter.statistics() == LimiterStatistics(limit=2, in_flight=2, waiting=3)
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert limiter.statistics() == LimiterStatistics(limit=2, in_flight=0, waiting=0)


async def test_a_larger_limit_lets_waiters_in_at_once() -> None:
    limiter = CallLimiter(1)
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(_hold(limiter, release, order, n)) for n in range(4)]
    await _settle()
    assert order == [0]
    limiter.resize(3)
    await _settle()
    assert order == [0, 1, 2]
    release.set()
    await asyncio.gather(*tasks)


async def test_closing_fails_the_waiters_and_later_calls_but_not_the_running_ones() -> None:
    limiter = CallLimiter(1)
    release = asyncio.Event()
    order: list[int] = []
    running = asyncio.create_task(_hold(limiter, release, order, 0))
    waiting = asyncio.create_task(_hold(limiter, release, order, 1))
    await _settle()
    limiter.close(errors.EnSyncConnectionError("gone"))
    with pytest.raises(errors.EnSyncConnectionError, match="gone"):
        await waiting
    with pytest.raises(errors.EnSyncConnectionError, match="gone"):
        async with limiter.slot():
            pass
    release.set()
    await running
    assert order == [0]


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    limiter = CallLimiter(1)
    release = asyncio.Event()
    order: list[int] = []
    held = limiter.slot()
    await held.__aenter__()
    second = asyncio.create_task(_hold(limiter, release, order, 1))
    third = asyncio.create_task(_hold(limiter, release, order, 2))
    await _settle()
    await held.__aexit__(None, None, None)  # hands the slot to `second`...
    second.cancel()  # ...which is cancelled before it could run
    await asyncio.gather(second, return_exceptions=True)
    release.set()
    await third
    assert order == [2]
    assert limiter.statistics().in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    limiter = CallLimiter(1)
    release = asyncio.Event()
    order: list[int] = []
    first = asyncio.create_task(_hold(limiter, release, order, 0))
    second = asyncio.create_task(_hold(limiter, release, order, 1))
    await _settle()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert limiter.statistics().waiting == 0
    release.set()
    await first
    assert order == [0]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CallLimiter(0)
    with pytest.raises(ValueError, match="at least 1"):
        CallLimiter(1).resize(0)


async def test_the_fast_path_takes_free_slots_and_respects_waiters() -> None:
    limiter = CallLimiter(1)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()  # full
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    assert not waiter.done()
    limiter.release()
    await waiter  # handed over in order
    assert not limiter.try_acquire()  # still held, by the waiter
    limiter.release()
    assert limiter.try_acquire()
    limiter.release()
    assert limiter.statistics().in_flight == 0
