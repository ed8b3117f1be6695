"""Store calls and answers between engine nodes come back as they left."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.server.store import (
    Appended,
    Claim,
    DeliveryPolicy,
    Lease,
    MessageState,
    NewMessage,
    Release,
    Released,
    Settlement,
    StoredMessage,
)
from ensync.server.store import peer_calls as calls
from ensync.server.store.base import DeadRef

_text = st.text(max_size=30)
_ms = st.integers(0, 2**48)
_policy = st.builds(DeliveryPolicy, st.integers(1, 10**6), st.integers(1, 50), st.tuples(_ms, _ms))
_new = st.builds(
    NewMessage,
    _text,
    _text,
    _text,
    _text,
    _text,
    _text,
    _ms,
    st.none() | _text,
    st.none() | _ms,
    st.none() | _text,
    st.booleans(),
)
_calls = st.one_of(
    st.builds(calls.Append, st.lists(_new, max_size=3).map(tuple), _ms, _ms),
    st.builds(calls.ClaimFrom, _text, _text, _text, st.integers(0, 1000), _ms, _policy),
    st.builds(calls.Extend, _text, st.integers(0, 2**40), _ms),
    st.builds(
        calls.ReleaseMany,
        st.lists(
            st.builds(Release, _text, st.integers(0, 2**40), st.none() | _text, st.booleans()),
            max_size=3,
        ).map(tuple),
        _ms,
        _policy,
    ),
    st.builds(calls.Defer, _text, _ms, _ms),
    st.builds(
        calls.SettleMany,
        st.lists(
            st.builds(
                Settlement,
                _text,
                st.sampled_from([MessageState.ACKED, MessageState.DEAD, MessageState.EXPIRED]),
                st.none() | _text,
            ),
            max_size=3,
        ).map(tuple),
        _ms,
    ),
    st.builds(calls.Get, _text),
    st.builds(calls.Dead, _text, st.integers(0, 1000)),
    st.builds(calls.DeadRefs, _text),
    st.builds(calls.Redrive, _text, _ms),
    st.just(calls.Backlog()),
    st.builds(calls.Watch, _text, st.lists(st.tuples(_text, _text), max_size=3).map(tuple)),
)


@given(st.lists(_calls, max_size=12))
def test_a_batch_of_calls_comes_back_equal_and_in_order(batch: list[calls.PeerCall]) -> None:
    assert calls.decode_calls(calls.encode_calls(batch)) == batch


STORED = StoredMessage(
    idem="01J0",
    recipient="app",
    name="orders/created",
    block=7,
    payload="sealed",
    metadata="{}",
    sender="other",
    created_at_ms=5,
    payload_metadata=None,
    state=MessageState.DEAD,
    attempts=3,
    visible_at_ms=9,
    expires_at_ms=None,
    settled_at_ms=11,
    dead_reason="bad",
    dedupe_key="k",
)


def test_every_kind_of_answer_comes_back_as_it_was() -> None:
    policy = DeliveryPolicy()
    answered: list[tuple[calls.PeerCall, Any]] = [
        (calls.Append((), 0, 0), [Appended("a", 1), Appended("b", 2, True, "why")]),
        (
            calls.ClaimFrom("n", "app", "x", 5, 0, policy),
            Claim((Lease(STORED, 4, 99),), ("d",), ("e",), 1234),
        ),
        (calls.Extend("a", 1, 2), True),
        (
            calls.ReleaseMany((), 0, policy),
            [Released(5), Released(dead=True), Released(stale=True)],
        ),
        (calls.Defer("a", 1, 2), False),
        (calls.SettleMany((), 0), [True, False]),
        (calls.Get("a"), STORED),
        (calls.Get("b"), None),
        (calls.Dead("app", 5), [STORED]),
        (calls.DeadRefs("app"), [DeadRef(11, "01J0", "orders/created")]),
        (calls.Redrive("a", 0), True),
        (calls.Backlog(), {"app": 3}),
        (calls.Watch("n", ()), [("app", "x")]),
        (calls.Get("c"), calls.NotServed(5)),
        (calls.Backlog(), calls.Failed("disk full")),
    ]
    batch = [call for call, _ in answered]
    data = calls.encode_answers(batch, [answer for _, answer in answered])
    assert calls.decode_answers(batch, data) == [answer for _, answer in answered]


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"[2]", b'[1,["?"]]', b'[1,["g"]]', b'[1,["a",[[1]],0,0]]', b"{}"],
)
def test_what_is_not_a_batch_of_calls_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a batch of store calls"):
        calls.decode_calls(data)


def test_answers_that_do_not_match_their_calls_are_refused() -> None:
    batch: list[calls.PeerCall] = [calls.Get("a")]
    for data in (b'[1,["v",null],["v",null]]', b'[1,["?",1]]', b"[2]", b"nope"):
        with pytest.raises(ValueError, match="not answers to store calls"):
            calls.decode_answers(batch, data)
