"""Keeping messages leased while they wait for, or are in, a handler.

The engine delivers a message again when its ack deadline passes without a
settlement. A subscription holds messages for two reasons that may outlast
the deadline: they wait behind a slow handler, or a slow handler has them.
A `LeaseKeeper` extends every message it holds a third of the
deadline after it was last leased, with one task for all of them, until the
subscription lets go (settled, given back, or dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ensync import errors
from ensync._tasks import raise_if_cancelled
from ensync.client.tasks import TaskOwner

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)

Extend = Callable[[str], Awaitable[object]]


class LeaseKeeper:
    """Extends the leases of the idems it holds, in batches.

    Args:
        deadline_ms: the engine's ack deadline.
        extend: extends one message's lease (raises `EnSyncError` on
            refusal or when the link is down).
        now: a monotonic clock in seconds (the loop's, by default).

    For example:

        keeper = LeaseKeeper(30_000, lambda idem: transport.extend(name, idem))
        keeper.hold(message.idem)
        ...
        keeper.drop(message.idem)
        await keeper.close()
    """

    def __init__(
        self, deadline_ms: int, extend: Extend, now: Callable[[], float] | None = None
    ) -> None:
        # A third of the deadline leaves two chances before it passes.
        self.interval_s = max(deadline_ms / 3000, 0.05)
        self._extend = extend
        self._now = now or asyncio.get_running_loop().time
        self._leased_at: dict[str, float] = {}
        # The one task extending leases, while there are any to extend.
        self._tasks = TaskOwner()
        self.extended = 0

    def hold(self, idem: str) -> None:
        """Keep ``idem`` leased from now on (it was just delivered)."""
        self._leased_at[idem] = self._now()
        if not self._tasks and not self._tasks.closed:
            self._tasks.start(self._run(), name="ensync-lease-keeper")

    def drop(self, idem: str) -> None:
        """Stop extending ``idem`` (settled, given back, or no longer ours)."""
        self._leased_at.pop(idem, None)

    def __contains__(self, idem: str) -> bool:
        return idem in self._leased_at

    def __len__(self) -> int:
        return len(self._leased_at)

    async def close(self) -> None:
        """Stop extending anything; idempotent."""
        self._leased_at.clear()
        await self._tasks.close()

    def due(self) -> list[str]:
        """Idems whose last lease is an interval old or older."""
        now = self._now()
        return [idem for idem, at in self._leased_at.items() if now - at >= self.interval_s]

    async def extend_due(self) -> None:
        """Extend every due lease once, concurrently.

        A refused one is let go (the engine no longer counts it as ours).
        """
        due = self.due()
        if not due:
            return
        now = self._now()
        outcomes = await asyncio.gather(*(self._extend(i) for i in due), return_exceptions=True)
        for idem, outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            if idem not in self._leased_at:
                continue  # dropped while we waited
            if isinstance(outcome, errors.EnSyncConnectionError):
                continue  # the link is down: try again next round
            if isinstance(outcome, Exception):
                log.debug("could not extend the lease of %s: %s", idem, outcome)
                self._leased_at.pop(idem, None)
                continue
            self._leased_at[idem] = now
            self.extended += 1

    async def _run(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.interval_s)
            await self.extend_due()
