"""End-to-end encryption of EnSync payloads (PROTOCOL.md §4).

Sans-I/O and the only user of PyNaCl in ensync. Typical use::

    from ensync.crypto import generate_keypair, open_payload, seal

    bob = generate_keypair()
    wire = seal(b'{"hello":"world"}', bob.app_id)    # the publish payload
    open_payload(wire, bob.secret_key)                # b'{"hello":"world"}'

Bad keys or arguments raise :class:`~ensync.errors.EnSyncValidationError`;
payloads that cannot be parsed or decrypted raise
:class:`~ensync.errors.EnSyncMessageError`.
"""

from __future__ import annotations

from ensync.crypto.envelope import (
    KEY_FIELDS,
    MESSAGE_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    Box,
    Envelope,
    EnvelopeKind,
    HybridEnvelope,
    Sealer,
    envelope_kind,
    open_envelope,
    open_payload,
    parse_envelope,
    seal,
    seal_hybrid,
)
from ensync.crypto.keys import (
    APP_ID_BYTES,
    SECRET_KEY_BYTES,
    SEED_BYTES,
    X25519_SECRET_BYTES,
    KeyPair,
    OpeningKey,
    clear_key_caches,
    decode_app_id,
    decode_secret_key,
    generate_keypair,
    is_app_id,
    keypair_from_seed,
    opening_key,
    x25519_public,
    x25519_secret,
)

__all__ = [
    "APP_ID_BYTES",
    "KEY_FIELDS",
    "MESSAGE_KEY_BYTES",
    "NONCE_BYTES",
    "SECRET_KEY_BYTES",
    "SEED_BYTES",
    "TAG_BYTES",
    "X25519_SECRET_BYTES",
    "Box",
    "Envelope",
    "EnvelopeKind",
    "HybridEnvelope",
    "KeyPair",
    "OpeningKey",
    "Sealer",
    "clear_key_caches",
    "decode_app_id",
    "decode_secret_key",
    "envelope_kind",
    "generate_keypair",
    "is_app_id",
    "keypair_from_seed",
    "open_envelope",
    "open_payload",
    "opening_key",
    "parse_envelope",
    "seal",
    "seal_hybrid",
    "x25519_public",
    "x25519_secret",
]
