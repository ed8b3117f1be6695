"""Envelopes sealed by tweetnacl/ed2curve (tests/vectors/crypto.json) open here, and only here.

The vectors come from tests/node/make_vectors.js; test_node_interop.py checks
that the committed file is exactly what that script makes.
"""

from __future__ import annotations

import base64

import pytest

from ensync.crypto import envelope_kind, open_payload, parse_envelope
from ensync.crypto.envelope import HybridEnvelope
from ensync.errors import EnSyncMessageError
from tests.unit.crypto._support import (
    EnvelopeVector,
    HybridVector,
    KeyPairVector,
    load_vectors,
    unwrap,
)

__all__: list[str] = []

VECTORS = load_vectors()
KEYPAIRS: dict[str, KeyPairVector] = {k["name"]: k for k in VECTORS["keypairs"]}
ENVELOPES: list[EnvelopeVector] = [*VECTORS["single"], *VECTORS["hybrid"]]


def test_vectors_cover_what_the_brief_needs() -> None:
    assert "make_vectors.js" in VECTORS["note"]
    assert len(KEYPAIRS) >= 3
    dialects = {v["dialect"] for v in VECTORS["hybrid"]}
    assert dialects == {"encryptedKey", "ciphertext-hex", "ciphertext-base64"}
    assert any(len(v["recipients"]) >= 2 for v in VECTORS["hybrid"])
    assert VECTORS["invalid_app_ids"]


@pytest.mark.parametrize("vector", ENVELOPES, ids=lambda v: v["name"])
def test_js_envelope_opens_for_each_recipient(vector: EnvelopeVector) -> None:
    for name in vector["recipients"]:
        secret = KEYPAIRS[name]["secret_key"]
        assert open_payload(vector["wire_payload"], secret) == vector["plaintext"].encode()


@pytest.mark.parametrize("vector", ENVELOPES, ids=lambda v: v["name"])
def test_js_envelope_opens_with_a_bare_x25519_secret(vector: EnvelopeVector) -> None:
    # The Python clients' 32-byte key form (PROTOCOL.md §4.1).
    for name in vector["recipients"]:
        scalar = KEYPAIRS[name]["x25519_secret"]
        assert open_payload(vector["wire_payload"], scalar) == vector["plaintext"].encode()


@pytest.mark.parametrize("vector", ENVELOPES, ids=lambda v: v["name"])
def test_js_envelope_refuses_every_other_key(vector: EnvelopeVector) -> None:
    others = [k for name, k in KEYPAIRS.items() if name not in vector["recipients"]]
    assert others
    for keypair in others:
        with pytest.raises(EnSyncMessageError, match="cannot decrypt"):
            open_payload(vector["wire_payload"], keypair["secret_key"])


@pytest.mark.parametrize("vector", VECTORS["single"], ids=lambda v: v["name"])
def test_js_single_envelope_shape(vector: EnvelopeVector) -> None:
    assert envelope_kind(vector["wire_payload"]) == "single"
    assert list(unwrap(vector["wire_payload"])) == ["nonce", "ciphertext", "ephemeralPublicKey"]


@pytest.mark.parametrize("vector", VECTORS["hybrid"], ids=lambda v: v["name"])
def test_js_hybrid_envelope_shape(vector: HybridVector) -> None:
    assert envelope_kind(vector["wire_payload"]) == "hybrid"
    envelope = unwrap(vector["wire_payload"])
    for entry in envelope["keys"].values():
        assert vector["key_field"] in entry
    parsed = parse_envelope(vector["wire_payload"])
    assert isinstance(parsed, HybridEnvelope)
    expected_map_keys = []
    for name in vector["recipients"]:
        app_id = KEYPAIRS[name]["app_id"]
        expected_map_keys.append(
            app_id if vector["map_key"] == "app_id" else base64.b64decode(app_id).hex()
        )
    assert [map_key for map_key, _ in parsed.keys] == expected_map_keys
