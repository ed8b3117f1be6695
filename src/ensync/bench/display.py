"""What the ``ensync bench`` programs show: a progress line on stderr, bars, tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Progress", "bar", "print_rows"]


def bar(fraction: float, width: int = 30) -> str:
    """``[#####-----]`` for a fraction in 0..1."""
    done = int(width * min(1.0, max(0.0, fraction)))
    return "[" + "#" * done + "-" * (width - done) + "]"


class Progress:
    """A status line on stderr: rewritten in place on a terminal, otherwise
    printed as a new line every few seconds."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._last = 0.0
        self._open_line = False

    def show(self, line: str, *, force: bool = False) -> None:
        """Show ``line`` as the current status (rate limited unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self._tty else 2.0):
            return
        self._last = now
        if self._tty:
            self._stream.write("\r\x1b[K" + line)
            self._open_line = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, line: str) -> None:
        """Print ``line`` for good (a phase result, a periodic sample)."""
        self.finish()
        self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the status line (a newline on a terminal)."""
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False


def print_rows(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    """A two-column table: names left-aligned, values after them."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n" if name else "\n")
