"""In-memory stand-ins for a transport, to drive the engine core directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from ensync.crypto import seal
from ensync.server.core.model import Delivery

__all__ = ["FakeRouter", "FakeSink", "envelope"]


def envelope(recipient_app_id: str, text: bytes = b'{"n":1}') -> str:
    """A real single-recipient envelope, as a publisher would send."""
    return seal(text, recipient_app_id)


@dataclass
class FakeSink:
    received: list[Delivery] = field(default_factory=list)

    def push(self, delivery: Delivery) -> None:
        self.received.append(delivery)

    def has_room(self, name: str) -> bool:
        return True


@dataclass
class FakeRouter:
    """Routes every name to one sink unless ``open`` is cleared."""

    sink: FakeSink = field(default_factory=FakeSink)
    open: bool = True
    attached: bool = True
    closed: bool = False

    def sink_for(self, name: str) -> FakeSink | None:
        return self.sink if self.open and not self.closed else None

    def is_attached(self) -> bool:
        return self.attached

    def close(self) -> None:
        self.closed = True

    @property
    def received(self) -> list[Delivery]:
        return self.sink.received
