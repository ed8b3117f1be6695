"""Identifiers and secrets the engine issues.

Every value here uses only ``[A-Za-z0-9_-]`` so it survives the official
clients' parsers: ids are joined with ``,`` and embedded in ``;``-separated
WebSocket lines, and the CONN reply breaks on ``,``, ``=``, braces and
spaces (PROTOCOL.md §2.8, §3.6, §7.2).
"""

from __future__ import annotations

import hashlib
import secrets

from ensync._entropy import random_bytes
from ensync.protocol.tags import client_tag
from ensync.server.store.idems import B32 as _B32
from ensync.server.store.idems import SLOT_BITS, slot_bits

__all__ = [
    "APP_KEY_PREFIX",
    "client_tag",
    "hash_app_key",
    "idem_slot",
    "new_app_key",
    "new_client_hash",
    "new_client_id",
    "new_idem",
]

APP_KEY_PREFIX = "ensk_"


# Every pair of digits (10 bits), so that 26 digits take 13 lookups.
_PAIRS = [high + low for high in _B32 for low in _B32]
_PAIR_SHIFTS = tuple(range(120, -1, -10))


_SLOT_MASK = (1 << SLOT_BITS) - 1


def new_idem(now_ms: int, slot: int | None = None) -> str:
    """A 26-character, time-sortable, unguessable message id.

    48 bits of milliseconds then 80 random bits, in Crockford base32 (the
    ULID layout): sorting idems as text sorts them by creation time, and the
    random part cannot be guessed.

    With ``slot`` (the partition's slot, :mod:`ensync.server.store.ownership`),
    the last :data:`SLOT_BITS` bits are the slot instead of random ones, so
    that any engine node finds a message's owner from its idem alone
    (:func:`idem_slot`); 70 random bits remain.
    """
    random = int.from_bytes(random_bytes(10))
    if slot is not None:
        if not 0 <= slot <= _SLOT_MASK:
            raise ValueError(f"a slot an idem carries is 0 to {_SLOT_MASK}, not {slot}")
        random = (random & ~_SLOT_MASK) | slot
    value = ((now_ms & ((1 << 48) - 1)) << 80) | random
    pairs = _PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


def idem_slot(idem: str) -> int:
    """The slot an idem made by ``new_idem(..., slot=...)`` carries.

    Raises:
        ValueError: ``idem`` is not an idem of this engine.
    """
    slot = slot_bits(idem)
    if slot is None:
        raise ValueError(f"not an idem of this engine: {idem[:40]!r}")
    return slot


def new_client_id() -> str:
    """A bearer credential for one connection: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def new_client_hash() -> str:
    """An opaque per-connection token. Clients store it; none sends it back."""
    return secrets.token_hex(16)


def new_app_key() -> str:
    """A 256-bit random app key, shown to the operator once."""
    return APP_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_app_key(app_key: str) -> bytes:
    """The stored form of an app key.

    A plain SHA-256 suffices: keys carry 256 bits of entropy, so there is
    nothing for a slow hash or a salt to protect, and the digest doubles as
    the lookup index.
    """
    return hashlib.sha256(app_key.encode("utf-8")).digest()
