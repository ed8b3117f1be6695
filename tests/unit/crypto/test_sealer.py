"""Sealing with a reused ephemeral key pair (``sender_key_reuse_ms``)."""

from __future__ import annotations

import json

import pytest

from ensync.crypto import Sealer, keypair_from_seed, open_payload
from ensync.crypto._base64 import b64decode

BOB = keypair_from_seed(bytes([21]) * 32)
CAROL = keypair_from_seed(bytes([22]) * 32)


def ephemeral(wire_payload: str) -> str:
    envelope = json.loads(b64decode(wire_payload))
    return str(envelope["ephemeralPublicKey"])


def test_without_reuse_every_message_has_its_own_key_pair() -> None:
    sealer = Sealer()
    first, second = (sealer.seal(b"{}", BOB.app_id, 1_000) for _ in range(2))
    assert ephemeral(first) != ephemeral(second)


def test_a_key_pair_is_reused_per_recipient_within_the_window_only() -> None:
    sealer = Sealer(reuse_ms=1_000)
    a = sealer.seal(b'{"n":1}', BOB.app_id, 10_000)
    b = sealer.seal(b'{"n":2}', BOB.app_id, 10_999)
    other = sealer.seal(b'{"n":3}', CAROL.app_id, 10_500)
    later = sealer.seal(b'{"n":4}', BOB.app_id, 11_000)
    assert ephemeral(a) == ephemeral(b)
    assert ephemeral(other) != ephemeral(a)  # per recipient
    assert ephemeral(later) != ephemeral(a)  # the window ended
    # Nonces differ, and each envelope opens with the recipient's key alone.
    assert json.loads(b64decode(a))["nonce"] != json.loads(b64decode(b))["nonce"]
    assert open_payload(a, BOB.secret_key) == b'{"n":1}'
    assert open_payload(b, BOB.secret_key) == b'{"n":2}'
    assert open_payload(later, BOB.secret_key) == b'{"n":4}'
    assert open_payload(other, CAROL.secret_key) == b'{"n":3}'


def test_forget_and_a_clock_going_back_start_a_new_key_pair() -> None:
    sealer = Sealer(reuse_ms=60_000)
    first = sealer.seal(b"{}", BOB.app_id, 5_000)
    assert ephemeral(sealer.seal(b"{}", BOB.app_id, 4_000)) != ephemeral(first)
    kept = sealer.seal(b"{}", BOB.app_id, 4_001)
    sealer.forget()
    assert ephemeral(sealer.seal(b"{}", BOB.app_id, 4_002)) != ephemeral(kept)


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="reuse_ms"):
        Sealer(reuse_ms=-1)
