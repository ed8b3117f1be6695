"""Strict standard base64: what the envelope, keys and ids are written in."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.crypto._base64 import b64decode, b64encode

__all__: list[str] = []


@given(st.binary(max_size=300))
def test_round_trip_and_standard_encoding(data: bytes) -> None:
    text = b64encode(data)
    assert text == base64.b64encode(data).decode("ascii")
    assert b64decode(text) == data
    assert b64decode(text.encode("ascii")) == data


@pytest.mark.parametrize(
    "text",
    [
        "AAE",  # padding missing
        "AA=E",  # padding inside
        "=AAE",
        "AAE==",  # too much padding
        "AAAA====",  # padding after a whole quantum (stdlib strict mode takes it)
        "AAE=AAE=",  # data after the padding
        "AA E=",  # whitespace
        "AAE=\n",
        "AA-_",  # URL-safe alphabet
        "AAé=",  # not ASCII
    ],
)
def test_sloppy_base64_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        b64decode(text)


@given(st.text(alphabet="ABCDEFab01+/=-_ \n.", max_size=16))
def test_refuses_whatever_the_standard_librarys_strict_mode_refuses(text: str) -> None:
    try:
        expected = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except binascii.Error:
        with pytest.raises(ValueError):
            b64decode(text)
        return
    try:
        assert b64decode(text) == expected
    except ValueError:
        # Stricter only where the standard library is lax: '=' past the end.
        assert text.endswith("=")
        assert len(text.rstrip("=")) % 4 == 0
