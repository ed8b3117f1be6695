"""A loop that runs until it is cancelled, made to stop even when an await
inside it swallowed the cancellation.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when that
result arrives in the same loop turn as a cancellation, and the cancellation
is lost (fixed in 3.12). Libraries use it (nats-py's requests do), so a
``while True`` loop that awaits them can miss its ``cancel()`` and run on:
an engine's stop then waited for its housekeeping forever. Every such loop
calls :func:`raise_if_cancelled` once a turn.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelled"]


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop.

    Example::

        while True:
            raise_if_cancelled()
            await asyncio.sleep(1)
            await store.refresh()  # may swallow a cancel on Python 3.11
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
