"""Error texts the engine and the SDK agree on."""

from __future__ import annotations

__all__ = ["UNKNOWN_SESSION"]

# How every refusal for an unknown or expired client id begins. The SDK
# reads it as "the session is gone" (the engine restarted, or expired it) and
# reconnects, instead of failing call after call on a link that looks fine.
UNKNOWN_SESSION = "unknown client_id"
