"""Message names: hierarchical, ``orders/status/updated``.

Names are restricted to ``[A-Za-z0-9_.-]`` segments joined by ``/`` so that
they can never be ambiguous inside a WebSocket command line (PROTOCOL.md
§3.4 rule 5) and never need escaping anywhere.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_NAME_LENGTH",
    "allowed",
    "is_valid_name",
    "matches",
    "validate_name",
    "validate_pattern",
]

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


# --- patterns ---------------------------------------------------------------
#
# Authorization rules name the messages an app may publish or subscribe to
# with patterns over the same segments: ``*`` stands for exactly one segment,
# a final ``#`` for any number of trailing segments (none included), and any
# other segment matches itself. ``#`` alone matches every name.

_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+")


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a well-formed name pattern, else raise ``ValueError``.

    >>> validate_pattern("orders/*/updated")
    'orders/*/updated'
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a name pattern must be a non-empty string")
    if len(pattern) > MAX_NAME_LENGTH:
        raise ValueError(f"name pattern is longer than {MAX_NAME_LENGTH} characters")
    segments = pattern.split("/")
    for index, segment in enumerate(segments):
        if segment == "#":
            if index != len(segments) - 1:
                raise ValueError(f"in pattern {pattern!r}, '#' may only be the last segment")
        elif segment != "*" and _SEGMENT.fullmatch(segment) is None:
            raise ValueError(
                f"malformed pattern {pattern!r}: segments are names, '*' (one segment) "
                "or a final '#' (any rest)"
            )
    return pattern


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (see the pattern rules above).

    >>> matches("orders/*", "orders/created"), matches("orders/*", "orders/a/b")
    (True, False)
    >>> matches("billing/#", "billing"), matches("billing/#", "billing/x/y")
    (True, True)
    """
    wanted = pattern.split("/")
    parts = name.split("/")
    for index, segment in enumerate(wanted):
        if segment == "#":
            return True
        if index >= len(parts) or (segment != "*" and segment != parts[index]):
            return False
    return len(parts) == len(wanted)


def allowed(patterns: tuple[str, ...] | list[str], name: str) -> bool:
    """Whether any of ``patterns`` matches ``name``."""
    if patterns == _EVERY_NAME:
        return True  # the default rule, checked on every publish
    return any(matches(pattern, name) for pattern in patterns)


_EVERY_NAME = ("#",)
