"""App identities and their X25519 forms (PROTOCOL.md §1 and §4.1).

An app is identified by an Ed25519 key pair:

* **app id**: standard base64 (with padding) of the 32-byte Ed25519 public
  key. It is public and travels as ``delivery_to`` and ``sender``.
* **secret key**: standard base64 of 64 bytes, the 32-byte seed followed by
  the public key (the tweetnacl layout). It never leaves the app.

Envelopes are sealed with X25519, so both halves are converted with the
standard birational map (libsodium ``crypto_sign_ed25519_*_to_curve25519``,
tweetnacl ``ed2curve``). Conversions are cached per key: the publish and
receive paths call them for every message and must not redo the curve
arithmetic each time. :func:`clear_key_caches` forgets the cached secrets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.exceptions import CryptoError

from ensync.crypto import _sodium
from ensync.crypto._base64 import b64decode, b64encode
from ensync.errors import EnSyncValidationError

__all__ = [
    "APP_ID_BYTES",
    "SECRET_KEY_BYTES",
    "SEED_BYTES",
    "X25519_SECRET_BYTES",
    "KeyPair",
    "OpeningKey",
    "clear_key_caches",
    "decode_app_id",
    "decode_secret_key",
    "generate_keypair",
    "is_app_id",
    "keypair_from_seed",
    "opening_key",
    "x25519_public",
    "x25519_secret",
]

APP_ID_BYTES = 32
"""Length of an Ed25519 public key, the bytes behind an app id."""

SEED_BYTES = 32
"""Length of an Ed25519 seed."""

SECRET_KEY_BYTES = 64
"""Length of a secret key in the tweetnacl layout: seed ‖ public key."""

X25519_SECRET_BYTES = 32
"""Length of a bare X25519 scalar, the other secret form Python clients accept."""

# An app talks to a bounded set of peers, but a server-side fan-out or a busy
# client may address thousands; 4096 entries of ~200 bytes stay well under
# a megabyte. Secrets are few per process (one per app or handler).
_PUBLIC_CACHE_SIZE = 4096
_SECRET_CACHE_SIZE = 64


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An app's identity: the public app id and the matching secret key.

    Both are base64 text exactly as the official clients store them. The
    secret key is left out of ``repr()`` so that logging a key pair cannot
    leak it.

    >>> pair = keypair_from_seed(bytes(32))
    >>> pair.app_id
    'O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik='
    >>> "secret_key" in repr(pair)
    False
    """

    app_id: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class OpeningKey:
    """A secret key made ready to open envelopes; see :func:`opening_key`.

    Attributes:
        x25519_secret: the X25519 scalar that opens boxes sealed to this app.
        x25519_public: the matching X25519 public key.
        map_keys: the ``keys`` map entries of a hybrid envelope that name this
            app in some dialect (app id, hex public keys); readers try these
            entries first and then every other one (PROTOCOL.md §4.3).
        app_id: the app id this secret key belongs to (``None`` for a bare
            32-byte X25519 secret, which has none).
    """

    x25519_secret: bytes = field(repr=False)
    x25519_public: bytes
    map_keys: frozenset[str]
    app_id: str | None = None


def generate_keypair() -> KeyPair:
    """Make a fresh random Ed25519 key pair for a new app.

    >>> pair = generate_keypair()
    >>> len(decode_app_id(pair.app_id)), len(decode_secret_key(pair.secret_key))
    (32, 64)
    """
    public, secret = _sodium.bindings.crypto_sign_keypair()
    return KeyPair(app_id=b64encode(public), secret_key=b64encode(secret))


def keypair_from_seed(seed: bytes) -> KeyPair:
    """Derive the key pair of a 32-byte Ed25519 seed (deterministic).

    Same result as tweetnacl ``nacl.sign.keyPair.fromSeed``.

    Raises:
        EnSyncValidationError: ``seed`` is not 32 bytes.

    >>> keypair_from_seed(bytes(32)) == keypair_from_seed(bytes(32))
    True
    """
    if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != SEED_BYTES:
        raise EnSyncValidationError(f"seed must be {SEED_BYTES} bytes")
    public, secret = _sodium.bindings.crypto_sign_seed_keypair(bytes(seed))
    return KeyPair(app_id=b64encode(public), secret_key=b64encode(secret))


def decode_app_id(app_id: str) -> bytes:
    """Return the 32-byte Ed25519 public key an app id stands for.

    Strict: only standard base64 with padding of exactly 32 bytes, in its
    canonical spelling. The server routes by the app id *string*, so two
    spellings of one key would be two different apps.

    This checks the form only; :func:`x25519_public` also checks that the
    bytes are a usable curve point.

    Raises:
        EnSyncValidationError: ``app_id`` is not such a string.

    >>> decode_app_id("O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=")[:4].hex()
    '3b6a27bc'
    """
    if not isinstance(app_id, str):
        raise EnSyncValidationError(f"app id must be a str, not {type(app_id).__name__}")
    # Never echo the value: a secret key passed here by mistake would leak.
    try:
        raw = b64decode(app_id)
    except ValueError:
        raise EnSyncValidationError(
            f"app id is not standard padded base64 ({len(app_id)} characters)"
        ) from None
    if len(raw) != APP_ID_BYTES:
        raise EnSyncValidationError(
            f"app id must encode {APP_ID_BYTES} bytes, this one encodes {len(raw)}"
        )
    if b64encode(raw) != app_id:
        raise EnSyncValidationError("app id is not in canonical base64 form")
    return raw


def is_app_id(text: str) -> bool:
    """Tell whether ``text`` has the form of an app id (see :func:`decode_app_id`).

    >>> is_app_id("O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=")
    True
    >>> is_app_id("not an app id")
    False
    """
    try:
        decode_app_id(text)
    except EnSyncValidationError:
        return False
    return True


def decode_secret_key(secret: str) -> bytes:
    """Return the raw bytes of a base64 secret key: 64 or 32 bytes.

    * 64 bytes: the tweetnacl layout, seed ‖ public key (what
      :func:`generate_keypair` makes and every official client accepts).
    * 32 bytes: taken as a bare **X25519 scalar**, as the official Python
      clients do. Beware: the Go clients read 32 bytes as an Ed25519 *seed*
      instead, so such a key means different things to different clients;
      prefer the 64-byte form.

    Raises:
        EnSyncValidationError: not strict base64, or another length.

    >>> len(decode_secret_key(keypair_from_seed(bytes(32)).secret_key))
    64
    """
    if not isinstance(secret, str):
        raise EnSyncValidationError(f"secret key must be a str, not {type(secret).__name__}")
    try:
        raw = b64decode(secret)
    except ValueError:
        raise EnSyncValidationError("secret key is not standard padded base64") from None
    _check_secret_length(raw)
    return raw


def x25519_public(app_id_or_raw: str | bytes) -> bytes:
    """Convert an app id (or its raw 32-byte Ed25519 key) to an X25519 public key.

    Cached per key. Stricter than tweetnacl's ``ed2curve``: libsodium also
    rejects small-order points (whose converted key would let anyone read
    what is sealed to it) and non-canonical encodings.

    Raises:
        EnSyncValidationError: not an app id, or not a usable Ed25519 key.

    >>> x25519_public("O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=")[:4].hex()
    '5bf55c73'
    """
    if isinstance(app_id_or_raw, bytearray | memoryview):
        app_id_or_raw = bytes(app_id_or_raw)
    if not isinstance(app_id_or_raw, str | bytes):
        raise EnSyncValidationError(
            f"public key must be an app id or bytes, not {type(app_id_or_raw).__name__}"
        )
    return _x25519_public_cached(app_id_or_raw)


def x25519_secret(secret: str | bytes) -> bytes:
    """Convert a secret key (base64 text or raw bytes) to its X25519 scalar.

    A 64-byte key is converted as libsodium and ``ed2curve`` do (SHA-512 of
    the seed, clamped); only the seed half is used. A 32-byte key is already
    an X25519 scalar and is returned as is (see :func:`decode_secret_key`).
    Cached per key.

    Raises:
        EnSyncValidationError: not a secret key of 64 or 32 bytes.

    >>> len(x25519_secret(keypair_from_seed(bytes(32)).secret_key))
    32
    """
    return opening_key(secret).x25519_secret


def opening_key(secret: str | bytes) -> OpeningKey:
    """Prepare a secret key (base64 text or raw bytes) for opening envelopes.

    The result is cached per key, so calling this for every message is cheap.

    Raises:
        EnSyncValidationError: not a secret key of 64 or 32 bytes.

    >>> key = opening_key(keypair_from_seed(bytes(32)).secret_key)
    >>> "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=" in key.map_keys
    True
    """
    if isinstance(secret, bytearray | memoryview):
        secret = bytes(secret)
    if not isinstance(secret, str | bytes):
        raise EnSyncValidationError(
            f"secret key must be base64 text or bytes, not {type(secret).__name__}"
        )
    return _opening_key_cached(secret)


def clear_key_caches() -> None:
    """Forget every cached key conversion, secrets included.

    Call it after rotating keys if the old secrets must not stay in memory.
    """
    _x25519_public_cached.cache_clear()
    _opening_key_cached.cache_clear()
    for clear in _MORE_CACHES:
        clear()


# Caches elsewhere in the crypto package that hold secrets (envelope's
# shared keys) register their clearing here.
_MORE_CACHES: list[Callable[[], None]] = []


def _check_secret_length(raw: bytes) -> None:
    if len(raw) not in (SECRET_KEY_BYTES, X25519_SECRET_BYTES):
        raise EnSyncValidationError(
            f"secret key must be {SECRET_KEY_BYTES} bytes (seed and public key) "
            f"or {X25519_SECRET_BYTES} bytes (X25519 scalar), not {len(raw)}"
        )


@functools.lru_cache(maxsize=_PUBLIC_CACHE_SIZE)
def _x25519_public_cached(app_id_or_raw: str | bytes) -> bytes:
    if isinstance(app_id_or_raw, str):
        raw = decode_app_id(app_id_or_raw)
    elif len(app_id_or_raw) != APP_ID_BYTES:
        raise EnSyncValidationError(
            f"public key must be {APP_ID_BYTES} bytes, not {len(app_id_or_raw)}"
        )
    else:
        raw = app_id_or_raw
    try:
        return _sodium.bindings.crypto_sign_ed25519_pk_to_curve25519(raw)
    except CryptoError:
        raise EnSyncValidationError(
            "public key is not a usable Ed25519 key (not a curve point, or of small order)"
        ) from None


@functools.lru_cache(maxsize=_SECRET_CACHE_SIZE)
def _opening_key_cached(secret: str | bytes) -> OpeningKey:
    if isinstance(secret, str):
        raw = decode_secret_key(secret)
    else:
        _check_secret_length(secret)
        raw = secret
    map_keys: set[str] = set()
    app_id: str | None = None
    if len(raw) == SECRET_KEY_BYTES:
        seed = raw[:SEED_BYTES]
        # Derive the public key from the seed rather than trusting the stored
        # second half: decryption only ever uses the seed.
        ed_public, _ = _sodium.bindings.crypto_sign_seed_keypair(seed)
        scalar = _sodium.bindings.crypto_sign_ed25519_sk_to_curve25519(seed + ed_public)
        app_id = b64encode(ed_public)
        map_keys.update((app_id, ed_public.hex()))
    else:
        scalar = raw
    public = _sodium.bindings.crypto_scalarmult_base(scalar)
    map_keys.update((b64encode(public), public.hex()))
    return OpeningKey(
        x25519_secret=scalar, x25519_public=public, map_keys=frozenset(map_keys), app_id=app_id
    )
