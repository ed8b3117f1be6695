"""Ctrl-C reaches the application's event loop, whichever thread it lands on.

Python runs signal handlers in the main thread only, between bytecodes. The
kernel may deliver a process's SIGINT to any thread that does not block it,
and the gRPC library runs threads of its own: when SIGINT lands on one of
them, the main thread, asleep in the event loop's ``select``, learns of it
only when the loop next wakes, which on an idle client is the next heartbeat
(30 s by default). ``asyncio.run``'s Ctrl-C handling sets no wakeup file
descriptor, so nothing wakes it sooner.

While an engine of the SDK is open on a loop running in the main thread, and
nothing else set one, a wakeup descriptor makes every signal wake that loop
at once; the signal's own handler then runs as usual. It is removed again
when the last such engine closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading

__all__ = ["hold", "release"]


class _Wakeup:
    """A socket pair: the write end is the wakeup descriptor, the loop reads the other."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.holders = 0

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


# Strong references: were a pair collected with its loop while still the
# wakeup descriptor, a signal would write into whatever reuses the fd number.
_held: dict[asyncio.AbstractEventLoop, _Wakeup] = {}


def hold(loop: asyncio.AbstractEventLoop) -> bool:
    """Make signals wake ``loop`` at once; True if this call holds that (`release` it).

    Nothing is done off the main thread, or when a wakeup descriptor is set
    already (``loop.add_signal_handler`` sets one, for instance).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    wakeup = _held.get(loop)
    if wakeup is None:
        try:
            current = signal.set_wakeup_fd(-1)
        except ValueError:  # not the main interpreter
            return False
        if current != -1:
            signal.set_wakeup_fd(current)  # someone wakes a loop already
            return False
        wakeup = _Wakeup()
        try:
            loop.add_reader(wakeup.reader.fileno(), wakeup.drain)
        except NotImplementedError:  # a loop without readers (Windows' proactor)
            wakeup.close()
            return False
        signal.set_wakeup_fd(wakeup.writer.fileno(), warn_on_full_buffer=False)
        _held[loop] = wakeup
    wakeup.holders += 1
    return True


def release(loop: asyncio.AbstractEventLoop) -> None:
    """Undo one `hold`; the last one removes the descriptor (if still ours)."""
    wakeup = _held.get(loop)
    if wakeup is None:
        return
    wakeup.holders -= 1
    if wakeup.holders > 0:
        return
    del _held[loop]
    if not loop.is_closed():
        loop.remove_reader(wakeup.reader.fileno())
    if threading.current_thread() is not threading.main_thread():
        # The descriptor can only be unset from the main thread: keep the
        # sockets open, or a signal would write into whatever reuses the fd.
        _orphans.append(wakeup)
        return
    current = signal.set_wakeup_fd(-1)
    if current not in (-1, wakeup.writer.fileno()):
        signal.set_wakeup_fd(current)  # set by someone else since: theirs stays
    wakeup.close()


_orphans: list[_Wakeup] = []
