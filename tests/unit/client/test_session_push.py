"""A session over a link that pushes what it reads (the WebSocket link)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.session import SessionStream
from tests.support.timing import eventually

__all__: list[str] = []

Arrival = pb.ServerFrame | BaseException | None


class PushingLink:
    """Answers the hello with a welcome, then pushes what the test hands it."""

    def __init__(self) -> None:
        self.sink: Callable[[Arrival], None] | None = None
        self.written: list[pb.ClientFrame] = []

    async def write(self, frame: pb.ClientFrame) -> None:
        self.written.append(frame)

    async def read(self) -> pb.ServerFrame | None:
        return pb.ServerFrame(welcome=pb.SessionWelcome(version=1, capabilities=["deliveries"]))

    def cancel(self) -> None:
        if self.sink is not None:
            self.sink(None)

    def push_to(self, sink: Callable[[Arrival], None]) -> None:
        self.sink = sink


async def start(link: PushingLink, lost: list[BaseException]) -> SessionStream:
    return await SessionStream.start(
        link, "client-1", timeout_s=5.0, route=lambda _name: None, lost=lost.append
    )


async def test_answers_pushed_by_the_link_resolve_calls() -> None:
    link, lost = PushingLink(), list[BaseException]()
    session = await start(link, lost)
    call = asyncio.ensure_future(session.publish("a/b", "to", "payload", "{}", None))
    await eventually(lambda: any(frame.publishes for frame in link.written))
    (sent,) = next(frame for frame in link.written if frame.publishes).publishes
    assert link.sink is not None
    answer = pb.SessionPublished(seq=sent.seq, success=True, message_idem="01IDEM")
    link.sink(pb.ServerFrame(published=[answer]))
    assert await asyncio.wait_for(call, 5) == "01IDEM"
    await session.close()
    assert lost == []


async def test_the_end_or_a_break_pushed_by_the_link_is_a_lost_session() -> None:
    link, lost = PushingLink(), list[BaseException]()
    await start(link, lost)
    assert link.sink is not None
    link.sink(None)
    assert [str(cause) for cause in lost] == ["the engine ended the session"]


async def test_a_frame_that_cannot_be_handled_breaks_the_session_not_the_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link, lost = PushingLink(), list[BaseException]()
    await start(link, lost)

    def broken(_self: Any, _frame: pb.ServerFrame) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(SessionStream, "_take", broken)
    assert link.sink is not None
    link.sink(pb.ServerFrame())  # must not raise into the link's reader
    (cause,) = lost
    assert isinstance(cause, errors.EnSyncConnectionError)
    assert "simulated bug" in str(cause)
