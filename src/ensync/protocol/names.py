"""Message names: hierarchical, ``orders/status/updated``.

Names are restricted to ``[A-Za-z0-9_.-]`` segments joined by ``/`` so that
they can never be ambiguous inside a WebSocket command line (PROTOCOL.md
§3.4 rule 5) and never need escaping anywhere.
"""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_LENGTH", "is_valid_name", "validate_name"]

MAX_NAME_LENGTH = 255

_NAME = re.compile(r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*")


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a well-formed message name.

    >>> is_valid_name("orders/status/updated")
    True
    >>> is_valid_name("orders//updated")
    False
    """
    return 0 < len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def validate_name(name: object) -> str:
    """Return ``name`` if it is a well-formed message name, else raise ``ValueError``
    with a message that says what is wrong."""
    if not isinstance(name, str):
        raise ValueError(f"message name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("message name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"message name is longer than {MAX_NAME_LENGTH} characters")
    if _NAME.fullmatch(name) is None:
        raise ValueError(
            f"malformed message name {name!r}: use segments of letters, digits, '_', '.', '-' "
            "separated by single '/'"
        )
    return name
