"""Publish input checks: what every official client can read, nothing that crashes."""

from __future__ import annotations

import pytest

from ensync.crypto import generate_keypair, seal, seal_hybrid
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.validation import (
    MAX_TTL_MS,
    check_payload,
    envelope_limit,
    json_bytes_of,
    parse_metadata,
    parse_payload_metadata,
    strict_json,
)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": -Infinity}',
        '{"a": 1e999}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
def test_strict_json_refuses_what_clients_cannot_read(text: str) -> None:
    with pytest.raises(ValueError):
        strict_json(text)


def test_metadata_with_non_finite_numbers_or_deep_nesting_is_invalid() -> None:
    for text in ('{"x": NaN}', '{"headers": {"a": 1e400}}', '{"x":' * 5000 + "1" + "}" * 5000):
        with pytest.raises(ServiceError) as caught:
            parse_metadata(text, 1 << 20)
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("ttl", [0, -5, MAX_TTL_MS + 1, 2**63, 10**30, 1.5, True])
def test_ttl_must_be_sensible(ttl: object) -> None:
    import json

    with pytest.raises(ServiceError) as caught:
        parse_metadata(json.dumps({"ttl_ms": ttl}), 1 << 20)
    assert "ttl_ms" in caught.value.message


def test_payload_metadata_that_is_not_clean_json_is_dropped() -> None:
    assert parse_payload_metadata('{"byte_size": NaN}') is None
    assert parse_payload_metadata("[" * 50_000) is None
    assert parse_payload_metadata('{"byte_size": 3}') == '{"byte_size": 3}'


def test_deeply_nested_payload_is_refused_not_crashed() -> None:
    import base64

    payload = base64.b64encode(b"[" * 30_000).decode()
    with pytest.raises(ServiceError) as caught:
        check_payload(payload, 1 << 20)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("size", [0, 1, 2, 3, 100, 4096, 65_536, 1 << 20])
def test_the_envelope_bound_holds_every_envelope_an_allowed_payload_makes(size: int) -> None:
    keys = [generate_keypair() for _ in range(40)]
    plaintext = b"x" * size
    single = seal(plaintext, keys[0].app_id)
    assert len(single) <= envelope_limit(size)
    assert len(single) > envelope_limit(size) - 600  # a bound, not a loophole
    check_payload(single, size)  # exactly at the limit: accepted
    for count in (1, 2, 40):
        hybrid = seal_hybrid(plaintext, [k.app_id for k in keys[:count]])
        assert len(hybrid) <= envelope_limit(size, count)
        check_payload(hybrid, size)
    if size >= 100:
        # The engine cannot see the JSON: its bound is exact to within the
        # room other clients' envelope layouts need (~200 bytes of JSON).
        over = size + max(size // 10, 300)
        bigger = seal(b"x" * over, keys[0].app_id)
        with pytest.raises(ServiceError) as caught:
            check_payload(bigger, size)
        assert caught.value.code is ErrorCode.LIMIT_EXCEEDED
        assert f"more than the limit of {size} bytes" in caught.value.message
        estimate = json_bytes_of(len(bigger))
        assert abs(estimate - over) <= 4  # "about" is close
