"""Values the core hands to transports, and the seams transports implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ensync.protocol.records import Delivery

__all__ = [
    "Clock",
    "Delivery",
    "DeliverySink",
    "EngineStatistics",
    "EngineStats",
    "ReplayResult",
    "SessionInfo",
    "SessionRouter",
]


class Clock(Protocol):
    """Where the core gets the time: epoch milliseconds. The core never reads
    a clock itself; the runtime hands it one (tests hand it a fake)."""

    def now_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """A message read back by idem, with what the replay says about it."""

    delivery: Delivery
    replayed_at_ms: int
    was_acknowledged: bool


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a successful connect returns."""

    client_id: str
    client_hash: str
    app_id: str
    app_name: str


class DeliverySink(Protocol):
    """Where the core pushes deliveries for one client: a transport's outbox.

    ``push`` must not block; the core pushes no more than :meth:`room` allows.
    """

    def push(self, delivery: Delivery) -> None: ...

    def room(self, name: str, held: int, window: int) -> int:
        """How many more deliveries of ``name`` the client takes now, holding
        ``held`` unsettled ones; ``window`` is the engine's bound per
        subscription. An official client's outbox allows ``window - held``;
        ensync's session stream also spends the client's credits, and allows
        its own, wider window (its SDK keeps the leases of what it buffers).
        """
        ...


class SessionRouter(Protocol):
    """A transport's view of one connected client, given to ``Engine.connect``."""

    def sink_for(self, name: str) -> DeliverySink | None:
        """The outbox that delivers messages of ``name``, or ``None`` to hold them."""
        ...

    def is_attached(self) -> bool:
        """Whether the client still has a live connection or open stream."""
        ...

    def close(self) -> None:
        """The engine ended the session (expired, revoked): end its streams."""
        ...


@dataclass(slots=True)
class EngineStats:
    """Counters since start; read by ``/metrics`` and the benchmark."""

    published: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    deferred: int = 0
    discarded: int = 0
    dead_lettered: int = 0
    expired: int = 0
    connects: int = 0
    rejected: int = 0
    deduplicated: int = 0
    denied: int = 0
    subscribe_refusals: int = 0
    observed: int = 0
    observed_missed: int = 0
    limit_rejections: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """Gauges of an engine at one moment.

    Attributes:
        sessions: clients with a live session.
        in_flight: deliveries awaiting a settlement (this engine's leases).
        partitions: (recipient, name) partitions with a subscriber here.
        claiming: partitions with a claim in progress.
        deferred: partitions waiting for a deferral or backoff to end.
        publishing: publishes waiting for their batch to be appended.
        buffered: message references the store read ahead of delivery
            (no payloads), when the store says.
    """

    sessions: int
    in_flight: int
    partitions: int
    claiming: int
    deferred: int
    publishing: int
    buffered: int = 0
