"""Property tests: round trips, tamper detection, and parser fuzzing."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ensync.crypto import keypair_from_seed, open_payload, seal, seal_hybrid
from ensync.errors import EnSyncMessageError
from tests.unit.crypto._support import rewrap, unwrap

__all__: list[str] = []

# No deadline: one X25519 operation can exceed 200 ms on a loaded CI machine.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

APPS = [keypair_from_seed(bytes([0x40 + n]) * 32) for n in range(4)]
OUTSIDER = keypair_from_seed(bytes([0x7F]) * 32)

payloads = st.binary(max_size=2048)
recipient_sets = st.lists(st.sampled_from(APPS), min_size=1, max_size=len(APPS), unique_by=id)


def flip(text: str, index: int, mask: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index % len(raw)] ^= mask
    return base64.b64encode(bytes(raw)).decode("ascii")


@PROPERTY
@given(plaintext=payloads, recipient=st.sampled_from(APPS))
def test_single_round_trip(plaintext: bytes, recipient: Any) -> None:
    wire = seal(plaintext, recipient.app_id)
    assert open_payload(wire, recipient.secret_key) == plaintext


@PROPERTY
@given(plaintext=payloads, recipients=recipient_sets)
def test_hybrid_round_trip(plaintext: bytes, recipients: list[Any]) -> None:
    wire = seal_hybrid(plaintext, [r.app_id for r in recipients])
    for recipient in recipients:
        assert open_payload(wire, recipient.secret_key) == plaintext


@PROPERTY
@given(plaintext=payloads)
def test_only_recipients_open(plaintext: bytes) -> None:
    wire = seal_hybrid(plaintext, [a.app_id for a in APPS[:2]])
    with pytest.raises(EnSyncMessageError):
        open_payload(wire, OUTSIDER.secret_key)


@PROPERTY
@given(
    plaintext=payloads,
    field=st.sampled_from(["nonce", "ciphertext", "ephemeralPublicKey"]),
    index=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_tampering_a_single_envelope_fails(
    plaintext: bytes, field: str, index: int, mask: int
) -> None:
    # X25519 ignores the top bit of a public key (RFC 7748 §5): flipping only
    # that bit of the ephemeral key changes nothing, so it is no tampering.
    assume(not (field == "ephemeralPublicKey" and index % 32 == 31 and mask == 0x80))
    envelope = unwrap(seal(plaintext, APPS[0].app_id))
    envelope[field] = flip(envelope[field], index, mask)
    wire = rewrap(envelope)
    with pytest.raises(EnSyncMessageError):
        open_payload(wire, APPS[0].secret_key)


@PROPERTY
@given(
    plaintext=payloads,
    target=st.sampled_from(["payload.nonce", "payload.ciphertext", "key.encryptedKey"]),
    index=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_tampering_a_hybrid_envelope_fails(
    plaintext: bytes, target: str, index: int, mask: int
) -> None:
    # One recipient, so a damaged key entry cannot be bypassed via another.
    envelope = unwrap(seal_hybrid(plaintext, [APPS[0].app_id]))
    part, name = target.split(".")
    holder = envelope["payload"] if part == "payload" else envelope["keys"][APPS[0].app_id]
    holder[name] = flip(holder[name], index, mask)
    with pytest.raises(EnSyncMessageError):
        open_payload(rewrap(envelope), APPS[0].secret_key)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["type", "nonce", "ciphertext", "ephemeralPublicKey", "payload", "keys", "x"]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@PROPERTY
@given(text=st.text(max_size=200))
def test_any_text_is_refused_cleanly(text: str) -> None:
    with pytest.raises(EnSyncMessageError):
        open_payload(text, APPS[0].secret_key)


@PROPERTY
@given(document=json_values | st.just({"type": "hybrid"}))
def test_any_json_is_refused_cleanly(document: Any) -> None:
    wire = base64.b64encode(json.dumps(document).encode()).decode()
    with pytest.raises(EnSyncMessageError):
        open_payload(wire, APPS[0].secret_key)
