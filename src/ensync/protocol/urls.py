"""Engine URLs: which host, port and security the SDK connects with.

Rules (DESIGN.md §4): ``grpc://`` is plaintext, ``grpcs://`` is TLS;
a bare loopback host (``localhost``, ``127.0.0.1``, ``::1``) means plaintext
on 50051; any other bare host means TLS on 443; an explicit port is always
honoured. ``ws://`` and ``wss://`` are for the WebSocket engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["EngineUrl", "parse_engine_url"]

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_DEFAULT_PORTS = {"grpc": 50051, "grpcs": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class EngineUrl:
    """A parsed engine URL."""

    scheme: Literal["grpc", "grpcs", "ws", "wss"]
    host: str
    port: int
    path: str = ""

    @property
    def secure(self) -> bool:
        return self.scheme in ("grpcs", "wss")

    @property
    def target(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_engine_url(url: str, *, transport: Literal["grpc", "ws"] = "grpc") -> EngineUrl:
    """Parse ``url`` for the given transport; ``ValueError`` names what is wrong.

    >>> parse_engine_url("localhost")
    EngineUrl(scheme='grpc', host='localhost', port=50051, path='')
    >>> parse_engine_url("engine.example.com").target
    'engine.example.com:443'
    """
    text = url.strip()
    if not text:
        raise ValueError("engine URL is empty")
    if "://" not in text:
        if transport == "ws":
            raise ValueError(f"WebSocket engine URL {url!r} needs a ws:// or wss:// scheme")
        parts = urlsplit("//" + text)
        host = parts.hostname or ""
        scheme: Literal["grpc", "grpcs", "ws", "wss"] = "grpc" if host in _LOOPBACK else "grpcs"
    else:
        parts = urlsplit(text)
        raw_scheme = parts.scheme.lower()
        allowed = ("grpc", "grpcs") if transport == "grpc" else ("ws", "wss")
        if raw_scheme not in allowed:
            raise ValueError(
                f"engine URL {url!r} has scheme {raw_scheme!r}; use {' or '.join(allowed)}"
            )
        scheme = raw_scheme  # type: ignore[assignment]
        host = parts.hostname or ""
    if not host:
        raise ValueError(f"engine URL {url!r} has no host")
    try:
        explicit = parts.port
    except ValueError:
        raise ValueError(f"engine URL {url!r} has an invalid port") from None
    if explicit is not None:
        port = explicit
    elif "://" not in text and host in _LOOPBACK:
        port = 50051
    else:
        port = _DEFAULT_PORTS[scheme]
    path = parts.path if scheme in ("ws", "wss") else ""
    return EngineUrl(scheme=scheme, host=host, port=port, path=path)
