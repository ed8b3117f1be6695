"""Strict standard base64, the only text encoding of bytes in PROTOCOL.md §4.1.

tweetnacl-util and Go reject unpadded or otherwise sloppy base64, so we
accept only what every official client would also accept, and always write
padded standard base64.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["b64decode", "b64encode"]


def b64encode(data: bytes) -> str:
    """Encode ``data`` as standard base64 with padding.

    >>> b64encode(b"\\x00\\x01")
    'AAE='
    """
    return base64.b64encode(data).decode("ascii")


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
    # strict_mode (3.11+) also rejects non-alphabet characters and excess
    # data after padding, which the default decoder silently skips.
    data = binascii.a2b_base64(raw, strict_mode=True)
    if len(raw) != -(-len(data) // 3) * 4:
        # Strict mode still takes padding past a whole quantum ("AAAA====").
        raise binascii.Error("excess padding")
    return data
