from __future__ import annotations

import pytest

from ensync.protocol.urls import parse_engine_url


@pytest.mark.parametrize(
    ("url", "scheme", "target"),
    [
        ("localhost", "grpc", "localhost:50051"),
        ("localhost:6000", "grpc", "localhost:6000"),
        ("127.0.0.1", "grpc", "127.0.0.1:50051"),
        ("engine.example.com", "grpcs", "engine.example.com:443"),
        ("engine.example.com:8443", "grpcs", "engine.example.com:8443"),
        ("grpc://engine:7000", "grpc", "engine:7000"),
        ("grpc://engine", "grpc", "engine:50051"),
        ("grpcs://engine", "grpcs", "engine:443"),
        ("GRPCS://engine:1", "grpcs", "engine:1"),
        ("grpc://[::1]:5000", "grpc", "[::1]:5000"),
    ],
)
def test_grpc_url_rules(url: str, scheme: str, target: str) -> None:
    parsed = parse_engine_url(url)
    assert parsed.scheme == scheme
    assert parsed.target == target
    assert parsed.secure == (scheme == "grpcs")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "empty"),
        ("http://x", "scheme 'http'"),
        ("ws://x", "scheme 'ws'"),
        ("grpc://", "no host"),
        ("grpc://x:notaport", "invalid port"),
        ("grpc://x:99999", "invalid port"),
    ],
)
def test_bad_grpc_urls_are_named(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_engine_url(url)


def test_websocket_urls() -> None:
    assert parse_engine_url("ws://h:8080/message", transport="ws").target == "h:8080"
    assert parse_engine_url("wss://h", transport="ws").port == 443
    with pytest.raises(ValueError, match="ws:// or wss://"):
        parse_engine_url("localhost", transport="ws")
