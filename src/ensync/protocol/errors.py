"""Error texts the engine and the SDK agree on."""

from __future__ import annotations

__all__ = ["STORE_UNAVAILABLE", "UNKNOWN_SESSION"]

# How every refusal for an unknown or expired client id begins. The SDK
# reads it as "the session is gone" (the engine restarted, or expired it) and
# reconnects, instead of failing call after call on a link that looks fine.
UNKNOWN_SESSION = "unknown client_id"

# How the engine says its store failed under a request (a replicated store
# electing a leader, a full disk): worth retrying, never a refused key. The
# SDK reconnects instead of failing for good when a connect hears it.
STORE_UNAVAILABLE = "storage failed; retry later"
