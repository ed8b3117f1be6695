"""Refusals by limit or by an app's rules: counted for ``/metrics`` and
logged at most once a second per kind (:mod:`ensync.server.core.throttled`)."""

from __future__ import annotations

import logging

from ensync.server.core.errors import ServiceError
from ensync.server.core.model import Clock, EngineStats
from ensync.server.core.throttled import ThrottledLog

__all__ = ["Refusals"]


class Refusals:
    """Makes the :class:`ServiceError` of a refusal, counting and logging it."""

    def __init__(self, log: logging.Logger, clock: Clock, stats: EngineStats) -> None:
        self._stats = stats
        self._log = ThrottledLog(log, clock.now_ms, what="refused")

    def note(self, kind: str, text: str) -> None:
        """Log a refusal of ``kind`` that is counted elsewhere."""
        self._log.note(kind, text)

    def over(self, limit: str, message: str) -> ServiceError:
        """A configured limit refused the request."""
        counts = self._stats.limit_rejections
        counts[limit] = counts.get(limit, 0) + 1
        self._log.note(limit, message)
        return ServiceError.over_limit(limit, message)

    def deny(self, message: str) -> ServiceError:
        """The app's publish or subscribe rules refused the request."""
        self._stats.denied += 1
        self._log.note("denied", message)
        return ServiceError.denied(message)

    def counted(self, exc: ServiceError) -> ServiceError:
        """``exc``, counted as a limit's refusal when it is one."""
        if exc.limit is not None:
            return self.over(exc.limit, exc.message)
        return exc
