"""The WebSocket session link on its own, over a fake socket."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.ws_transport import _BinaryLink

__all__: list[str] = []


class StuckSocket:
    """A socket whose send buffer never drains: every send waits for good."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.blocked = False

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        if self.blocked:
            await asyncio.Event().wait()


async def test_a_frame_is_sent_whole() -> None:
    socket = StuckSocket()
    link = _BinaryLink(cast(Any, socket), timeout_s=1.0)
    frame = pb.ClientFrame(publishes=[pb.SessionPublish(seq=7, message_name="a/b")])
    await link.write(frame)
    assert [pb.ClientFrame.FromString(data) for data in socket.sent] == [frame]


async def test_a_socket_that_takes_nothing_for_the_timeout_is_a_lost_link() -> None:
    socket = StuckSocket()
    socket.blocked = True
    link = _BinaryLink(cast(Any, socket), timeout_s=0.05)
    with pytest.raises(errors.EnSyncConnectionError, match="connection to the engine lost"):
        await asyncio.wait_for(link.write(pb.ClientFrame()), 5.0)


async def test_frames_read_before_the_session_started_reach_it_first_and_in_order() -> None:
    link = _BinaryLink(cast(Any, StuckSocket()), timeout_s=1.0)
    first, second, third = (
        pb.ServerFrame(published=[pb.SessionPublished(seq=n)]) for n in (1, 2, 3)
    )
    link.arrived(first)
    link.arrived(second)
    assert await link.read() == first  # the welcome is read, not pushed
    heard: list[pb.ServerFrame | BaseException | None] = []
    link.push_to(heard.append)
    link.arrived(third)
    broken = errors.EnSyncConnectionError("gone")
    link.arrived(broken)
    link.cancel()
    assert heard == [second, third, broken, None]
    assert link.frames.empty()
