"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ensync.testing import TestServer, run_engine


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    """A real engine on free loopback ports, memory store, 1 s ack deadline."""
    async with run_engine(ack_deadline_ms=1000) as running:
        yield running
