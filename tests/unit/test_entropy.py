"""Buffered OS randomness for ids and idempotency keys."""

from __future__ import annotations

import re

from ensync._entropy import random_bytes, random_token


def test_tokens_are_url_safe_unpadded_and_unique() -> None:
    tokens = [random_token(16) for _ in range(5_000)]
    assert len(set(tokens)) == len(tokens)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", token) for token in tokens)


def test_consecutive_takes_never_overlap_and_large_takes_work() -> None:
    # Across several refills of the 4 KiB buffer, no 16-byte draw repeats.
    draws = [random_bytes(16) for _ in range(2_000)]
    assert len(set(draws)) == len(draws)
    big = random_bytes(10_000)
    assert len(big) == 10_000
    assert len(set(big)) > 200  # random, not a repeated buffer
