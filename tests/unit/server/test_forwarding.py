"""Calls and answers forwarded between nodes come back as they left."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.server.core.calls import (
    Observe,
    Pause,
    Publish,
    Replay,
    Resume,
    Settle,
    SettleKind,
    Subscribe,
    Unsubscribe,
)
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.forwarding import (
    Answer,
    decode_answers,
    decode_calls,
    encode_answers,
    encode_calls,
)

_text = st.text(max_size=40)
_calls = st.one_of(
    st.builds(Publish, _text, _text, _text, _text, _text, st.none() | _text),
    st.builds(
        Settle,
        _text,
        _text,
        st.sampled_from(SettleKind),
        st.none() | _text,
        st.integers(0, 86_400_000),
        _text,
    ),
    st.builds(Subscribe, _text, _text),
    st.builds(Unsubscribe, _text, _text),
    st.builds(Pause, _text, _text, _text),
    st.builds(Resume, _text, _text),
    st.builds(Replay, _text, _text, st.none() | _text),
    st.builds(Observe, _text, _text, st.booleans()),
)


@given(st.lists(_calls, max_size=20))
def test_a_batch_of_calls_comes_back_equal_and_in_order(calls: list[object]) -> None:
    assert decode_calls(encode_calls(calls)) == calls  # type: ignore[arg-type]


def test_answers_come_back_with_refusals_as_they_were() -> None:
    refused = ServiceError.over_limit("max_in_flight", "too many in flight")
    answers: list[Answer] = ["01J0ABC", 1_765_000_000_000, None, refused]
    back = decode_answers(encode_answers(answers))
    assert back[:3] == ["01J0ABC", 1_765_000_000_000, None]
    error = back[3]
    assert isinstance(error, ServiceError)
    assert (error.code, error.message, error.limit) == (
        ErrorCode.LIMIT_EXCEEDED,
        "too many in flight",
        "max_in_flight",
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"[2]",
        b'[1,["zzz","c"]]',
        b'[1,["sub","c"]]',
        b'[1,["s","c","i","later",null,0,""]]',
        b'[1,["s","c","i","ack",null,"5",""]]',
        b'[1,["obs","c","p","yes"]]',
    ],
)
def test_what_is_not_a_batch_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a batch of forwarded calls"):
        decode_calls(data)


@pytest.mark.parametrize(
    "data", [b'[1,["x",1]]', b'[1,["v",true]]', b'[1,["e","nope","m",null]]', b"{}"]
)
def test_what_are_not_answers_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not forwarded answers"):
        decode_answers(data)
