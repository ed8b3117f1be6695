"""Request rates per app: token buckets that take the time as an argument."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateLimiter"]


@dataclass(eq=False, slots=True)
class _Bucket:
    tokens: float
    updated_ms: int


class RateLimiter:
    """``rate`` requests a second per key, in bursts of up to one second's worth;
    a rate of 0 allows everything."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now_ms: int) -> bool:
        """Spend one token of ``key``'s bucket; ``False`` if it is empty."""
        rate = self._rate
        if rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(rate), now_ms)
        elapsed = max(0, now_ms - bucket.updated_ms)
        bucket.tokens = min(float(rate), bucket.tokens + elapsed * rate / 1000)
        bucket.updated_ms = now_ms
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
