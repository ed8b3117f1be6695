"""Checks on publish input. Pure functions: text in, value or ServiceError out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ensync._json import loads_strict
from ensync.crypto._base64 import b64decode
from ensync.protocol.headers import IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY_LENGTH
from ensync.protocol.names import validate_name
from ensync.server.core.errors import ServiceError

__all__ = [
    "MAX_HYBRID_KEYS",
    "MAX_TTL_MS",
    "PublishMetadata",
    "check_name",
    "check_payload",
    "check_recipient",
    "envelope_limit",
    "json_bytes_of",
    "largest_request",
    "parse_metadata",
    "parse_payload_metadata",
    "strict_json",
]

_SINGLE_KEYS = ("nonce", "ciphertext", "ephemeralPublicKey")
# Most recipient keys in one hybrid envelope (the SDK's MAX_RECIPIENTS).
MAX_HYBRID_KEYS = 1000
_MAC_BYTES = 16
# Room in an envelope's JSON besides the ciphertext: its field names, nonce
# and ephemeral key (~130 bytes as ensync writes it), and per hybrid key
# (~240 bytes), with a margin for other clients' spacing and names.
_ENVELOPE_ROOM = 384
_TYPICAL_ROOM = 130
_KEY_ROOM = 320


def _too_big(payload: str, max_json_bytes: int) -> ServiceError:
    return ServiceError.over_limit(
        "payload_size",
        f"payload holds about {json_bytes_of(len(payload))} bytes of JSON (a"
        f" {len(payload)}-byte envelope), more than the limit of {max_json_bytes} bytes",
    )


# A TTL beyond a year is a mistake (and 2**63 would overflow the store).
MAX_TTL_MS = 365 * 86_400_000


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as every client can: no NaN or Infinity (Node and Go refuse
    them, PROTOCOL.md §2.8), no numbers that overflow to infinity, and a
    nesting too deep for the parser is an error, not a crash.

    Raises ``ValueError`` for anything else than such JSON.
    """
    return loads_strict(text)


@dataclass(frozen=True, slots=True)
class PublishMetadata:
    """What the engine reads from a publish's metadata; the text is forwarded as is."""

    text: str
    persist: bool
    ttl_ms: int | None
    idempotency_key: str | None = None


def check_name(name: str, max_length: int = 255) -> str:
    if len(name) > max_length:
        raise ServiceError.over_limit(
            "name_length", f"message name is {len(name)} characters, more than {max_length}"
        )
    try:
        return validate_name(name)
    except ValueError as exc:
        raise ServiceError.invalid(str(exc)) from None


def check_recipient(recipient: str) -> str:
    """A recipient must be an app id: standard base64 of 32 bytes."""
    if not recipient:
        raise ServiceError.invalid("recipient (delivery_to) is empty")
    try:
        raw = b64decode(recipient)
    except ValueError:
        raise ServiceError.invalid(
            f"recipient {recipient[:64]!r} is not base64 (expected an app id)"
        ) from None
    if len(raw) != 32:
        raise ServiceError.invalid(
            f"recipient {recipient[:64]!r} is not an app id (decodes to {len(raw)} bytes, not 32)"
        )
    return recipient


def envelope_limit(max_json_bytes: int, keys: int = 0) -> int:
    """The longest envelope (the base64 text on the wire) that a JSON payload of
    ``max_json_bytes`` may make: sealed for one recipient (``keys=0``), or in a
    hybrid envelope with ``keys`` recipient keys. Generous by a few hundred
    bytes, so that every official client's way of writing the envelope fits.

    >>> envelope_limit(1000) >= 1980  # what ensync's own sealing makes of 1,000 bytes
    True
    """
    ciphertext = 4 * -(-(max_json_bytes + _MAC_BYTES) // 3)  # base64 of the sealed bytes
    inner = ciphertext + _ENVELOPE_ROOM + _KEY_ROOM * keys
    return 4 * -(-inner // 3)


def largest_request(max_json_bytes: int, max_metadata_bytes: int) -> int:
    """The largest request (gRPC message, WebSocket frame) an allowed publish
    makes: the largest envelope, the metadata, and room for the rest."""
    return envelope_limit(max_json_bytes, MAX_HYBRID_KEYS) + max_metadata_bytes + 256 * 1024


def json_bytes_of(envelope_bytes: int) -> int:
    """About how many bytes of JSON a single envelope of this length holds."""
    return max(0, (envelope_bytes * 3 // 4 - _TYPICAL_ROOM) * 3 // 4 - _MAC_BYTES)


def check_payload(payload: str, max_json_bytes: int) -> None:
    """The payload must be base64 of a JSON envelope (single or hybrid), holding
    at most ``max_json_bytes`` of JSON.

    The engine never decrypts; it checks the shape only so that garbage is
    refused at the door instead of reaching every recipient, and bounds the
    envelope by what the largest allowed JSON payload makes.
    """
    if not payload:
        raise ServiceError.invalid("payload is empty")
    if len(payload) > envelope_limit(max_json_bytes, MAX_HYBRID_KEYS):
        raise _too_big(payload, max_json_bytes)
    try:
        envelope = strict_json(b64decode(payload))
    except ValueError:
        raise ServiceError.invalid("payload is not a base64-encoded JSON envelope") from None
    if not isinstance(envelope, dict):
        raise ServiceError.invalid("payload is not a JSON envelope object")
    if envelope.get("type") == "hybrid":
        keys = envelope.get("keys")
        if not isinstance(envelope.get("payload"), dict) or not isinstance(keys, dict):
            raise ServiceError.invalid("hybrid envelope lacks its 'payload' or 'keys' object")
        if len(keys) > MAX_HYBRID_KEYS:
            raise ServiceError.invalid(
                f"hybrid envelope has {len(keys)} recipient keys, more than {MAX_HYBRID_KEYS}"
            )
        if len(payload) > envelope_limit(max_json_bytes, len(keys)):
            raise _too_big(payload, max_json_bytes)
        return
    if len(payload) > envelope_limit(max_json_bytes):
        raise _too_big(payload, max_json_bytes)
    missing = [key for key in _SINGLE_KEYS if not isinstance(envelope.get(key), str)]
    if missing:
        raise ServiceError.invalid(f"payload envelope lacks {', '.join(missing)}")


def parse_metadata(text: str, max_bytes: int) -> PublishMetadata:
    """Metadata is a JSON object; ``persist`` defaults to true (PROTOCOL.md §4.6).

    An optional ``ttl_ms`` (positive integer) makes the message expire if it
    has not been delivered in time.
    """
    if not text:
        return PublishMetadata(text="{}", persist=True, ttl_ms=None)
    if len(text) > max_bytes:
        raise ServiceError.over_limit(
            "metadata_size", f"metadata is {len(text)} bytes, more than the limit of {max_bytes}"
        )
    try:
        value = strict_json(text)
    except ValueError:
        raise ServiceError.invalid("metadata is not valid JSON") from None
    if not isinstance(value, dict):
        raise ServiceError.invalid(f"metadata must be a JSON object, not {type(value).__name__}")
    persist = value.get("persist", True)
    if not isinstance(persist, bool):
        raise ServiceError.invalid("metadata.persist must be true or false")
    headers = value.get("headers", {})
    if not isinstance(headers, dict):
        raise ServiceError.invalid("metadata.headers must be a JSON object")
    ttl = value.get("ttl_ms")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_MS
    ):
        raise ServiceError.invalid(
            f"metadata.ttl_ms must be a whole number of ms between 1 and {MAX_TTL_MS} (a year)"
        )
    key = headers.get(IDEMPOTENCY_HEADER)
    if key is not None and (
        not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
    ):
        raise ServiceError.invalid(
            f"header {IDEMPOTENCY_HEADER} must be a string of 1-{MAX_IDEMPOTENCY_KEY_LENGTH} "
            "characters"
        )
    return PublishMetadata(text=text, persist=persist, ttl_ms=ttl, idempotency_key=key)


def parse_payload_metadata(text: str | None) -> str | None:
    """Advisory only (PROTOCOL.md §4.7): kept when it is JSON, dropped otherwise."""
    if not text:
        return None
    try:
        strict_json(text)
    except ValueError:
        return None
    return text
