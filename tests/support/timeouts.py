"""pytest-timeout's signal method, made safe for asyncio tests.

pytest-timeout raises its failure from a SIGALRM handler, in whatever Python
code the main thread runs at that moment. When that is a step of a task in an
``asyncio.TaskGroup`` (the engine's tasks run in one), the group turns the
failure into a ``BaseExceptionGroup``. pytest's teardown catches only
``Exception`` and its own outcomes, so that group escapes it half-way: the
test's remaining fixtures are never finished, and the *next* tests are handed
the stale values (the same ``tmp_path``, hence an "app already exists" in an
unrelated test).

(In a plain callback the loop's exception handler swallows it, and the test
hangs on with its timer spent.)

So the timer fires as before, and when it lands inside a task or callback, the
failure waits a moment for the loop to be between them (where it leaves
``run_until_complete`` as a plain failure). A timeout also prints the stacks
of the loop's tasks, which say what a hung test was waiting for.

And every test has a hard deadline a while after its timeout: pytest-timeout
stops timing a test once its call has failed, so a teardown that then hangs
(a task that ignores its cancellation stalls the loop's teardown) would hang
the run for good. Past the deadline, pytest-timeout's thread method ends the
run with every thread's stack.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest
import pytest_timeout

__all__ = ["GRACE_S", "RETRIES", "RETRY_S"]

#: How long a failure that landed inside a task or callback waits before it tries again,
#: and how many times: a loop that never leaves them gets the failure anyway.
RETRY_S = 0.001
RETRIES = 5000
#: How long a test may go on after its timeout before the run is ended
#: (``ENSYNC_TEST_TIMEOUT_GRACE_S`` overrides it).
GRACE_S = 60.0

_HARD_DEADLINE = pytest.StashKey[threading.Timer]()


_HANDLE_RUN = asyncio.Handle._run.__code__  # every task step and callback runs in it


def _inside_a_handle(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code is _HANDLE_RUN:
            return True
        frame = frame.f_back
    return False


def _print_tasks() -> None:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return
    out = sys.stderr
    print(f"asyncio tasks at the timeout ({len(tasks)}):", file=out)
    for task in sorted(tasks, key=lambda t: t.get_name()):
        print(f"--- {task!r}", file=out)
        task.print_stack(limit=8, file=out)
    out.flush()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own timer
    retries = RETRIES
    printed = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal retries, printed
        __tracebackhide__ = True
        if not printed:
            printed = True
            _print_tasks()
        if _inside_a_handle(frame) and retries > 0:
            retries -= 1
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)
            return
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # read by pytest-timeout
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    grace_s = float(os.environ.get("ENSYNC_TEST_TIMEOUT_GRACE_S", GRACE_S))
    hard = threading.Timer(
        settings.timeout + grace_s, pytest_timeout.timeout_timer, (item, settings)
    )
    hard.daemon = True
    hard.start()
    item.stash[_HARD_DEADLINE] = hard
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        hard = item.stash.get(_HARD_DEADLINE, None)
        if hard is not None:
            hard.cancel()
