"""Refusals in the engine's log: each kind at most once a second.

A client with a wrong key, a denied name or a payload over the limit usually
repeats itself; the log says what happened without one line per attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["RefusalLog"]


class RefusalLog:
    """Logs refusals at WARNING, at most one per kind per ``every_ms``; the
    next line of a kind says how many were left out since.

    Example::

        refusals = RefusalLog(log, clock.now_ms)
        refusals.note("denied", "app 'shop' may not publish 'x'")
    """

    def __init__(
        self, log: logging.Logger, now_ms: Callable[[], int], *, every_ms: int = 1_000
    ) -> None:
        self._log = log
        self._now_ms = now_ms
        self._every_ms = every_ms
        # kind -> (when its last line was written, refusals left out since)
        self._kinds: dict[str, tuple[int, int]] = {}

    def note(self, kind: str, text: str) -> None:
        now = self._now_ms()
        last, skipped = self._kinds.get(kind, (None, 0))
        if last is not None and now - last < self._every_ms:
            self._kinds[kind] = (last, skipped + 1)
            return
        self._kinds[kind] = (now, 0)
        more = f" (and {skipped} more like it since the last line)" if skipped else ""
        self._log.warning("refused (%s): %s%s", kind, text, more)
