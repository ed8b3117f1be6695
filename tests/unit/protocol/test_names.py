from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.protocol.names import (
    MAX_NAME_LENGTH,
    allowed,
    is_valid_name,
    matches,
    validate_name,
    validate_pattern,
)


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


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("#", "anything/at/all", True),
        ("orders/*", "orders/created", True),
        ("orders/*", "orders", False),
        ("orders/*", "orders/a/b", False),
        ("orders/*/updated", "orders/o-1/updated", True),
        ("billing/#", "billing", True),
        ("billing/#", "billing/x/y", True),
        ("billing/#", "billingx", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_patterns(pattern: str, name: str, expected: bool) -> None:
    assert validate_pattern(pattern) == pattern
    assert matches(pattern, name) is expected


@pytest.mark.parametrize("pattern", ["", "#/a", "a//b", "a b", "ord*rs", "a/#/b", 5])
def test_bad_patterns(pattern: object) -> None:
    with pytest.raises(ValueError):
        validate_pattern(pattern)


def test_allowed_takes_any_rule() -> None:
    assert allowed(("a/*", "b/#"), "b/c/d")
    assert not allowed((), "a")
