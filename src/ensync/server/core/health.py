"""Whether the store takes writes, as the engine last saw it.

A full disk or a lost NATS cluster fails every write until it comes back.
Clients hear "retry later" each time; the operator hears it once a second
per kind of operation, with a count, sees it on ``/healthz`` (not "ok"
while the store fails) and in ``/metrics``; and the log says when writes
work again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ensync.protocol.errors import STORE_UNAVAILABLE
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.throttled import ThrottledLog
from ensync.server.store.base import StoreError

__all__ = ["StoreHealth"]


class StoreHealth:
    """Store failures seen by the engine, and whether the last write failed.

    Attributes:
        failures: failures per kind of operation since start (``/metrics``).
        failing_since_ms: when writes started failing; ``None`` while the
            last write worked.
        last_error: what the store said last time it failed.
    """

    def __init__(self, log: logging.Logger, now_ms: Callable[[], int]) -> None:
        self._log = log
        self._now_ms = now_ms
        self._lines = ThrottledLog(log, now_ms, what="store failed", level=logging.ERROR)
        self.failures: dict[str, int] = {}
        self.failing_since_ms: int | None = None
        self.last_error = ""

    def failed(
        self, kind: str, exc: StoreError, *, count: int = 1, write: bool = True
    ) -> ServiceError:
        """Note ``count`` operations of ``kind`` the store failed; returns what
        their clients hear. A failed read (``write=False``) is counted and
        logged, but does not mark the store failing: only writes say whether
        it takes work."""
        self.failures[kind] = self.failures.get(kind, 0) + count
        if write and self.failing_since_ms is None:
            self.failing_since_ms = self._now_ms()
        self.last_error = str(exc)
        self._lines.note(kind, self.last_error)
        return ServiceError(ErrorCode.UNAVAILABLE, STORE_UNAVAILABLE)

    def worked(self) -> None:
        """A write went through: the store is healthy again if it was not."""
        if self.failing_since_ms is not None:
            failed_ms = self._now_ms() - self.failing_since_ms
            self.failing_since_ms = None
            self._log.warning("the store takes writes again (after %d ms of failures)", failed_ms)
