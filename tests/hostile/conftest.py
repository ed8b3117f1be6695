"""The arena every hostile test fights in: a fresh engine process of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.hostile.common import touch_hostile_paths
from tests.hostile.harness import Arena


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    """A live ``ensync serve`` with steady traffic flowing and a baseline taken."""
    running = await Arena.open(tmp_path)
    try:
        await touch_hostile_paths(running)
        await running.take_baseline()
        yield running
    finally:
        await running.close()
