"""The two envelope shapes of a wire payload (PROTOCOL.md §4.2 and §4.3),
decoded and checked field by field; nothing is decrypted here.

See :mod:`ensync.crypto.envelope` for sealing and opening.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import orjson

from ensync.crypto._base64 import b64decode
from ensync.errors import EnSyncMessageError

__all__ = [
    "KEY_FIELDS",
    "MESSAGE_KEY_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "TAG_BYTES",
    "Box",
    "Envelope",
    "EnvelopeKind",
    "HybridEnvelope",
    "envelope_kind",
    "parse_envelope",
]

NONCE_BYTES = 24
"""Nonce length of ``box`` and ``secretbox`` (XSalsa20)."""

TAG_BYTES = 16
"""Poly1305 tag length; a sealed text is this much longer than the plain one."""

MESSAGE_KEY_BYTES = 32
"""Length of a hybrid envelope's message key."""

KEY_FIELDS = ("encryptedKey", "ciphertext")
"""Names of the sealed message key in a hybrid key entry, in reading order."""

PUBLIC_KEY_BYTES = 32

EnvelopeKind: TypeAlias = Literal["single", "hybrid"]


@dataclass(frozen=True, slots=True)
class Box:
    """A NaCl ``box``: a single envelope, or one entry of a hybrid key map.

    Attributes:
        nonce: 24 bytes.
        ciphertext: Poly1305 tag followed by the encrypted bytes.
        ephemeral_public_key: the sender's one-time X25519 public key.
    """

    nonce: bytes
    ciphertext: bytes = field(repr=False)
    ephemeral_public_key: bytes


@dataclass(frozen=True, slots=True)
class HybridEnvelope:
    """A hybrid envelope, decoded but not decrypted.

    Attributes:
        nonce: the ``secretbox`` nonce of the payload.
        ciphertext: the sealed payload (tag ‖ encrypted bytes).
        keys: ``(map key, boxed message key)`` pairs in document order.
    """

    nonce: bytes
    ciphertext: bytes = field(repr=False)
    keys: tuple[tuple[str, Box], ...]


Envelope: TypeAlias = Box | HybridEnvelope


def parse_envelope(wire_payload: str) -> Envelope:
    """Decode a wire payload into a :class:`Box` or :class:`HybridEnvelope`.

    Checks the shape and every field's base64 and length; decrypts nothing.

    Raises:
        EnSyncMessageError: the payload is not a known envelope.

    >>> from ensync.crypto.envelope import seal
    >>> from ensync.crypto.keys import keypair_from_seed
    >>> envelope = parse_envelope(seal(b"{}", keypair_from_seed(bytes(32)).app_id))
    >>> len(envelope.nonce), len(envelope.ciphertext)
    (24, 18)
    """
    document = _load(wire_payload)
    if _kind(document) == "single":
        return _parse_box(document, "ciphertext", "envelope")
    payload = _object(document, "payload", "hybrid envelope")
    keys = _object(document, "keys", "hybrid envelope")
    entries: list[tuple[str, Box]] = []
    for map_key, entry in keys.items():
        where = "hybrid key entry"
        if not isinstance(entry, dict):
            raise EnSyncMessageError(f"{where} is a {_json_type(entry)}, not an object")
        key_field = next((name for name in KEY_FIELDS if name in entry), None)
        if key_field is None:
            raise EnSyncMessageError(f"{where} has neither 'encryptedKey' nor 'ciphertext'")
        entries.append((map_key, _parse_box(entry, key_field, where)))
    if not entries:
        raise EnSyncMessageError("hybrid envelope has no recipient keys")
    return HybridEnvelope(
        nonce=_field(payload, "nonce", "hybrid payload", exact=NONCE_BYTES),
        ciphertext=_field(payload, "ciphertext", "hybrid payload", minimum=TAG_BYTES),
        keys=tuple(entries),
    )


def envelope_kind(wire_payload: str) -> EnvelopeKind:
    """Tell a single envelope from a hybrid one without decoding its fields.

    Raises:
        EnSyncMessageError: the payload is not base64 JSON of either shape.

    >>> from ensync.crypto.envelope import seal
    >>> from ensync.crypto.keys import keypair_from_seed
    >>> envelope_kind(seal(b"{}", keypair_from_seed(bytes(32)).app_id))
    'single'
    """
    return _kind(_load(wire_payload))


# -- parsing helpers -------------------------------------------------------


def _load(wire_payload: str) -> dict[str, Any]:
    if not isinstance(wire_payload, str | bytes):
        raise EnSyncMessageError(f"payload must be text, not {type(wire_payload).__name__}")
    try:
        raw = b64decode(wire_payload)
    except ValueError:
        raise EnSyncMessageError(
            f"payload is not standard padded base64 ({len(wire_payload)} characters)"
        ) from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The standard library has the last word (and the clearer message).
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnSyncMessageError(f"payload is not UTF-8 JSON: {_brief(exc)}") from None
    if not isinstance(document, dict):
        raise EnSyncMessageError(f"envelope is {_json_type(document)}, not a JSON object")
    return document


def _kind(document: dict[str, Any]) -> EnvelopeKind:
    kind = document.get("type")
    if kind == "hybrid":
        return "hybrid"
    if kind is not None:
        raise EnSyncMessageError(f"unknown envelope type {str(kind)[:40]!r}")
    if "ephemeralPublicKey" in document:
        return "single"
    raise EnSyncMessageError("envelope is neither single (no 'ephemeralPublicKey') nor hybrid")


def _parse_box(document: dict[str, Any], key_field: str, where: str) -> Box:
    return Box(
        nonce=_field(document, "nonce", where, exact=NONCE_BYTES),
        ciphertext=_field(document, key_field, where, minimum=TAG_BYTES),
        ephemeral_public_key=_field(document, "ephemeralPublicKey", where, exact=PUBLIC_KEY_BYTES),
    )


def _object(document: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = document.get(name)
    if not isinstance(value, dict):
        raise EnSyncMessageError(f"{where} field {name!r} is {_json_type(value)}, not an object")
    return value


def _field(
    document: dict[str, Any],
    name: str,
    where: str,
    *,
    exact: int | None = None,
    minimum: int = 0,
) -> bytes:
    value = document.get(name)
    if not isinstance(value, str):
        raise EnSyncMessageError(f"{where} field {name!r} is {_json_type(value)}, not a string")
    try:
        raw = b64decode(value)
    except ValueError:
        raise EnSyncMessageError(f"{where} field {name!r} is not standard padded base64") from None
    if exact is not None and len(raw) != exact:
        raise EnSyncMessageError(f"{where} field {name!r} has {len(raw)} bytes, expected {exact}")
    if len(raw) < minimum:
        raise EnSyncMessageError(
            f"{where} field {name!r} has {len(raw)} bytes, at least {minimum} expected"
        )
    return raw


def _json_type(value: object) -> str:
    # Name the JSON type rather than echo the value, which may be large.
    if value is None:
        return "missing or null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _brief(exc: ValueError) -> str:
    # json errors carry a position, never the document; unicode errors the
    # offending byte. Either is safe and useful; cap the length regardless.
    return str(exc)[:120]
