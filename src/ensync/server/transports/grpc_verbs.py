"""The unary verbs of ``ensync.EnSyncService`` (publish, settle, subscribe
changes, replay) in both method generations, over the engine's operations.

Each verb is a row: how to run it and which response carries the answer.
Failures are ``success=false`` with the reason in ``message`` (never a
status clients retry, PROTOCOL.md §2.3).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message as ProtoMessage

from ensync._proto import ensync_pb2 as pb
from ensync.protocol.agents import wants_bare_replay
from ensync.protocol.records import ReplayInfo, replay_json
from ensync.server.core.calls import (
    Pause,
    Publish,
    Replay,
    Resume,
    Settle,
    SettleKind,
    Unsubscribe,
)
from ensync.server.core.model import ReplayResult
from ensync.server.runtime.operations import Operations

__all__ = ["VERBS", "Call", "Verb", "replay_message_data"]


def replay_message_data(result: ReplayResult, *, user_agent: str, event_names: bool) -> str:
    """What Replay's ``message_data`` carries for this client (PROTOCOL.md §2.7):
    the bare payload for the official Python client, which decrypts the field
    directly; for every other client a JSON object shaped like a stream
    message, the replay information inside its ``metadata`` string."""
    if wants_bare_replay(user_agent):
        return result.delivery.payload
    info = ReplayInfo(result.replayed_at_ms, result.was_acknowledged)
    return replay_json(result.delivery, info, event_names=event_names)


@dataclass(frozen=True, slots=True)
class Call:
    """One verb call: the operations, the request and who asked."""

    ops: Operations
    request: Any
    user_agent: str
    event: bool


@dataclass(frozen=True, slots=True)
class Verb:
    """One unary method (in both generations where it has two): how to run it
    and which response carries the answer. Failures are ``success=false`` with
    the reason in ``message`` (never a status clients retry, PROTOCOL.md §2.3)."""

    name: str
    request: type[ProtoMessage]
    response: Callable[..., ProtoMessage]
    run: Callable[[Call], Awaitable[tuple[str, dict[str, Any]]]]
    # The method names, Message and Event generation ("{}" is the generation).
    pattern: str
    generations: bool = True

    def methods(self) -> list[tuple[str, bool]]:
        if not self.generations:
            return [(self.pattern, False)]
        return [
            (self.pattern.format("Message"), False),
            (self.pattern.format("Event"), True),
        ]


async def _publish(call: Call) -> tuple[str, dict[str, Any]]:
    r = call.request
    payload_metadata = r.payload_metadata if r.HasField("payload_metadata") else None
    publish = Publish(
        r.client_id, r.message_name, r.payload, r.delivery_to, r.metadata, payload_metadata
    )
    (answer,) = await call.ops.publish([publish])
    return "", {"message_idem": await answer}


async def _settle(call: Call, kind: SettleKind, **fields: Any) -> int | None:
    r = call.request
    (answer,) = call.ops.settle([Settle(r.client_id, r.message_idem, kind, **fields)])
    return await answer


async def _unsubscribe(call: Call) -> tuple[str, dict[str, Any]]:
    # Streams stay open (PROTOCOL.md §2.5 rule 3): only the name set changes.
    was = call.ops.unsubscribe(Unsubscribe(call.request.client_id, call.request.message_name))
    return ("unsubscribed" if was else "was not subscribed"), {}


async def _ack(call: Call) -> tuple[str, dict[str, Any]]:
    await _settle(call, SettleKind.ACK)
    return "acknowledged", {}


async def _defer(call: Call) -> tuple[str, dict[str, Any]]:
    r = call.request
    when = await _settle(call, SettleKind.DEFER, delay_ms=r.delay_ms, reason=r.reason)
    return "deferred", {"delivery_time": when}


async def _discard(call: Call) -> tuple[str, dict[str, Any]]:
    await _settle(call, SettleKind.DISCARD, reason=call.request.reason)
    return "discarded", {}


async def _replay(call: Call) -> tuple[str, dict[str, Any]]:
    result = await call.ops.replay(Replay(call.request.client_id, call.request.message_idem))
    data = replay_message_data(result, user_agent=call.user_agent, event_names=call.event)
    return "replayed", {"message_data": data}


async def _pause(call: Call) -> tuple[str, dict[str, Any]]:
    r = call.request
    call.ops.pause(Pause(r.client_id, r.message_name, r.reason))
    return "paused", {}


async def _continue(call: Call) -> tuple[str, dict[str, Any]]:
    call.ops.resume(Resume(call.request.client_id, call.request.message_name))
    return "continued", {}


async def _extend(call: Call) -> tuple[str, dict[str, Any]]:
    deadline = await _settle(call, SettleKind.EXTEND)
    return "extended", {"deadline": deadline}


async def _release(call: Call) -> tuple[str, dict[str, Any]]:
    when = await _settle(call, SettleKind.RELEASE, reason=call.request.reason)
    if when is None:
        return "dead-lettered", {}
    return "released", {"delivery_time": when}


def _publish_response(*, success: bool, message: str, **fields: Any) -> ProtoMessage:
    # Publish answers in error_message, not message (PROTOCOL.md §2.2).
    return pb.PublishMessageResponse(success=success, error_message=message, **fields)


VERBS = (
    Verb("Publish", pb.PublishMessageRequest, _publish_response, _publish, "Publish{}"),
    Verb(
        "Unsubscribe",
        pb.UnsubscribeRequest,
        pb.UnsubscribeResponse,
        _unsubscribe,
        "Unsubscribe",
        generations=False,
    ),
    Verb("Acknowledge", pb.AcknowledgeRequest, pb.AcknowledgeResponse, _ack, "Acknowledge{}"),
    Verb("Defer", pb.DeferRequest, pb.DeferResponse, _defer, "Defer{}"),
    Verb("Discard", pb.DiscardRequest, pb.DiscardResponse, _discard, "Discard{}"),
    Verb("Replay", pb.ReplayRequest, pb.ReplayResponse, _replay, "Replay{}"),
    Verb("Pause", pb.PauseRequest, pb.PauseResponse, _pause, "Pause{}s"),
    Verb("Continue", pb.ContinueRequest, pb.ContinueResponse, _continue, "Continue{}s"),
    Verb(
        "Extend", pb.ExtendRequest, pb.ExtendResponse, _extend, "ExtendMessage", generations=False
    ),
    Verb(
        "Release",
        pb.ReleaseRequest,
        pb.ReleaseResponse,
        _release,
        "ReleaseMessage",
        generations=False,
    ),
)
