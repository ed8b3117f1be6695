"""Sealing and opening message payloads (PROTOCOL.md §4.2 and §4.3).

The wire ``payload`` of a publish is base64 of the UTF-8 JSON of an envelope.
Two envelope shapes exist:

* **single** (§4.2), readable by every official client::

    {"nonce": b64(24), "ciphertext": b64(tag ‖ ct), "ephemeralPublicKey": b64(32)}

  NaCl ``box`` from a fresh X25519 key pair to the recipient's converted key.

* **hybrid** (§4.3): the payload sealed once with ``secretbox`` under a
  random 32-byte message key, and that key boxed to each recipient::

    {"type": "hybrid", "payload": {"nonce": …, "ciphertext": …},
     "keys": {<map key>: {"nonce": …, <key field>: …, "ephemeralPublicKey": …}}}

  Node clients write map key = app id and key field ``encryptedKey``; Python
  clients write hex public keys and ``ciphertext``; Go writes app ids and
  ``ciphertext``. We write the Node dialect (the only one another official
  client can read) and read all three, trying every entry of ``keys``.

Everything here is pure computation on bytes and text: no I/O, no clock.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from nacl.exceptions import CryptoError

from ensync._entropy import EntropyBuffer
from ensync._json import dumps_compact
from ensync.crypto import _sodium
from ensync.crypto._base64 import b64encode
from ensync.crypto.envelope_wire import (
    KEY_FIELDS,
    MESSAGE_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    Box,
    Envelope,
    EnvelopeKind,
    HybridEnvelope,
    envelope_kind,
    parse_envelope,
)
from ensync.crypto.keys import _MORE_CACHES as _KEY_CACHES
from ensync.crypto.keys import OpeningKey, opening_key, x25519_public
from ensync.errors import EnSyncMessageError, EnSyncValidationError

__all__ = [
    "KEY_FIELDS",
    "MESSAGE_KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "Box",
    "Envelope",
    "EnvelopeKind",
    "HybridEnvelope",
    "Sealer",
    "envelope_kind",
    "open_envelope",
    "open_payload",
    "parse_envelope",
    "seal",
    "seal_hybrid",
]


def seal(plaintext: bytes, recipient_app_id: str) -> str:
    """Seal ``plaintext`` for one recipient as a single envelope (§4.2).

    Every official client can open the result. ``plaintext`` is normally the
    UTF-8 JSON of the message payload.

    Returns:
        The wire payload: base64 of the envelope JSON.

    Raises:
        EnSyncValidationError: ``recipient_app_id`` is not a usable app id,
            or ``plaintext`` is not bytes.

    >>> from ensync.crypto.keys import keypair_from_seed
    >>> bob = keypair_from_seed(bytes(32))
    >>> open_payload(seal(b'{"hi":1}', bob.app_id), bob.secret_key)
    b'{"hi":1}'
    """
    data = _plaintext_bytes(plaintext)
    box = _box(data, x25519_public(recipient_app_id))
    return _to_wire(_box_json(box, "ciphertext"))


class Sealer:
    """Seals single envelopes, optionally reusing an ephemeral key pair per
    recipient for ``reuse_ms`` (then the shared key is computed once, and
    sealing a message costs one XSalsa20-Poly1305 pass instead of two X25519
    operations). The envelope format is the same, so every client opens it.

    The trade-off (docs/security.md): with reuse, forward secrecy holds per
    window instead of per message (the ephemeral secret lives for the window),
    and messages to one recipient within a window share their
    ``ephemeralPublicKey``, so an observer can tell they came from the same
    sender. ``reuse_ms=0`` (the default) uses a fresh key pair per message, as
    the official clients do.

    Example::

        sealer = Sealer(reuse_ms=60_000)
        payload = sealer.seal(b'{"orderId":"o-1"}', recipient_app_id, now_ms)
    """

    def __init__(self, reuse_ms: int = 0, *, max_recipients: int = 4096) -> None:
        if reuse_ms < 0:
            raise ValueError(f"reuse_ms must not be negative, not {reuse_ms}")
        self.reuse_ms = reuse_ms
        self._max = max_recipients
        # recipient app id -> (ephemeral public, shared key, created at ms)
        self._keys: OrderedDict[str, tuple[bytes, bytes, int]] = OrderedDict()

    def seal(self, plaintext: bytes, recipient_app_id: str, now_ms: int) -> str:
        """:func:`seal`, reusing this recipient's key pair while it is fresh."""
        if self.reuse_ms <= 0:
            return seal(plaintext, recipient_app_id)
        data = _plaintext_bytes(plaintext)
        held = self._keys.get(recipient_app_id)
        if held is None or now_ms - held[2] >= self.reuse_ms or now_ms < held[2]:
            ephemeral_public, ephemeral_secret = _sodium.bindings.crypto_box_keypair()
            shared = _sodium.bindings.crypto_box_beforenm(
                x25519_public(recipient_app_id), ephemeral_secret
            )
            held = (ephemeral_public, shared, now_ms)
            self._keys[recipient_app_id] = held
            if len(self._keys) > self._max:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(recipient_app_id)
        nonce = _nonce()
        sealed = _sodium.bindings.crypto_box_easy_afternm(data, nonce, held[1])
        box = Box(nonce=nonce, ciphertext=sealed, ephemeral_public_key=held[0])
        return _to_wire(_box_json(box, "ciphertext"))

    def forget(self) -> None:
        """Drop every reused key pair now (the next seal makes fresh ones)."""
        self._keys.clear()


def seal_hybrid(plaintext: bytes, recipient_app_ids: Sequence[str]) -> str:
    """Seal ``plaintext`` once for several recipients as a hybrid envelope (§4.3).

    Writes the Node clients' dialect (map key = app id, key field
    ``encryptedKey``): ensync and the Node clients can open it, the Python
    and Go clients cannot. Duplicate recipients are listed once. The same
    wire payload is then published once per recipient.

    Returns:
        The wire payload: base64 of the envelope JSON.

    Raises:
        EnSyncValidationError: no recipients, a recipient that is not a
            usable app id, or ``plaintext`` that is not bytes.

    >>> from ensync.crypto.keys import keypair_from_seed
    >>> a, b = keypair_from_seed(bytes(32)), keypair_from_seed(bytes(31) + b"\\1")
    >>> wire = seal_hybrid(b"{}", [a.app_id, b.app_id])
    >>> open_payload(wire, a.secret_key), open_payload(wire, b.secret_key)
    (b'{}', b'{}')
    """
    data = _plaintext_bytes(plaintext)
    # A str is a Sequence[str] too; one app id here would be split into letters.
    if isinstance(recipient_app_ids, str):
        raise EnSyncValidationError("recipient_app_ids must be a sequence of app ids, not a str")
    recipients = list(dict.fromkeys(recipient_app_ids))
    if not recipients:
        raise EnSyncValidationError("seal_hybrid needs at least one recipient app id")
    # Convert every key before sealing anything, so a bad id fails cleanly.
    publics = [(app_id, x25519_public(app_id)) for app_id in recipients]

    message_key = _sodium.bindings.randombytes(MESSAGE_KEY_BYTES)
    nonce = _nonce()
    sealed = _sodium.bindings.crypto_secretbox_easy(data, nonce, message_key)
    keys = {
        app_id: _box_json(_box(message_key, public), "encryptedKey") for app_id, public in publics
    }
    envelope = {
        "type": "hybrid",
        "payload": {"nonce": b64encode(nonce), "ciphertext": b64encode(sealed)},
        "keys": keys,
    }
    return _to_wire(envelope)


def open_payload(wire_payload: str, secret_key: str | bytes) -> bytes:
    """Decrypt a wire payload in any envelope form ensync knows.

    Reads single envelopes and hybrid ones in all three dialects (either key
    field, any map key). ``secret_key`` is base64 text or raw bytes, 64 bytes
    (tweetnacl layout) or 32 (bare X25519 scalar); its conversion is cached.

    Returns:
        The plaintext bytes (normally UTF-8 JSON).

    Raises:
        EnSyncValidationError: ``secret_key`` is not a secret key.
        EnSyncMessageError: the payload is malformed, was changed, or was
            not sealed for this key.

    >>> from ensync.crypto.keys import keypair_from_seed
    >>> bob = keypair_from_seed(bytes(32))
    >>> open_payload(seal(b"{}", bob.app_id), bob.secret_key)
    b'{}'
    """
    key = opening_key(secret_key)
    return open_envelope(parse_envelope(wire_payload), key)


def open_envelope(envelope: Envelope, secret_key: str | bytes | OpeningKey) -> bytes:
    """Decrypt an envelope from :func:`parse_envelope`; see :func:`open_payload`.

    >>> from ensync.crypto.keys import keypair_from_seed
    >>> bob = keypair_from_seed(bytes(32))
    >>> envelope = parse_envelope(seal(b"{}", bob.app_id))
    >>> open_envelope(envelope, bob.secret_key)
    b'{}'
    """
    key = secret_key if isinstance(secret_key, OpeningKey) else opening_key(secret_key)
    if isinstance(envelope, Box):
        plaintext = _open_box(envelope, key)
        if plaintext is None:
            raise EnSyncMessageError(
                "cannot decrypt the message: not sealed for this key, or changed in transit"
            )
        return plaintext
    message_key = _open_message_key(envelope, key)
    try:
        return _sodium.bindings.crypto_secretbox_open_easy(
            envelope.ciphertext, envelope.nonce, message_key
        )
    except CryptoError:
        # The key entry authenticated, so the sender meant us: the payload
        # itself was changed (or sealed under another key by a broken sender).
        raise EnSyncMessageError(
            "cannot decrypt the hybrid payload with its message key: changed in transit"
        ) from None


# -- sealing helpers -------------------------------------------------------


def _fill(count: int) -> bytes:
    return _sodium.bindings.randombytes(count)


# Nonces need to be unique, not secret: buffered, they save a system call per
# message. Refilled through libsodium rather than os.urandom, which lets go of
# the GIL (see _sodium): one seal in ~170 could then wait for a busy thread.
_NONCES = EntropyBuffer(fill=_fill)
os.register_at_fork(after_in_child=_NONCES.forget)


def _nonce() -> bytes:
    return _NONCES.take(NONCE_BYTES)


def _plaintext_bytes(plaintext: bytes) -> bytes:
    if isinstance(plaintext, bytearray | memoryview):
        return bytes(plaintext)
    if not isinstance(plaintext, bytes):
        raise EnSyncValidationError(
            f"plaintext must be bytes (UTF-8 of the JSON payload), not {type(plaintext).__name__}"
        )
    return plaintext


def _box(message: bytes, recipient_public: bytes) -> Box:
    # A fresh key pair per box: the envelope carries no sender identity, and
    # reusing the ephemeral secret would link messages to each other.
    ephemeral_public, ephemeral_secret = _sodium.bindings.crypto_box_keypair()
    nonce = _nonce()
    sealed = _sodium.bindings.crypto_box_easy(message, nonce, recipient_public, ephemeral_secret)
    return Box(nonce=nonce, ciphertext=sealed, ephemeral_public_key=ephemeral_public)


def _box_json(box: Box, key_field: str) -> dict[str, str]:
    # Field order as the Node clients write it; readers do not depend on it.
    return {
        "nonce": b64encode(box.nonce),
        key_field: b64encode(box.ciphertext),
        "ephemeralPublicKey": b64encode(box.ephemeral_public_key),
    }


def _to_wire(envelope: dict[str, Any]) -> str:
    # Compact, as JSON.stringify writes it (the envelope holds ASCII text only).
    return b64encode(dumps_compact(envelope))


# -- opening helpers -------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _shared_key(ephemeral_public: bytes, secret: bytes) -> bytes:
    # A sender that reuses its ephemeral key pair (Sealer) makes this a hit:
    # one X25519 operation per window instead of per message.
    return _sodium.bindings.crypto_box_beforenm(ephemeral_public, secret)


_KEY_CACHES.append(_shared_key.cache_clear)


def _open_box(box: Box, key: OpeningKey) -> bytes | None:
    try:
        shared = _shared_key(box.ephemeral_public_key, key.x25519_secret)
        return _sodium.bindings.crypto_box_open_easy_afternm(box.ciphertext, box.nonce, shared)
    except CryptoError:
        # Wrong key, changed data, or a small-order ephemeral key that
        # libsodium refuses: all mean "not for us" to the caller.
        return None


def _open_message_key(envelope: HybridEnvelope, key: OpeningKey) -> bytes:
    # Entries whose map key names us go first so the usual case costs one
    # X25519 operation; the rest follow because map keys are not trustworthy
    # (three dialects, and PROTOCOL.md §4.3 says to try every entry).
    ordered = sorted(envelope.keys, key=lambda item: not _names_us(item[0], key))
    for _, box in ordered:
        message_key = _open_box(box, key)
        if message_key is None:
            continue
        if len(message_key) != MESSAGE_KEY_BYTES:
            raise EnSyncMessageError(
                f"hybrid message key has {len(message_key)} bytes, expected {MESSAGE_KEY_BYTES}"
            )
        return message_key
    raise EnSyncMessageError(
        f"cannot decrypt the message: none of the {len(ordered)} hybrid key entries "
        "opens with this key (not a recipient, or changed in transit)"
    )


def _names_us(map_key: str, key: OpeningKey) -> bool:
    return map_key in key.map_keys or map_key.lower() in key.map_keys
