"""What a publish sends besides its envelopes, checked before anything is sealed.

Pure functions over the caller's arguments: the recipients (app ids), the
payload as JSON, the metadata the engine stores with the message (with its
idempotency key), and the payload metadata (size and shape, never values).
Each raises `EnSyncValidationError` naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ensync import errors
from ensync.client.typed import as_payload
from ensync.crypto import is_app_id
from ensync.protocol.headers import IDEMPOTENCY_HEADER

__all__ = [
    "MAX_RECIPIENTS",
    "RecipientCheck",
    "json_payload",
    "metadata_json",
    "payload_metadata_json",
]

_METADATA_KEYS = {"persist", "headers", "ttl_ms"}

# Each recipient is one request on the wire (PROTOCOL.md §2.2): a bound keeps a
# mistaken list from turning one call into a flood.
MAX_RECIPIENTS = 1000
_VALID_RECIPIENTS_KEPT = 4096


class RecipientCheck:
    """Checks recipient lists, remembering the app ids it found valid.

    Decoding one again would be the cost of a publish; the memory is
    bounded (cleared when full).
    """

    def __init__(self) -> None:
        self._valid: set[str] = set()

    def check(self, recipients: Sequence[str]) -> None:
        """Raise `EnSyncValidationError` unless ``recipients`` is a list of 1 to 1000 app ids."""
        if isinstance(recipients, str) or not isinstance(recipients, Sequence):
            raise errors.EnSyncValidationError("recipients must be a list of app ids")
        if not recipients:
            raise errors.EnSyncValidationError("recipients is empty: name at least one app id")
        if len(recipients) > MAX_RECIPIENTS:
            raise errors.EnSyncValidationError(
                f"{len(recipients)} recipients, more than the limit of {MAX_RECIPIENTS} per publish"
            )
        valid = self._valid
        for recipient in recipients:
            if isinstance(recipient, str) and recipient in valid:
                continue
            if not isinstance(recipient, str) or not is_app_id(recipient):
                raise errors.EnSyncValidationError(
                    f"recipient {str(recipient)[:64]!r} is not an app id (base64 of 32 bytes)"
                )
            if len(valid) >= _VALID_RECIPIENTS_KEPT:
                valid.clear()
            valid.add(recipient)


def json_payload(payload: Mapping[str, Any] | object) -> tuple[Mapping[str, Any], bytes]:
    """The payload as a JSON object, and its compact JSON bytes."""
    as_object = as_payload(payload)
    try:
        plaintext = json.dumps(as_object, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise errors.EnSyncValidationError(f"payload is not JSON-serialisable: {exc}") from None
    return as_object, plaintext


def metadata_json(metadata: Mapping[str, Any] | None, idempotency_key: str) -> str:
    """The message's metadata as the engine stores it.

    ``persist`` (default true), ``headers`` with the idempotency key (unless
    the caller set one), ``ttl_ms`` if given, and the caller's other keys as
    they are.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise errors.EnSyncValidationError("metadata must be a mapping")
    persist = metadata.get("persist", True)
    if not isinstance(persist, bool):
        raise errors.EnSyncValidationError("metadata['persist'] must be True or False")
    headers = metadata.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise errors.EnSyncValidationError("metadata['headers'] must map strings to strings")
    ttl = metadata.get("ttl_ms")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
        raise errors.EnSyncValidationError("metadata['ttl_ms'] must be a positive integer")
    out: dict[str, Any] = {
        "persist": persist,
        # A key the caller chose wins: it may span several publish calls.
        "headers": {IDEMPOTENCY_HEADER: idempotency_key, **headers},
    }
    if ttl is not None:
        out["ttl_ms"] = ttl
    for key, value in metadata.items():
        if key not in _METADATA_KEYS:
            out[key] = value
    try:
        return json.dumps(out, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise errors.EnSyncValidationError(f"metadata is not JSON-serialisable: {exc}") from None


def payload_metadata_json(payload: Mapping[str, Any], byte_size: int) -> str:
    """The payload's size and the type of each top-level field (no value).

    The official clients send it too.
    """
    return json.dumps(
        {
            "byte_size": byte_size,
            "skeleton": {str(k): _skeleton_type(v) for k, v in payload.items()},
        },
        separators=(",", ":"),
    )


def _skeleton_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer" if -(2**31) <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list | tuple) else "object"
