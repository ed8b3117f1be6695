"""JSON on the hot path: orjson where it gives the same answer, the
standard library where only it can.

``loads_strict`` parses as every client can (no NaN or Infinity, no number
that overflows to infinity, no nesting too deep to parse); orjson refuses
all of these quickly, and whatever it refuses goes to the standard library,
so the answer for unusual text (lone surrogate escapes, a byte order mark,
deep nesting) is exactly the standard library's. ``dumps_compact`` writes
JSON without spaces, as JavaScript's ``JSON.stringify`` does, for values
that hold no floats (orjson would write NaN as ``null`` where the standard
library refuses it).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["dumps_compact", "loads_strict"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads_strict(text: str | bytes) -> Any:
    """Parse JSON text (``str`` or UTF-8/16/32 ``bytes``).

    Raises ``ValueError`` for anything but JSON every client reads: NaN,
    Infinity and numbers beyond a double's range are refused, and nesting
    too deep to parse is an error, not a crash. Integers beyond 64 bits may
    come back as floats: use it to check shapes, not to read exact numbers.

    >>> loads_strict('{"a": [1, 2.5]}')
    {'a': [1, 2.5]}
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass  # the standard library decides (and explains) what orjson refused
    if isinstance(text, bytes | bytearray):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    if text.startswith("\ufeff"):
        raise ValueError("JSON text starts with a byte order mark")
    try:
        return _STRICT.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps_compact(value: dict[str, Any] | list[Any]) -> bytes:
    """Compact UTF-8 JSON of a value holding no floats (strings, ints,
    booleans, None, dicts and lists of them).

    >>> dumps_compact({"nonce": "AAAA", "n": 1})
    b'{"nonce":"AAAA","n":1}'
    """
    return orjson.dumps(value)
