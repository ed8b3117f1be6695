"""What ensync.crypto seals, the Node clients' libraries open (tests/node/decrypt.js).

These tests need Node and ``tests/node/node_modules`` (``make node``); they
fail rather than skip without them, because a skipped interop proof proves
nothing.
"""

from __future__ import annotations

import base64
import json
from typing import TypedDict

from ensync.crypto import KeyPair, Sealer, keypair_from_seed, seal, seal_hybrid
from tests.unit.crypto._support import VECTORS_PATH, run_node

__all__: list[str] = []

RECIPIENTS = [keypair_from_seed(bytes([n]) * 32) for n in (11, 12, 13)]
OUTSIDER = keypair_from_seed(bytes([14]) * 32)

PLAINTEXTS = [
    b'{"hello":"world"}',
    '{"text":"grüße, 世界 🚀","nested":{"list":[1,2,3]}}'.encode(),
    b"{}",
    b"",
    bytes(range(256)) * 20,
]


class Request(TypedDict):
    wire_payload: str
    secret_key: str


class Result(TypedDict, total=False):
    ok: bool
    plaintext_b64: str
    error: str


def node_decrypt(requests: list[Request]) -> list[Result]:
    results: list[Result] = json.loads(run_node("decrypt.js", json.dumps(requests)))
    assert len(results) == len(requests)
    return results


def plaintext_of(result: Result) -> bytes:
    assert result.get("ok") is True, result.get("error")
    return base64.b64decode(result["plaintext_b64"])


def test_node_opens_single_envelopes() -> None:
    requests: list[Request] = []
    expected: list[bytes] = []
    for i, plaintext in enumerate(PLAINTEXTS):
        recipient = RECIPIENTS[i % len(RECIPIENTS)]
        requests.append(
            {"wire_payload": seal(plaintext, recipient.app_id), "secret_key": recipient.secret_key}
        )
        expected.append(plaintext)
    results = node_decrypt(requests)
    assert [plaintext_of(r) for r in results] == expected


def test_node_opens_hybrid_envelopes_for_every_recipient() -> None:
    requests: list[Request] = []
    expected: list[bytes] = []
    groups: list[list[KeyPair]] = [RECIPIENTS[:1], RECIPIENTS[:2], RECIPIENTS]
    for plaintext in PLAINTEXTS:
        for group in groups:
            wire = seal_hybrid(plaintext, [r.app_id for r in group])
            for recipient in group:
                requests.append({"wire_payload": wire, "secret_key": recipient.secret_key})
                expected.append(plaintext)
    results = node_decrypt(requests)
    assert [plaintext_of(r) for r in results] == expected


def test_node_refuses_envelopes_for_someone_else() -> None:
    # Proves the harness can fail: a non-recipient's key must not open anything.
    group = [r.app_id for r in RECIPIENTS]
    requests: list[Request] = [
        {
            "wire_payload": seal(PLAINTEXTS[0], RECIPIENTS[0].app_id),
            "secret_key": OUTSIDER.secret_key,
        },
        {"wire_payload": seal_hybrid(PLAINTEXTS[0], group), "secret_key": OUTSIDER.secret_key},
    ]
    results = node_decrypt(requests)
    assert [r.get("ok") for r in results] == [False, False]
    assert "does not open" in results[0].get("error", "")
    assert "no key entry opens" in results[1].get("error", "")


def test_committed_vectors_are_what_make_vectors_js_makes() -> None:
    # make_vectors.js is deterministic, so the data file must match it byte
    # for byte: nobody edited it by hand and it is not stale.
    generated = run_node("make_vectors.js")
    assert generated == VECTORS_PATH.read_text(encoding="utf-8"), (
        "tests/vectors/crypto.json is stale; regenerate it with "
        "`node tests/node/make_vectors.js > tests/vectors/crypto.json`"
    )


def test_node_opens_envelopes_sealed_with_a_reused_key_pair() -> None:
    sealer = Sealer(reuse_ms=60_000)
    recipient = RECIPIENTS[0]
    payloads = [sealer.seal(plaintext, recipient.app_id, 1_000) for plaintext in PLAINTEXTS]
    results = node_decrypt(
        [{"wire_payload": p, "secret_key": recipient.secret_key} for p in payloads]
    )
    assert [plaintext_of(r) for r in results] == PLAINTEXTS
