"""The engine's session outbox: what goes in one frame."""

from __future__ import annotations

from ensync.server.core.model import Delivery
from ensync.server.transports.session import SessionOutbox


def delivery(idem: str, payload_bytes: int, attempt: int = 1) -> Delivery:
    return Delivery(
        idem=idem,
        name="orders/created",
        block=1,
        payload="x" * payload_bytes,
        metadata="{}",
        sender="s",
        created_at_ms=0,
        attempt=attempt,
    )


def test_a_frame_stays_under_its_byte_budget_with_deliveries_and_copies() -> None:
    outbox = SessionOutbox(max_frame_bytes=10_000, credits={"orders/created": 10})
    outbox.push(delivery("d1", 6_000))
    assert outbox.observed(delivery("o1", 6_000, attempt=0))
    first = outbox.frame()
    assert first is not None
    assert [d.message_idem for d in first.deliveries] == ["d1"]
    assert list(first.observed) == []  # it would pass the budget: the next frame
    second = outbox.frame()
    assert second is not None
    assert [d.message_idem for d in second.observed] == ["o1"]
    assert outbox.frame() is None


def test_an_item_larger_than_the_budget_travels_alone() -> None:
    outbox = SessionOutbox(max_frame_bytes=1_000)
    assert outbox.observed(delivery("big", 5_000, attempt=0))
    assert outbox.observed(delivery("small", 10, attempt=0))
    first = outbox.frame()
    assert first is not None
    assert [d.message_idem for d in first.observed] == ["big"]
    second = outbox.frame()
    assert second is not None
    assert [d.message_idem for d in second.observed] == ["small"]
