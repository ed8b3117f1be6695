"""Fixtures shared by every test directory, and the session-wide secret-leak scan."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ensync.testing import TestServer, run_engine

# Captures the whole run's logs and error messages and fails the run if an
# app key, secret key or published plaintext shows up in them (DESIGN.md §6).
# A test that times out fails alone, not the tests after it (tests/support/timeouts.py).
pytest_plugins = ["tests.support.leaks", "tests.support.timeouts"]


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    """A real engine on free loopback ports, memory store, 1 s ack deadline."""
    async with run_engine(ack_deadline_ms=1000) as running:
        yield running
