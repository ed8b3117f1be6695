from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.client.backoff import backoff_delay_s


def test_doubles_then_caps() -> None:
    ceilings = [backoff_delay_s(n, 100, 1000, 0.999999) for n in range(1, 8)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0], rel=1e-3)


@given(
    attempt=st.integers(1, 200),
    base=st.integers(1, 10_000),
    cap=st.integers(1, 120_000),
    jitter=st.floats(0, 1, exclude_max=True),
)
def test_delay_stays_in_the_upper_half_of_the_ceiling(
    attempt: int, base: int, cap: int, jitter: float
) -> None:
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30)) / 1000
    delay = backoff_delay_s(attempt, base, cap, jitter)
    assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_clients() -> None:
    assert backoff_delay_s(3, 100, 10_000, 0.0) < backoff_delay_s(3, 100, 10_000, 0.9)


@pytest.mark.parametrize(("attempt", "jitter"), [(0, 0.5), (1, 1.0), (1, -0.1)])
def test_bad_arguments(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay_s(attempt, 100, 1000, jitter)
