"""The fast JSON helpers answer exactly as the standard library would."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync._json import dumps_compact, loads_strict


def reference(text: str | bytes) -> Any:
    """The strict parse the engine always had: stdlib, NaN and infinities refused."""

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    def finite(number: str) -> float:
        value = float(number)
        if math.isinf(value):
            raise ValueError(number)
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        raise ValueError("too deep") from None


def outcome(parse: Any, text: str | bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(text)
    except ValueError:
        return "refused", None


EDGES: list[str | bytes] = [
    "1e400", "-1e400", "NaN", "-Infinity", "[" * 5000 + "]" * 5000, "[" * 1100 + "]" * 1100,
    '{"a":1,"a":2}', '"\\ud800"', '"\\udc00x"', "\ufeff{}", b"\xef\xbb\xbf{}", "  {} \n",
    "", "x", "[1,]", '"\x01"', "1" + "0" * 400, "0.1e-400", b'{"a":1}',
    '{"a":1}'.encode("utf-16"), b"\xff\xfe", '{"\\u00e9":"\\ud83d\\ude00"}', "tru", "null",
]  # fmt: skip


@pytest.mark.parametrize("text", EDGES, ids=range(len(EDGES)))
def test_unusual_text_is_judged_as_the_standard_library_judges_it(text: str | bytes) -> None:
    assert outcome(loads_strict, text)[0] == outcome(reference, text)[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(json_values)
def test_any_json_value_reads_back_as_the_standard_library_reads_it(value: Any) -> None:
    text = json.dumps(value)
    assert loads_strict(text) == reference(text)
    assert loads_strict(text.encode()) == reference(text)


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126))


@given(st.dictionaries(printable, printable | st.integers(-(2**53), 2**53), max_size=6))
def test_compact_dumps_of_envelopes_are_what_json_stringify_writes(
    value: dict[str, str | int],
) -> None:
    # Envelopes hold printable ASCII (base64, app ids, "hybrid").
    assert dumps_compact(value) == json.dumps(value, separators=(",", ":")).encode()
