"""Strict standard base64, the only text encoding of bytes in PROTOCOL.md §4.1.

tweetnacl-util and Go reject unpadded or otherwise sloppy base64, so we
accept only what every official client would also accept, and always write
padded standard base64.

pybase64 (SIMD) does the work: every message's envelope is decoded by the
engine and the recipient and encoded by the sender, and the standard
library's codec costs about eight times as much on a 2 KB envelope.
"""

from __future__ import annotations

import pybase64

__all__ = ["b64decode", "b64encode"]


def b64encode(data: bytes) -> str:
    """Encode ``data`` as standard base64 with padding.

    >>> b64encode(b"\\x00\\x01")
    'AAE='
    """
    return pybase64.b64encode(data).decode("ascii")


def b64decode(text: str | bytes) -> bytes:
    """Decode standard base64 with padding, refusing anything else.

    Whitespace, URL-safe characters, missing or misplaced padding and data
    after the padding are all errors.

    Raises:
        ValueError: ``text`` is not strict standard base64.

    >>> b64decode("AAE=")
    b'\\x00\\x01'
    """
    raw = text.encode("ascii") if isinstance(text, str) else text
    # validate=True refuses every character outside the alphabet and any
    # padding but the one or two '=' that end the last quantum (the
    # standard library's strict mode still takes "AAAA====").
    return pybase64.b64decode(raw, validate=True)
