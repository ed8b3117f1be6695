"""Signals wake the loop while an engine holds the wakeup descriptor, and only then."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from ensync.client import wakeup


@pytest.fixture(autouse=True)
def no_descriptor() -> Iterator[None]:
    """Each test starts with no wakeup descriptor; whatever was set comes back."""
    before = signal.set_wakeup_fd(-1)
    try:
        yield
    finally:
        signal.set_wakeup_fd(before)


def _current_fd() -> int:
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    return current


async def test_held_while_an_engine_needs_it_and_given_back_by_the_last() -> None:
    loop = asyncio.get_running_loop()
    assert _current_fd() == -1
    assert wakeup.hold(loop)
    assert wakeup.hold(loop)  # a second engine on the same loop
    held = _current_fd()
    assert held != -1
    wakeup.release(loop)
    assert _current_fd() == held
    wakeup.release(loop)
    assert _current_fd() == -1


async def test_a_descriptor_set_by_someone_else_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    theirs, other_end = socket.socketpair()
    theirs.setblocking(False)
    try:
        signal.set_wakeup_fd(theirs.fileno())
        assert not wakeup.hold(loop)
        assert _current_fd() == theirs.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        theirs.close()
        other_end.close()


async def test_a_descriptor_set_after_ours_stays_when_ours_goes() -> None:
    loop = asyncio.get_running_loop()
    assert wakeup.hold(loop)
    theirs, other_end = socket.socketpair()
    theirs.setblocking(False)
    try:
        signal.set_wakeup_fd(theirs.fileno())  # as loop.add_signal_handler would
        wakeup.release(loop)
        assert _current_fd() == theirs.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        theirs.close()
        other_end.close()


def test_nothing_is_held_off_the_main_thread() -> None:
    result: list[bool] = []

    async def in_a_thread() -> None:
        result.append(wakeup.hold(asyncio.get_running_loop()))

    thread = threading.Thread(target=lambda: asyncio.run(in_a_thread()))
    thread.start()
    thread.join(10)
    assert result == [False]
    assert _current_fd() == -1
