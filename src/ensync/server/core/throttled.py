"""Log lines that a repeating cause cannot turn into a flood: each kind at
most once a second.

A client with a wrong key, a denied name or a payload over the limit usually
repeats itself, and a full disk fails every write: the log says what
happened without one line per attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Logs at ``level``, at most one line per kind per ``every_ms``; the next
    line of a kind says how many were left out since.

    Example::

        refusals = ThrottledLog(log, clock.now_ms, what="refused")
        refusals.note("denied", "app 'shop' may not publish 'x'")
        # WARNING refused (denied): app 'shop' may not publish 'x'
    """

    def __init__(
        self,
        log: logging.Logger,
        now_ms: Callable[[], int],
        *,
        what: str,
        level: int = logging.WARNING,
        every_ms: int = 1_000,
    ) -> None:
        self._log = log
        self._now_ms = now_ms
        self._what = what
        self._level = level
        self._every_ms = every_ms
        # kind -> (when its last line was written, notes left out since)
        self._kinds: dict[str, tuple[int, int]] = {}

    def note(self, kind: str, text: str) -> None:
        now = self._now_ms()
        last, skipped = self._kinds.get(kind, (None, 0))
        if last is not None and now - last < self._every_ms:
            self._kinds[kind] = (last, skipped + 1)
            return
        self._kinds[kind] = (now, 0)
        more = f" (and {skipped} more like it since the last line)" if skipped else ""
        self._log.log(self._level, "%s (%s): %s%s", self._what, kind, text, more)
