"""Reconnection delays: capped exponential backoff with jitter (a pure function)."""

from __future__ import annotations

__all__ = ["backoff_delay_s"]


def backoff_delay_s(attempt: int, base_ms: int, cap_ms: int, jitter: float) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1-based).

    The ceiling doubles from ``base_ms`` each attempt up to ``cap_ms``; the
    delay is a random point in its upper half (``jitter`` in [0, 1) picks
    it), so that many clients cut off at once do not return in lockstep.

    >>> backoff_delay_s(1, 1000, 30_000, 0.0)
    0.5
    >>> backoff_delay_s(10, 1000, 30_000, 0.999)  # capped
    29.985
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    ceiling_ms: int = min(cap_ms, base_ms * (2 ** min(attempt - 1, 30)))
    return float(ceiling_ms * (0.5 + jitter / 2) / 1000)
