"""The bookkeeping of the SDK's batched session, apart from any link.

* `FrameBuilder` collects what the session sends (publishes, settlements,
  credits, observations) and cuts it into frames below the engine's size
  limit. No I/O, no clock.
* `PendingCalls` holds the futures of calls sent and not yet answered, by
  sequence number, with one timer for all their deadlines (calls are made in
  order, so their deadlines come in order too).

`ensync.client.session.SessionStream` drives both over a link.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from ensync import errors
from ensync._proto import ensync_pb2 as pb

__all__ = ["EAGER_FLUSH", "FrameBuilder", "PendingCalls"]

# A frame goes out as soon as it holds this many publishes.
EAGER_FLUSH = 128
# Room counted per publish beyond its own size (the frame's field tags).
_ITEM_OVERHEAD = 8


class FrameBuilder:
    """Items waiting for the next frame.

    Args:
        max_frame_bytes: the most one frame may hold (the engine's limit).
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._publishes: list[pb.SessionPublish] = []
        self._settles: list[pb.SessionSettle] = []
        self._credits: dict[str, int] = {}
        self._observes: list[pb.SessionObserve] = []

    def __bool__(self) -> bool:
        return bool(self._publishes or self._settles or self._credits or self._observes)

    def publish(self, item: pb.SessionPublish) -> bool:
        """Add a publish; ``True`` once there are enough to send a frame now."""
        self._publishes.append(item)
        return len(self._publishes) >= EAGER_FLUSH

    def settle(self, item: pb.SessionSettle) -> None:
        """Add a settlement."""
        self._settles.append(item)

    def credit(self, name: str, count: int) -> None:
        """Let the engine send ``count`` more deliveries of ``name``."""
        self._credits[name] = self._credits.get(name, 0) + count

    def observe(self, item: pb.SessionObserve) -> None:
        """Add an observe (or stop observing)."""
        self._observes.append(item)

    def frames(self) -> list[pb.ClientFrame]:
        """Everything waiting, as frames in order; empties the builder.

        Settlements, credits and observations go in the first frame; the
        publishes follow, as many per frame as fit below the size limit (a
        publish larger than that goes alone).
        """
        if not self:
            return []
        frame = pb.ClientFrame(
            settles=self._settles,
            credits=[pb.SessionCredit(message_name=n, credit=c) for n, c in self._credits.items()],
            observes=self._observes,
        )
        self._settles, self._credits, self._observes = [], {}, []
        frames = [frame]
        budget = self.max_frame_bytes - frame.ByteSize()
        for item in self._publishes:
            size = item.ByteSize() + _ITEM_OVERHEAD
            if size > budget and (frame.publishes or frame.settles or frame.credits):
                frame = pb.ClientFrame()
                frames.append(frame)
                budget = self.max_frame_bytes
            frame.publishes.append(item)
            budget -= size
        self._publishes = []
        return frames


class PendingCalls:
    """Calls sent and awaiting the engine's answer.

    Args:
        timeout_s: how long a call may wait for its answer once made.
        stalled: called when a call's deadline passed (the link is stalled).
    """

    def __init__(self, timeout_s: float, stalled: Callable[[BaseException], None]) -> None:
        self.timeout_s = timeout_s
        self._stalled = stalled
        self._seqs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._deadlines: deque[tuple[float, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Why the session broke, once it has: later calls fail with it.
        self.broken: BaseException | None = None
        self._closed = False

    def next_seq(self) -> int:
        """The sequence number of a new call."""
        return next(self._seqs)

    def expect(self, seq: int) -> asyncio.Future[Any]:
        """The future of the answer to call ``seq`` (made just now).

        Raises:
            EnSyncConnectionError: the session is broken.
        """
        if self.broken is not None:
            raise errors.EnSyncConnectionError(f"the session is broken: {self.broken}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[seq] = future
        self._deadlines.append((loop.time() + self.timeout_s, seq))
        if self._timer is None and not self._closed:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)
        return future

    def forget(self, seq: int) -> None:
        """Call ``seq`` is over (answered, failed, or its caller gave up)."""
        self._waiting.pop(seq, None)

    def resolve(self, seq: int, result: Any) -> None:
        """The engine answered call ``seq``."""
        future = self._waiting.get(seq)
        if future is not None and not future.done():
            future.set_result(result)

    def fail_all(self, cause: BaseException) -> None:
        """Every call waiting fails with ``cause``."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(cause)
                future.exception()  # retrieved: its caller may be gone

    def close(self, cause: BaseException) -> None:
        """Stop the deadlines; every call waiting, and every later one, fails with ``cause``."""
        self._closed = True
        if self.broken is None:
            self.broken = cause
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fail_all(cause)

    def _expire(self) -> None:
        """Calls past their deadline fail; one of them means a stalled link."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late: BaseException | None = None
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq = self._deadlines.popleft()
            future = self._waiting.get(seq)
            if future is not None and not future.done():
                late = errors.EnSyncTimeoutError(
                    f"the engine did not answer in {self.timeout_s:g} s"
                )
                future.set_exception(late)
        # Answered calls leave their deadline behind: skip them.
        while self._deadlines and self._deadlines[0][1] not in self._waiting:
            self._deadlines.popleft()
        if self._deadlines and not self._closed:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)
        if late is not None:
            self._stalled(late)
