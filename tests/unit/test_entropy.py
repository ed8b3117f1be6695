"""Buffered OS randomness for ids and idempotency keys."""

from __future__ import annotations

import os
import re

from ensync._entropy import EntropyBuffer, random_bytes, random_token


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


def test_a_buffer_over_another_source_refills_a_chunk_at_a_time() -> None:
    asked: list[int] = []

    def fill(count: int) -> bytes:
        asked.append(count)
        return os.urandom(count)

    buffer = EntropyBuffer(chunk=64, fill=fill)
    draws = [buffer.take(24) for _ in range(4)]  # 48 of the first 64, then a refill
    assert asked == [64, 64]
    assert len(set(draws)) == 4
    assert len(buffer.take(100)) == 100  # more than a chunk: straight from the source
    assert asked == [64, 64, 100]
    buffer.forget()
    buffer.take(1)
    assert asked == [64, 64, 100, 64]
