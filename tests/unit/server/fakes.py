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
    """Takes what the window allows; with ``credits`` set, also spends them
    (as ensync's session stream does)."""

    received: list[Delivery] = field(default_factory=list)
    credits: int | None = None

    def push(self, delivery: Delivery) -> None:
        if self.credits is not None:
            assert self.credits > 0, "pushed past the client's credits"
            self.credits -= 1
        self.received.append(delivery)

    def room(self, name: str, held: int, window: int) -> int:
        if self.credits is None:
            return window - held
        return min(self.credits, window - held)


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
