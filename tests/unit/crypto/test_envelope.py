"""Envelopes: the exact wire shapes of PROTOCOL.md §4.2/§4.3, opening, and every failure."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from nacl import bindings

from ensync.crypto import (
    Box,
    HybridEnvelope,
    KeyPair,
    envelope_kind,
    keypair_from_seed,
    open_envelope,
    open_payload,
    opening_key,
    parse_envelope,
    seal,
    seal_hybrid,
    x25519_secret,
)
from ensync.errors import EnSyncMessageError, EnSyncValidationError
from tests.unit.crypto._support import rewrap, unwrap

__all__: list[str] = []

ALICE = keypair_from_seed(bytes([1]) * 32)
BOB = keypair_from_seed(bytes([2]) * 32)
CAROL = keypair_from_seed(bytes([3]) * 32)
MALLORY = keypair_from_seed(bytes([4]) * 32)
PLAINTEXT = '{"text":"grüße 🚀","n":1}'.encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- single envelope -------------------------------------------------------


def test_seal_writes_the_single_envelope_exactly() -> None:
    wire = seal(PLAINTEXT, BOB.app_id)
    text = base64.b64decode(wire, validate=True).decode("utf-8")
    envelope = json.loads(text)
    assert list(envelope) == ["nonce", "ciphertext", "ephemeralPublicKey"]
    # JSON.stringify's compact form, so Node-side byte comparisons hold.
    assert text == json.dumps(envelope, separators=(",", ":"))
    assert len(b64d(envelope["nonce"])) == 24
    assert len(b64d(envelope["ephemeralPublicKey"])) == 32
    assert len(b64d(envelope["ciphertext"])) == len(PLAINTEXT) + 16


def test_single_envelope_is_a_plain_nacl_box() -> None:
    envelope = unwrap(seal(PLAINTEXT, BOB.app_id))
    opened = bindings.crypto_box_open_easy(
        b64d(envelope["ciphertext"]),
        b64d(envelope["nonce"]),
        b64d(envelope["ephemeralPublicKey"]),
        x25519_secret(BOB.secret_key),
    )
    assert opened == PLAINTEXT


def test_seal_is_randomized() -> None:
    first, second = unwrap(seal(PLAINTEXT, BOB.app_id)), unwrap(seal(PLAINTEXT, BOB.app_id))
    assert first["nonce"] != second["nonce"]
    assert first["ephemeralPublicKey"] != second["ephemeralPublicKey"]


def test_seal_and_open_round_trip() -> None:
    assert open_payload(seal(PLAINTEXT, BOB.app_id), BOB.secret_key) == PLAINTEXT


@pytest.mark.parametrize("plaintext", [b"", b"{}", bytes(range(256)) * 40])
def test_seal_handles_any_length(plaintext: bytes) -> None:
    assert open_payload(seal(plaintext, BOB.app_id), BOB.secret_key) == plaintext


def test_seal_tolerates_bytes_like_plaintext() -> None:
    # Typed as bytes; other bytes-like values are tolerated for untyped callers.
    wire = seal(bytearray(PLAINTEXT), BOB.app_id)  # type: ignore[arg-type]
    assert open_payload(wire, BOB.secret_key) == PLAINTEXT
    wire = seal(memoryview(PLAINTEXT), BOB.app_id)  # type: ignore[arg-type]
    assert open_payload(wire, BOB.secret_key) == PLAINTEXT


def test_seal_rejects_text_plaintext() -> None:
    with pytest.raises(EnSyncValidationError, match="plaintext must be bytes"):
        seal("{}", BOB.app_id)  # type: ignore[arg-type]


def test_seal_rejects_a_bad_recipient() -> None:
    with pytest.raises(EnSyncValidationError, match="app id"):
        seal(PLAINTEXT, "bob")


def test_single_envelope_fails_with_another_key() -> None:
    wire = seal(PLAINTEXT, BOB.app_id)
    with pytest.raises(EnSyncMessageError, match="not sealed for this key"):
        open_payload(wire, ALICE.secret_key)


# -- hybrid envelope -------------------------------------------------------


def test_seal_hybrid_writes_the_encrypted_key_dialect() -> None:
    recipients = [ALICE, BOB, CAROL]
    wire = seal_hybrid(PLAINTEXT, [r.app_id for r in recipients])
    envelope = unwrap(wire)
    assert list(envelope) == ["type", "payload", "keys"]
    assert envelope["type"] == "hybrid"
    assert list(envelope["payload"]) == ["nonce", "ciphertext"]
    assert list(envelope["keys"]) == [r.app_id for r in recipients]
    message_keys = set()
    for recipient in recipients:
        entry = envelope["keys"][recipient.app_id]
        assert list(entry) == ["nonce", "encryptedKey", "ephemeralPublicKey"]
        # The sealed content is the raw 32-byte message key (PROTOCOL.md §4.3).
        message_key = bindings.crypto_box_open_easy(
            b64d(entry["encryptedKey"]),
            b64d(entry["nonce"]),
            b64d(entry["ephemeralPublicKey"]),
            x25519_secret(recipient.secret_key),
        )
        assert len(message_key) == 32
        message_keys.add(message_key)
    (message_key,) = message_keys
    payload = envelope["payload"]
    opened = bindings.crypto_secretbox_open_easy(
        b64d(payload["ciphertext"]), b64d(payload["nonce"]), message_key
    )
    assert opened == PLAINTEXT


def test_seal_hybrid_round_trips_for_every_recipient() -> None:
    wire = seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id, CAROL.app_id])
    for recipient in (ALICE, BOB, CAROL):
        assert open_payload(wire, recipient.secret_key) == PLAINTEXT
    with pytest.raises(EnSyncMessageError, match="none of the 3 hybrid key entries"):
        open_payload(wire, MALLORY.secret_key)


def test_seal_hybrid_lists_each_recipient_once() -> None:
    wire = seal_hybrid(PLAINTEXT, (BOB.app_id, ALICE.app_id, BOB.app_id))
    assert list(unwrap(wire)["keys"]) == [BOB.app_id, ALICE.app_id]


def test_seal_hybrid_with_one_recipient() -> None:
    wire = seal_hybrid(PLAINTEXT, [BOB.app_id])
    assert envelope_kind(wire) == "hybrid"
    assert open_payload(wire, BOB.secret_key) == PLAINTEXT


def test_seal_hybrid_rejects_a_single_string() -> None:
    with pytest.raises(EnSyncValidationError, match="not a str"):
        seal_hybrid(PLAINTEXT, BOB.app_id)


def test_seal_hybrid_rejects_no_recipients() -> None:
    with pytest.raises(EnSyncValidationError, match="at least one"):
        seal_hybrid(PLAINTEXT, [])


def test_seal_hybrid_rejects_a_bad_recipient_before_sealing() -> None:
    with pytest.raises(EnSyncValidationError, match="app id"):
        seal_hybrid(PLAINTEXT, [ALICE.app_id, "not-an-app-id"])


def test_hybrid_tries_entries_whatever_their_map_key() -> None:
    # Rename every entry to something that names nobody: still readable.
    envelope = unwrap(seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id]))
    envelope["keys"] = {f"someone-{i}": v for i, v in enumerate(envelope["keys"].values())}
    wire = rewrap(envelope)
    assert open_payload(wire, ALICE.secret_key) == PLAINTEXT
    assert open_payload(wire, BOB.secret_key) == PLAINTEXT


def test_hybrid_reads_the_ciphertext_key_field_and_hex_map_keys() -> None:
    # The Python clients' dialect (PROTOCOL.md §4.3), rebuilt from our output.
    envelope = unwrap(seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id]))
    renamed = {}
    for app_id, entry in envelope["keys"].items():
        renamed[b64d(app_id).hex()] = {
            "nonce": entry["nonce"],
            "ciphertext": entry["encryptedKey"],
            "ephemeralPublicKey": entry["ephemeralPublicKey"],
        }
    envelope["keys"] = renamed
    assert open_payload(rewrap(envelope), BOB.secret_key) == PLAINTEXT


def test_hybrid_with_a_tampered_payload_fails() -> None:
    envelope = unwrap(seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id]))
    sealed = bytearray(b64d(envelope["payload"]["ciphertext"]))
    sealed[-1] ^= 1
    envelope["payload"]["ciphertext"] = b64(bytes(sealed))
    with pytest.raises(EnSyncMessageError, match="changed in transit"):
        open_payload(rewrap(envelope), ALICE.secret_key)


def test_hybrid_message_key_of_the_wrong_size_is_refused() -> None:
    envelope = unwrap(seal_hybrid(PLAINTEXT, [BOB.app_id]))
    # A sender that boxes the base64 text of the key instead of its bytes.
    ephemeral_public, ephemeral_secret = bindings.crypto_box_keypair()
    nonce = bytes(24)
    boxed = bindings.crypto_box_easy(
        b64(bytes(32)).encode(), nonce, opening_key(BOB.secret_key).x25519_public, ephemeral_secret
    )
    envelope["keys"] = {
        BOB.app_id: {
            "nonce": b64(nonce),
            "encryptedKey": b64(boxed),
            "ephemeralPublicKey": b64(ephemeral_public),
        }
    }
    with pytest.raises(EnSyncMessageError, match="44 bytes, expected 32"):
        open_payload(rewrap(envelope), BOB.secret_key)


# -- secret key forms ------------------------------------------------------


@pytest.mark.parametrize("hybrid", [False, True])
def test_every_secret_form_opens(hybrid: bool) -> None:
    wire = seal_hybrid(PLAINTEXT, [BOB.app_id]) if hybrid else seal(PLAINTEXT, BOB.app_id)
    raw = b64d(BOB.secret_key)
    scalar = x25519_secret(BOB.secret_key)
    for secret in (BOB.secret_key, raw, b64(scalar), scalar):
        assert open_payload(wire, secret) == PLAINTEXT
    assert open_payload(wire, bytearray(raw)) == PLAINTEXT  # type: ignore[arg-type]
    assert open_envelope(parse_envelope(wire), opening_key(BOB.secret_key)) == PLAINTEXT


@pytest.mark.parametrize("secret", ["", "bad key", b64(bytes(48)), bytes(12)])
def test_open_rejects_bad_secret_keys_as_validation_errors(secret: str | bytes) -> None:
    wire = seal(PLAINTEXT, BOB.app_id)
    with pytest.raises(EnSyncValidationError):
        open_payload(wire, secret)


# -- parsing ---------------------------------------------------------------


def test_parse_single_envelope() -> None:
    envelope = parse_envelope(seal(PLAINTEXT, BOB.app_id))
    assert isinstance(envelope, Box)
    assert len(envelope.nonce) == 24
    assert len(envelope.ephemeral_public_key) == 32
    assert len(envelope.ciphertext) == len(PLAINTEXT) + 16


def test_parse_hybrid_envelope() -> None:
    envelope = parse_envelope(seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id]))
    assert isinstance(envelope, HybridEnvelope)
    assert [map_key for map_key, _ in envelope.keys] == [ALICE.app_id, BOB.app_id]
    assert all(len(box.ciphertext) == 32 + 16 for _, box in envelope.keys)


def test_envelope_repr_leaves_out_ciphertext() -> None:
    envelope = parse_envelope(seal(PLAINTEXT, BOB.app_id))
    assert repr(envelope.ciphertext) not in repr(envelope)


def test_envelope_kind() -> None:
    assert envelope_kind(seal(PLAINTEXT, BOB.app_id)) == "single"
    assert envelope_kind(seal_hybrid(PLAINTEXT, [BOB.app_id])) == "hybrid"


def single_envelope() -> dict[str, Any]:
    return unwrap(seal(PLAINTEXT, BOB.app_id))


def hybrid_envelope() -> dict[str, Any]:
    return unwrap(seal_hybrid(PLAINTEXT, [ALICE.app_id, BOB.app_id]))


def b64_json(value: object) -> str:
    return b64(json.dumps(value).encode())


RAW_PAYLOADS: list[tuple[str, str, str]] = [
    ("not base64", "not base64!", "base64"),
    ("unpadded base64", b64(b'{"a":1}').rstrip("="), "base64"),
    ("not utf-8", b64(b"\xff\xfe{}"), "UTF-8 JSON"),
    ("not json", b64(b"{nonce:"), "UTF-8 JSON"),
    ("json array", b64_json([1, 2]), "an array, not a JSON object"),
    ("json string", b64_json("hi"), "a string, not a JSON object"),
    ("empty object", b64_json({}), "neither single"),
    ("unknown type", b64_json({"type": "sealed-v9"}), "unknown envelope type 'sealed-v9'"),
]


@pytest.mark.parametrize(
    ("what", "wire", "problem"), RAW_PAYLOADS, ids=[p[0] for p in RAW_PAYLOADS]
)
def test_malformed_payloads_are_message_errors(what: str, wire: str, problem: str) -> None:
    with pytest.raises(EnSyncMessageError, match=problem):
        open_payload(wire, BOB.secret_key)
    with pytest.raises(EnSyncMessageError):
        envelope_kind(wire)


def test_non_text_payload_is_a_message_error() -> None:
    with pytest.raises(EnSyncMessageError, match="must be text"):
        open_payload(None, BOB.secret_key)  # type: ignore[arg-type]


def _edit(base: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    edited = copy.deepcopy(base)
    target = edited
    for step in path[:-1]:
        # "*" stands for the first entry of a map, whatever its key.
        target = target[step] if step != "*" else next(iter(target.values()))
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return edited


_DELETE = object()

FIELD_EDITS: list[tuple[str, str, tuple[str, ...], object, str]] = [
    ("single nonce missing", "single", ("nonce",), _DELETE, "'nonce' is missing"),
    ("single nonce number", "single", ("nonce",), 5, "'nonce' is a number"),
    ("single nonce short", "single", ("nonce",), b64(bytes(23)), "23 bytes, expected 24"),
    ("single nonce bad b64", "single", ("nonce",), "AAA", "not standard padded base64"),
    ("single ct missing", "single", ("ciphertext",), _DELETE, "'ciphertext' is missing"),
    ("single ct short", "single", ("ciphertext",), b64(bytes(15)), "at least 16"),
    ("single epk long", "single", ("ephemeralPublicKey",), b64(bytes(33)), "33 bytes"),
    ("hybrid payload missing", "hybrid", ("payload",), _DELETE, "'payload' is missing"),
    ("hybrid payload list", "hybrid", ("payload",), [], "'payload' is an array"),
    ("hybrid keys string", "hybrid", ("keys",), "k", "'keys' is a string"),
    ("hybrid keys empty", "hybrid", ("keys",), {}, "no recipient keys"),
    ("hybrid payload nonce", "hybrid", ("payload", "nonce"), b64(bytes(8)), "8 bytes"),
    ("hybrid payload ct", "hybrid", ("payload", "ciphertext"), True, "a boolean"),
    ("hybrid entry not object", "hybrid", ("keys", ALICE.app_id), [1], "an array"),
    ("hybrid entry no key", "hybrid", ("keys", "*", "encryptedKey"), _DELETE, "neither"),
    ("hybrid entry nonce", "hybrid", ("keys", "*", "nonce"), None, "'nonce' is missing"),
    ("hybrid entry epk", "hybrid", ("keys", "*", "ephemeralPublicKey"), "x", "base64"),
]


@pytest.mark.parametrize(
    ("what", "kind", "path", "value", "problem"), FIELD_EDITS, ids=[e[0] for e in FIELD_EDITS]
)
def test_malformed_fields_are_message_errors(
    what: str, kind: str, path: tuple[str, ...], value: object, problem: str
) -> None:
    base = single_envelope() if kind == "single" else hybrid_envelope()
    wire = rewrap(_edit(base, path, value))
    with pytest.raises(EnSyncMessageError, match=problem):
        parse_envelope(wire)
    with pytest.raises(EnSyncMessageError, match=problem):
        open_payload(wire, BOB.secret_key)


def test_errors_never_contain_plaintext_or_keys() -> None:
    secret_words = b'{"password":"hunter2-hunter2-hunter2"}'
    wire = seal(secret_words, BOB.app_id)
    for secret in (ALICE.secret_key, MALLORY.secret_key):
        with pytest.raises(EnSyncMessageError) as info:
            open_payload(wire, secret)
        text = str(info.value)
        assert "hunter2" not in text
        assert secret not in text
        assert BOB.secret_key not in text


def test_tampered_single_fields_fail() -> None:
    base = single_envelope()
    for name in ("nonce", "ciphertext", "ephemeralPublicKey"):
        edited = copy.deepcopy(base)
        raw = bytearray(b64d(edited[name]))
        raw[0] ^= 0x80
        edited[name] = b64(bytes(raw))
        with pytest.raises(EnSyncMessageError):
            open_payload(rewrap(edited), BOB.secret_key)


def test_small_order_ephemeral_key_is_a_message_error() -> None:
    # libsodium refuses the all-zero shared secret; that must read as "not for us".
    edited = single_envelope()
    edited["ephemeralPublicKey"] = b64(bytes(32))
    with pytest.raises(EnSyncMessageError, match="not sealed for this key"):
        open_payload(rewrap(edited), BOB.secret_key)


def test_recipient_identities_are_distinct() -> None:
    # Guard for the tests above: the fixed seeds give four different apps.
    pairs: list[KeyPair] = [ALICE, BOB, CAROL, MALLORY]
    assert len({p.app_id for p in pairs}) == 4
