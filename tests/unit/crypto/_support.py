"""Shared helpers for the crypto tests: the JS vectors and the Node runner."""

from __future__ import annotations

import base64
import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, TypedDict, cast

import pytest

__all__ = [
    "NODE_DIR",
    "VECTORS_PATH",
    "EnvelopeVector",
    "HybridVector",
    "InvalidAppIdVector",
    "KeyPairVector",
    "Vectors",
    "load_vectors",
    "node_executable",
    "rewrap",
    "run_node",
    "unwrap",
]

TESTS_DIR = Path(__file__).resolve().parents[2]
NODE_DIR = TESTS_DIR / "node"
VECTORS_PATH = TESTS_DIR / "vectors" / "crypto.json"

# Node starts in well under a second; this leaves room for a slow CI machine.
NODE_TIMEOUT_S = 30.0


class KeyPairVector(TypedDict):
    name: str
    seed_hex: str
    app_id: str
    secret_key: str
    x25519_public: str
    x25519_secret: str


class EnvelopeVector(TypedDict):
    name: str
    recipients: list[str]
    plaintext: str
    wire_payload: str


class HybridVector(EnvelopeVector):
    dialect: str
    map_key: str
    key_field: str


class InvalidAppIdVector(TypedDict):
    why: str
    app_id: str
    ed2curve_convert_public_key: str | None


class Vectors(TypedDict):
    note: str
    keypairs: list[KeyPairVector]
    single: list[EnvelopeVector]
    hybrid: list[HybridVector]
    invalid_app_ids: list[InvalidAppIdVector]


@functools.cache
def load_vectors() -> Vectors:
    """The committed JS-made vectors (tests/vectors/crypto.json)."""
    with VECTORS_PATH.open(encoding="utf-8") as f:
        return cast(Vectors, json.load(f))


def node_executable() -> str:
    """Path of ``node`` with the test packages installed; fails the test otherwise.

    A skip would let a machine without Node pass CI while proving nothing
    about interop, so a missing toolchain is a failure (``make node`` fixes it).
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; the crypto interop tests need Node 18+")
    for package in ("tweetnacl", "tweetnacl-util", "ed2curve"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"tests/node/node_modules/{package} is missing; "
                "run `make node` (cd tests/node && npm ci) first"
            )
    return node


def run_node(script: str, stdin: str = "") -> str:
    """Run ``tests/node/<script>`` and return its stdout; fail on a non-zero exit."""
    node = node_executable()
    result = subprocess.run(
        [node, str(NODE_DIR / script)],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"node {script} exited with {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def unwrap(wire_payload: str) -> dict[str, Any]:
    """Decode a wire payload to its envelope JSON object."""
    document = json.loads(base64.b64decode(wire_payload, validate=True))
    assert isinstance(document, dict)
    return document


def rewrap(envelope: dict[str, Any]) -> str:
    """Encode an envelope JSON object as a wire payload."""
    return base64.b64encode(json.dumps(envelope).encode("utf-8")).decode("ascii")
