"""The session's bookkeeping on its own: frames cut below the size limit,
calls answered, timed out or failed together."""

from __future__ import annotations

import asyncio

import pytest

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.frames import EAGER_FLUSH, FrameBuilder, PendingCalls

__all__: list[str] = []


def publish(seq: int, size: int = 10) -> pb.SessionPublish:
    return pb.SessionPublish(seq=seq, message_name="a/b", payload="x" * size)


def test_settlements_credits_and_observations_go_in_the_first_frame() -> None:
    builder = FrameBuilder(max_frame_bytes=1024 * 1024)
    assert not builder
    assert builder.frames() == []
    builder.settle(pb.SessionSettle(seq=1, message_idem="i"))
    builder.credit("a/b", 2)
    builder.credit("a/b", 3)
    builder.observe(pb.SessionObserve(seq=2, pattern="#"))
    assert not builder.publish(publish(3))
    (frame,) = builder.frames()
    assert [s.seq for s in frame.settles] == [1]
    assert [(c.message_name, c.credit) for c in frame.credits] == [("a/b", 5)]
    assert [o.seq for o in frame.observes] == [2]
    assert [p.seq for p in frame.publishes] == [3]
    assert not builder


def test_publishes_are_cut_into_frames_below_the_limit() -> None:
    builder = FrameBuilder(max_frame_bytes=1000)
    for seq in range(1, 11):
        builder.publish(publish(seq, size=300))
    frames = builder.frames()
    assert [p.seq for frame in frames for p in frame.publishes] == list(range(1, 11))
    assert all(frame.ByteSize() <= 1000 for frame in frames)
    assert len(frames) > 3


def test_a_full_batch_of_publishes_asks_to_be_sent_now() -> None:
    builder = FrameBuilder(max_frame_bytes=1024 * 1024)
    asks = [builder.publish(publish(seq)) for seq in range(1, EAGER_FLUSH + 1)]
    assert asks == [False] * (EAGER_FLUSH - 1) + [True]


async def test_calls_are_answered_or_time_out_and_stall_the_link() -> None:
    stalled: list[BaseException] = []
    calls = PendingCalls(timeout_s=0.05, stalled=stalled.append)
    answered, late = calls.next_seq(), calls.next_seq()
    first, second = calls.expect(answered), calls.expect(late)
    calls.resolve(answered, "done")
    calls.forget(answered)
    assert await first == "done"
    with pytest.raises(errors.EnSyncTimeoutError):
        await asyncio.wait_for(second, 5)
    assert len(stalled) == 1


async def test_closing_fails_every_call_waiting_and_every_later_one() -> None:
    calls = PendingCalls(timeout_s=60, stalled=lambda cause: None)
    waiting = calls.expect(calls.next_seq())
    closed = errors.EnSyncConnectionError("closed")
    calls.close(closed)
    with pytest.raises(errors.EnSyncConnectionError, match="closed"):
        await waiting
    with pytest.raises(errors.EnSyncConnectionError, match="broken"):
        calls.expect(calls.next_seq())
