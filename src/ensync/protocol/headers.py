"""Message headers with a meaning to ensync."""

from __future__ import annotations

__all__ = ["IDEMPOTENCY_HEADER", "MAX_IDEMPOTENCY_KEY_LENGTH"]

# Set by the ensync SDK on every publish (one random value per publish call).
# The engine returns the original idem for a publish that repeats the
# (sender, recipient, key) of one it stored within its deduplication window,
# so a publish retried after a lost answer is not stored twice.
IDEMPOTENCY_HEADER = "ensync-idempotency-key"

MAX_IDEMPOTENCY_KEY_LENGTH = 128
