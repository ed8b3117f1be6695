"""The one message record, and every wire form of it. Pure functions.

A delivered message has the same eight fields wherever it travels: the
engine's deliveries, the gRPC ``MessageStreamResponse``, the WebSocket
``+RECORD:`` object, Replay's ``message_data`` JSON, and what the SDK
receives. :class:`Delivery` is that record; each wire form has one pair of
conversions here, used by the engine's transports and by the SDK alike.

Replay information travels inside the metadata, under
``$internal.replay_info`` (``isReplayed``, ``replayTimestamp``,
``wasAcknowledged``), in both transports (docs/protocol.md); on gRPC, whose
messages carry no time, also ``loggedAt``, when the message was logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeGuard

from ensync._proto import ensync_pb2 as pb
from ensync.protocol.wscodec import Record

__all__ = [
    "Delivery",
    "ReplayInfo",
    "Stored",
    "from_replay_json",
    "from_stream_response",
    "from_ws_record",
    "metadata_object",
    "replay_json",
    "split_replay_info",
    "to_stream_response",
    "to_ws_record",
    "with_replay_info",
]


class Stored(Protocol):
    """A message as an engine's store keeps it: what a :class:`Delivery` is
    made from (the engine's ``StoredMessage``)."""

    @property
    def idem(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def block(self) -> int: ...
    @property
    def payload(self) -> str: ...
    @property
    def metadata(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def created_at_ms(self) -> int: ...
    @property
    def attempts(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way to (or arrived at) one client.

    ``payload`` is the envelope exactly as published; ``metadata`` is the
    publisher's JSON text. ``created_at_ms`` is when the engine logged it
    (``loggedAt``), or when it arrived where the wire does not say (gRPC).
    ``attempt`` counts deliveries, 1 for the first.
    """

    idem: str
    name: str
    block: int
    payload: str
    metadata: str
    sender: str
    created_at_ms: int
    attempt: int = 1

    @classmethod
    def from_stored(cls, message: Stored, *, attempt: int | None = None) -> Self:
        """The delivery of a stored message; ``attempt`` defaults to the
        message's count of deliveries (0 for an observed copy)."""
        return cls(
            idem=message.idem,
            name=message.name,
            block=message.block,
            payload=message.payload,
            metadata=message.metadata,
            sender=message.sender,
            created_at_ms=message.created_at_ms,
            attempt=message.attempts if attempt is None else attempt,
        )


@dataclass(frozen=True, slots=True)
class ReplayInfo:
    """What a replay says about the message it returned."""

    replayed_at_ms: int | None
    was_acknowledged: bool


def metadata_object(text: str) -> dict[str, Any]:
    """The publisher's metadata as an object; ``{}`` for anything else
    (metadata is checked when published, but a peer may send anything)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def with_replay_info(
    metadata: dict[str, Any], info: ReplayInfo, *, logged_at_ms: int = 0
) -> dict[str, Any]:
    """``metadata`` with the replay information added under ``$internal``
    (and ``logged_at_ms``, when the message was logged, unless 0)."""
    internal = metadata.get("$internal")
    internal = dict(internal) if isinstance(internal, dict) else {}
    replay_info: dict[str, Any] = {
        "isReplayed": True,
        "replayTimestamp": info.replayed_at_ms,
        "wasAcknowledged": info.was_acknowledged,
    }
    if logged_at_ms:
        replay_info["loggedAt"] = logged_at_ms
    internal["replay_info"] = replay_info
    return {**metadata, "$internal": internal}


def split_replay_info(metadata: dict[str, Any]) -> tuple[dict[str, Any], ReplayInfo | None]:
    """The publisher's own metadata (``$internal`` removed) and the replay
    information it carried, if any."""
    own = dict(metadata)
    internal = own.pop("$internal", None)
    info = internal.get("replay_info") if isinstance(internal, dict) else None
    if not isinstance(info, dict):
        return own, None
    stamp = info.get("replayTimestamp")
    return own, ReplayInfo(
        replayed_at_ms=stamp if _is_int(stamp) else None,
        was_acknowledged=bool(info.get("wasAcknowledged", False)),
    )


def _logged_at(metadata: dict[str, Any]) -> int:
    """``loggedAt`` of the replay information in ``metadata``; 0 if none."""
    internal = metadata.get("$internal")
    info = internal.get("replay_info") if isinstance(internal, dict) else None
    stamp = info.get("loggedAt") if isinstance(info, dict) else None
    return stamp if _is_int(stamp) and stamp > 0 else 0


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# --- WebSocket ----------------------------------------------------------------


def to_ws_record(delivery: Delivery, replay: ReplayInfo | None = None) -> Record:
    """The ``+RECORD:`` / ``+REPLAY:`` record (metadata as an object)."""
    metadata = metadata_object(delivery.metadata)
    if replay is not None:
        metadata = with_replay_info(metadata, replay)
    return Record(
        idem=delivery.idem,
        name=delivery.name,
        block=delivery.block,
        logged_at_ms=delivery.created_at_ms,
        payload=delivery.payload,
        metadata=metadata,
        sender=delivery.sender,
        attempt=delivery.attempt if replay is None else 1,
    )


def from_ws_record(record: Record) -> tuple[Delivery, ReplayInfo | None]:
    """A received record, and the replay information in its metadata."""
    metadata, info = split_replay_info(record.metadata)
    delivery = Delivery(
        idem=record.idem,
        name=record.name,
        block=record.block,
        payload=record.payload,
        metadata=json.dumps(metadata, separators=(",", ":")),
        sender=record.sender,
        created_at_ms=record.logged_at_ms,
        attempt=record.attempt,
    )
    return delivery, info


# --- gRPC -------------------------------------------------------------------------


def to_stream_response(delivery: Delivery) -> pb.MessageStreamResponse:
    return pb.MessageStreamResponse(
        message_idem=delivery.idem,
        message_name=delivery.name,
        payload=delivery.payload,
        partition_block=delivery.block,
        metadata=delivery.metadata,
        sender=delivery.sender,
        attempt=delivery.attempt,
    )


def from_stream_response(
    item: pb.MessageStreamResponse,
    *,
    name: str,
    received_at_ms: int,
    attempt: int | None = None,
) -> Delivery:
    """A streamed message; ``name`` is the stream's when the message has none.
    ``attempt`` overrides the message's (an observed copy is 0)."""
    return Delivery(
        idem=item.message_idem,
        name=item.message_name or name,
        block=item.partition_block,
        payload=item.payload,
        metadata=item.metadata,
        sender=item.sender,
        created_at_ms=received_at_ms,
        attempt=max(1, item.attempt) if attempt is None else attempt,
    )


def replay_json(delivery: Delivery, info: ReplayInfo, *, event_names: bool) -> str:
    """Replay's ``message_data`` for clients that parse it as JSON
    (PROTOCOL.md §2.7): exactly the stream message's fields, snake_case,
    ``metadata`` a JSON *string* carrying the replay information and, since
    the message has no time field (PROTOCOL.md §2.8), when it was logged."""
    metadata = with_replay_info(
        metadata_object(delivery.metadata), info, logged_at_ms=delivery.created_at_ms
    )
    prefix = "event" if event_names else "message"
    return json.dumps(
        {
            f"{prefix}_idem": delivery.idem,
            f"{prefix}_name": delivery.name,
            "payload": delivery.payload,
            "partition_block": delivery.block,
            "metadata": json.dumps(metadata, separators=(",", ":")),
            "sender": delivery.sender,
        },
        separators=(",", ":"),
    )


def from_replay_json(text: str, *, name: str, idem: str) -> tuple[Delivery, ReplayInfo | None]:
    """Parse :func:`replay_json`'s form; ``name`` and ``idem`` fill in what
    the data leaves out.

    Raises:
        ValueError: ``text`` is not that JSON object.
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("message_data is not a JSON object")
    sent = metadata_object(str(data.get("metadata") or ""))
    metadata, info = split_replay_info(sent)
    try:
        block = int(data.get("partition_block") or 0)
    except (TypeError, ValueError) as exc:
        raise ValueError("partition_block is not a number") from exc
    delivery = Delivery(
        idem=str(data.get("message_idem") or data.get("event_idem") or idem),
        name=str(data.get("message_name") or data.get("event_name") or name),
        block=block,
        payload=str(data.get("payload") or ""),
        metadata=json.dumps(metadata, separators=(",", ":")),
        sender=str(data.get("sender") or ""),
        created_at_ms=_logged_at(sent),  # 0 from an engine that does not say
    )
    return delivery, info
