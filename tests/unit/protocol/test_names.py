from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.protocol.names import MAX_NAME_LENGTH, is_valid_name, validate_name


@pytest.mark.parametrize("name", ["orders", "orders/status/updated", "a.b-c_d/1", "x" * 255])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/a", "a/", "a//b", "a;b", "a b", "a=:b", "ü", "x" * (MAX_NAME_LENGTH + 1)]
)
def test_bad_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(ValueError, match="message name"):
        validate_name(name)


def test_non_string_name() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        validate_name(3)


@given(st.text())
def test_valid_names_never_carry_wire_separators(name: str) -> None:
    if is_valid_name(name):
        assert not set(name) & set(";=:, {}")
