"""Deliveries made into `Message` objects: decrypted, typed, replayed."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ensync import errors
from ensync.client.transport import Delivery
from ensync.client.typed import from_payload
from ensync.crypto import OpeningKey, open_envelope, parse_envelope
from ensync.models import Message, ReplayInfo
from ensync.protocol.records import ReplayInfo as WireReplayInfo
from ensync.protocol.records import metadata_object, split_replay_info

__all__ = ["DoesNotFit", "open_message", "open_payload_of", "open_typed", "replayed"]


def open_message(wire: Delivery, key: OpeningKey) -> Message:
    """A delivery (or an observed copy, or a replay), decrypted.

    Raises EnSyncMessageError naming the message when that fails.
    """
    return Message(
        message_name=wire.name,
        idem=wire.idem,
        block=wire.block,
        payload=open_payload_of(wire, key),
        # gRPC replays carry no time: 0 stands for "not said".
        timestamp=wire.created_at_ms or None,
        metadata=split_replay_info(metadata_object(wire.metadata))[0],
        sender=wire.sender,
        attempt=wire.attempt,
    )


class DoesNotFit(errors.EnSyncMessageError):
    """A readable message whose payload does not fit the subscription's model."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_typed(wire: Delivery, key: OpeningKey, model: type[Any] | None) -> Message:
    """A delivery decrypted, its payload made an instance of ``model`` if given.

    Raises:
        DoesNotFit: the payload does not fit ``model`` (with the reason).
        EnSyncMessageError: it cannot be decrypted, or is not JSON.
    """
    message = open_message(wire, key)
    if model is None:
        return message
    try:
        payload = from_payload(model, message.payload)
    except ValueError as exc:
        reason = f"payload does not fit {model.__name__}: {exc}"[:500]
        raise DoesNotFit(f"message {wire.idem} on {wire.name!r}: {reason}", reason) from exc
    return dataclasses.replace(message, payload=payload)


def replayed(message: Message, info: WireReplayInfo | None) -> Message:
    """``message`` as a replay returns it, with the engine's replay information."""
    return dataclasses.replace(
        message,
        replay_info=ReplayInfo(
            is_replayed=True,
            replay_timestamp=info.replayed_at_ms if info else None,
            was_acknowledged=info.was_acknowledged if info else False,
        ),
    )


def open_payload_of(wire: Delivery, key: OpeningKey) -> Any:
    """The decrypted JSON payload of a delivery.

    Raises EnSyncMessageError naming the message when it cannot be
    decrypted or is not JSON.
    """
    try:
        return json.loads(open_envelope(parse_envelope(wire.payload), key))
    except errors.EnSyncMessageError as exc:
        raise errors.EnSyncMessageError(
            f"message {wire.idem} on {wire.name!r} cannot be decrypted: {exc.message}"
        ) from exc
    except ValueError as exc:
        raise errors.EnSyncMessageError(
            f"message {wire.idem} on {wire.name!r} is not JSON after decryption"
        ) from exc
