"""Connected clients and their subscriptions (in memory only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ensync.server.core.model import SessionRouter
from ensync.server.store.base import AppRecord

__all__ = ["Session", "Subscription"]


@dataclass(eq=False, slots=True)
class Session:
    """One authenticated connection of an app (``client_id`` is its bearer token)."""

    client_id: str
    client_hash: str
    app: AppRecord
    router: SessionRouter
    connected_at_ms: int
    last_seen_ms: int
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    # Pause is per client and name, and may precede the subscribe; it is not
    # persisted: a reconnecting client starts unpaused (DESIGN.md §2).
    paused: dict[str, str] = field(default_factory=dict)
    closed: bool = False

    @property
    def app_id(self) -> str:
        return self.app.app_id


@dataclass(eq=False, slots=True)
class Subscription:
    """A client's subscription to one message name, with the idems it holds."""

    session: Session
    name: str
    in_flight: set[str] = field(default_factory=set)

    @property
    def paused(self) -> bool:
        return self.name in self.session.paused

    def room(self, window: int) -> int:
        """How many more deliveries it may take now: none while paused or
        without an outbox for the name (a gRPC client may subscribe before it
        opens the stream that carries the name), else what its sink allows."""
        if self.paused or self.session.closed:
            return 0
        sink = self.session.router.sink_for(self.name)
        if sink is None:
            return 0
        return max(0, sink.room(self.name, len(self.in_flight), window))

    def eligible(self, window: int) -> bool:
        """May take another delivery now (see :meth:`room`)."""
        return self.room(window) > 0
