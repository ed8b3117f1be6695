"""Keys: formats, strictness, conversions (checked against tweetnacl/ed2curve), caching."""

from __future__ import annotations

import base64

import pytest
from nacl import bindings

from ensync.crypto import keys
from ensync.crypto.keys import (
    KeyPair,
    clear_key_caches,
    decode_app_id,
    decode_secret_key,
    generate_keypair,
    is_app_id,
    keypair_from_seed,
    opening_key,
    x25519_public,
    x25519_secret,
)
from ensync.errors import EnSyncValidationError
from tests.unit.crypto._support import InvalidAppIdVector, KeyPairVector, load_vectors

__all__: list[str] = []

VECTORS = load_vectors()
ALICE = VECTORS["keypairs"][0]
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- key pairs -------------------------------------------------------------


def test_generate_keypair_has_the_tweetnacl_layout() -> None:
    pair = generate_keypair()
    public = decode_app_id(pair.app_id)
    secret = decode_secret_key(pair.secret_key)
    assert len(pair.app_id) == 44
    assert pair.app_id.endswith("=")
    assert len(secret) == 64
    assert secret[32:] == public
    assert keypair_from_seed(secret[:32]) == pair


def test_generated_keypairs_differ() -> None:
    assert generate_keypair() != generate_keypair()


@pytest.mark.parametrize("vector", VECTORS["keypairs"], ids=lambda v: v["name"])
def test_keypair_from_seed_matches_tweetnacl(vector: KeyPairVector) -> None:
    pair = keypair_from_seed(bytes.fromhex(vector["seed_hex"]))
    assert pair == KeyPair(app_id=vector["app_id"], secret_key=vector["secret_key"])


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), bytes(64)])
def test_keypair_from_seed_rejects_wrong_lengths(seed: bytes) -> None:
    with pytest.raises(EnSyncValidationError, match="32 bytes"):
        keypair_from_seed(seed)


def test_keypair_from_seed_rejects_text() -> None:
    with pytest.raises(EnSyncValidationError):
        keypair_from_seed("0" * 32)  # type: ignore[arg-type]


def test_keypair_repr_hides_the_secret_key() -> None:
    pair = keypair_from_seed(bytes(32))
    assert pair.secret_key not in repr(pair)
    assert pair.app_id in repr(pair)


def test_keypair_is_frozen() -> None:
    pair = keypair_from_seed(bytes(32))
    with pytest.raises(AttributeError):
        pair.app_id = "x"  # type: ignore[misc]


# -- app ids ---------------------------------------------------------------


def test_decode_app_id_returns_the_public_key() -> None:
    assert decode_app_id(ALICE["app_id"]) == base64.b64decode(ALICE["secret_key"])[32:]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (ALICE["app_id"].rstrip("="), "base64"),  # unpadded: tweetnacl-util and Go refuse it
        (ALICE["app_id"] + "\n", "base64"),
        (" " + ALICE["app_id"], "base64"),
        (base64.urlsafe_b64encode(bytes([0xFB] * 32)).decode(), "base64"),
        ("é" * 44, "base64"),
        ("", "encode 32 bytes"),
        (b64(bytes(31)), "encode 32 bytes"),
        (b64(bytes(33)), "encode 32 bytes"),
        (ALICE["secret_key"], "encode 32 bytes"),
    ],
)
def test_decode_app_id_is_strict(text: str, problem: str) -> None:
    with pytest.raises(EnSyncValidationError, match=problem):
        decode_app_id(text)
    assert not is_app_id(text)


def test_decode_app_id_rejects_non_canonical_spelling() -> None:
    # The last character carries 4 bits of the key and 2 padding bits; setting
    # a padding bit decodes to the same key but is a different routing string.
    canonical = ALICE["app_id"]
    last = B64_ALPHABET.index(canonical[42])
    sloppy = canonical[:42] + B64_ALPHABET[last | 1] + "="
    assert sloppy != canonical
    assert base64.b64decode(sloppy) == base64.b64decode(canonical)
    with pytest.raises(EnSyncValidationError, match="canonical"):
        decode_app_id(sloppy)


def test_decode_app_id_rejects_non_text() -> None:
    with pytest.raises(EnSyncValidationError, match="must be a str"):
        decode_app_id(base64.b64decode(ALICE["app_id"]))  # type: ignore[arg-type]


def test_app_id_errors_never_echo_the_value() -> None:
    # Passing a secret key where an app id belongs must not put it in a log.
    with pytest.raises(EnSyncValidationError) as info:
        decode_app_id(ALICE["secret_key"])
    assert ALICE["secret_key"] not in str(info.value)
    with pytest.raises(EnSyncValidationError) as info:
        decode_app_id(ALICE["secret_key"][:-1])
    assert ALICE["secret_key"][:20] not in str(info.value)


def test_is_app_id_accepts_every_vector_key() -> None:
    assert all(is_app_id(v["app_id"]) for v in VECTORS["keypairs"])


# -- secret keys -----------------------------------------------------------


def test_decode_secret_key_accepts_both_lengths() -> None:
    assert len(decode_secret_key(ALICE["secret_key"])) == 64
    assert len(decode_secret_key(ALICE["x25519_secret"])) == 32


@pytest.mark.parametrize("size", [0, 16, 31, 33, 48, 63, 65, 96])
def test_decode_secret_key_rejects_other_lengths(size: int) -> None:
    with pytest.raises(EnSyncValidationError, match=f"not {size}$"):
        decode_secret_key(b64(bytes(size)))


@pytest.mark.parametrize(
    "text",
    [
        ALICE["secret_key"].rstrip("="),
        ALICE["secret_key"] + "\n",
        ALICE["secret_key"].replace("+", "-").replace("/", "_"),
        "not base64 at all!",
    ],
)
def test_decode_secret_key_is_strict_and_quiet(text: str) -> None:
    with pytest.raises(EnSyncValidationError) as info:
        decode_secret_key(text)
    assert ALICE["secret_key"][:20] not in str(info.value)


def test_decode_secret_key_rejects_bytes() -> None:
    with pytest.raises(EnSyncValidationError, match="must be a str"):
        decode_secret_key(base64.b64decode(ALICE["secret_key"]))  # type: ignore[arg-type]


# -- conversions, against ed2curve -----------------------------------------


@pytest.mark.parametrize("vector", VECTORS["keypairs"], ids=lambda v: v["name"])
def test_x25519_public_matches_ed2curve(vector: KeyPairVector) -> None:
    expected = base64.b64decode(vector["x25519_public"])
    assert x25519_public(vector["app_id"]) == expected
    assert x25519_public(base64.b64decode(vector["app_id"])) == expected
    # Other bytes-like values are tolerated at run time for untyped callers.
    raw = bytearray(base64.b64decode(vector["app_id"]))
    assert x25519_public(raw) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("vector", VECTORS["keypairs"], ids=lambda v: v["name"])
def test_x25519_secret_matches_ed2curve(vector: KeyPairVector) -> None:
    expected = base64.b64decode(vector["x25519_secret"])
    assert x25519_secret(vector["secret_key"]) == expected
    assert x25519_secret(base64.b64decode(vector["secret_key"])) == expected


@pytest.mark.parametrize("vector", VECTORS["keypairs"], ids=lambda v: v["name"])
def test_converted_halves_match(vector: KeyPairVector) -> None:
    key = opening_key(vector["secret_key"])
    assert key.x25519_public == base64.b64decode(vector["x25519_public"])
    assert bindings.crypto_scalarmult_base(key.x25519_secret) == key.x25519_public


def test_32_byte_secret_is_an_x25519_scalar_as_is() -> None:
    # The Python clients' reading of a 32-byte key (PROTOCOL.md §4.1).
    scalar = base64.b64decode(ALICE["x25519_secret"])
    assert x25519_secret(ALICE["x25519_secret"]) == scalar
    assert x25519_secret(scalar) == scalar
    assert opening_key(scalar).x25519_public == base64.b64decode(ALICE["x25519_public"])


def test_only_the_seed_half_of_a_secret_key_matters() -> None:
    # ed2curve and libsodium hash the seed alone; a damaged public half does
    # not change the X25519 scalar, and the map keys come from the seed.
    raw = bytearray(base64.b64decode(ALICE["secret_key"]))
    raw[40] ^= 0xFF
    key = opening_key(bytes(raw))
    assert key.x25519_secret == base64.b64decode(ALICE["x25519_secret"])
    assert ALICE["app_id"] in key.map_keys


def test_opening_key_map_keys_cover_every_dialect() -> None:
    key = opening_key(ALICE["secret_key"])
    ed_public = base64.b64decode(ALICE["app_id"])
    x_public = base64.b64decode(ALICE["x25519_public"])
    assert {ALICE["app_id"], ed_public.hex(), b64(x_public), x_public.hex()} == set(key.map_keys)


def test_opening_key_repr_hides_the_scalar() -> None:
    key = opening_key(ALICE["secret_key"])
    assert repr(key.x25519_secret) not in repr(key)


@pytest.mark.parametrize("vector", VECTORS["invalid_app_ids"], ids=lambda v: v["why"])
def test_unusable_public_keys_are_rejected(vector: InvalidAppIdVector) -> None:
    # Well-formed app ids whose bytes are no usable key. ed2curve rejects only
    # the non-points; for small-order points it returns a key (0 or 1) that
    # anyone can compute shared secrets with. libsodium, and so we, refuse both.
    assert is_app_id(vector["app_id"])
    with pytest.raises(EnSyncValidationError, match="not a usable Ed25519 key"):
        x25519_public(vector["app_id"])
    if "small-order" in vector["why"]:
        assert vector["ed2curve_convert_public_key"] is not None
    else:
        assert vector["ed2curve_convert_public_key"] is None


@pytest.mark.parametrize("value", [b"", bytes(31), bytes(33)])
def test_x25519_public_rejects_raw_keys_of_wrong_length(value: bytes) -> None:
    with pytest.raises(EnSyncValidationError, match="32 bytes"):
        x25519_public(value)


@pytest.mark.parametrize("value", [None, 42, ["a"]])
def test_conversions_reject_other_types(value: object) -> None:
    with pytest.raises(EnSyncValidationError):
        x25519_public(value)  # type: ignore[arg-type]
    with pytest.raises(EnSyncValidationError):
        x25519_secret(value)  # type: ignore[arg-type]


def test_x25519_secret_rejects_bad_raw_lengths() -> None:
    with pytest.raises(EnSyncValidationError, match="not 48"):
        x25519_secret(bytes(48))


# -- caching ---------------------------------------------------------------


def test_conversions_are_cached_per_key() -> None:
    clear_key_caches()
    first = x25519_public(ALICE["app_id"])
    second = x25519_public(ALICE["app_id"])
    assert first is second
    assert keys._x25519_public_cached.cache_info().hits == 1
    assert opening_key(ALICE["secret_key"]) is opening_key(ALICE["secret_key"])
    assert keys._opening_key_cached.cache_info().hits == 1
    assert keys._opening_key_cached.cache_info().maxsize is not None


def test_clear_key_caches_forgets_secrets() -> None:
    opening_key(ALICE["secret_key"])
    clear_key_caches()
    assert keys._opening_key_cached.cache_info().currsize == 0
    assert keys._x25519_public_cached.cache_info().currsize == 0


def test_failures_are_not_cached() -> None:
    clear_key_caches()
    for _ in range(2):
        with pytest.raises(EnSyncValidationError):
            x25519_public(VECTORS["invalid_app_ids"][0]["app_id"])
    assert keys._x25519_public_cached.cache_info().currsize == 0
