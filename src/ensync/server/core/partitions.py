"""Per-partition delivery state: block numbering, commit order, the ready buffer.

A partition is (recipient app id, message name). Its messages live in the
store; memory holds only a bounded window of them:

* ``ready`` — first deliveries, in block order, read ahead from the store
  (at most ``buffer_high_watermark``);
* ``retry`` — messages that came back (deadline passed, client gone,
  deferral over), delivered before ``ready``: redeliveries may overtake.

Invariant while the partition has subscribers: every pending, visible
message with ``block <= cursor`` is in ``ready``, in ``retry``, in flight, or
waiting on a timer; every one with ``block > cursor`` is found by the next
store read. ``caught_up`` means the store holds nothing beyond ``cursor``
yet, so a newly committed message can be appended to ``ready`` directly
without a read.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ensync.server.core.sessions import Subscription
from ensync.server.store.base import StoredMessage

__all__ = ["Partition"]


@dataclass(eq=False, slots=True)
class Partition:
    """Delivery state of one (recipient, name) partition."""

    recipient: str
    name: str
    last_block: int = 0
    blocks_loaded: bool = False
    # Blocks allocated but not yet released, in allocation (= block) order.
    # A value of None means "still committing"; False means "commit failed".
    committing: OrderedDict[int, StoredMessage | bool | None] = field(default_factory=OrderedDict)
    subscribers: list[Subscription] = field(default_factory=list)
    next_subscriber: int = 0
    ready: deque[StoredMessage] = field(default_factory=deque)
    retry: deque[StoredMessage] = field(default_factory=deque)
    cursor: int = 0
    caught_up: bool = False
    fetching: bool = False
    dirty: bool = False
    # Bumped when the partition loses its last subscriber, so that a store
    # read started before that cannot refill the cleared buffers.
    epoch: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.recipient, self.name)

    def allocate(self) -> int:
        """The next block, held in commit order until :meth:`committed`."""
        self.last_block += 1
        self.committing[self.last_block] = None
        return self.last_block

    def committed(self, block: int, message: StoredMessage | None) -> list[StoredMessage]:
        """Record the outcome of a commit (``None``: it failed) and return the
        messages that may now be released, in block order."""
        self.committing[block] = message if message is not None else False
        released: list[StoredMessage] = []
        while self.committing:
            first_block, outcome = next(iter(self.committing.items()))
            if outcome is None:
                break
            del self.committing[first_block]
            if isinstance(outcome, StoredMessage):
                released.append(outcome)
        return released

    def deactivate(self) -> list[StoredMessage]:
        """Forget the in-memory window (no subscriber is left); returns what was buffered."""
        dropped = [*self.ready, *self.retry]
        self.ready.clear()
        self.retry.clear()
        self.cursor = 0
        self.caught_up = False
        self.dirty = False
        self.fetching = False
        self.next_subscriber = 0
        self.epoch += 1
        return dropped

    def pick_subscriber(self, window: int) -> Subscription | None:
        """The next eligible subscriber in round-robin order, or ``None``.

        Eligible: not paused, window not full, and its transport has an
        outbox for this name (a gRPC client may subscribe before it opens
        the stream that carries the name; messages wait for it).
        """
        count = len(self.subscribers)
        for offset in range(count):
            index = (self.next_subscriber + offset) % count
            sub = self.subscribers[index]
            if sub.paused or len(sub.in_flight) >= window:
                continue
            if sub.session.router.sink_for(self.name) is None:
                continue
            self.next_subscriber = (index + 1) % count
            return sub
        return None
