"""Fixtures shared by the conformance suites."""

from tests.conformance.sdk_setup import setup

__all__ = ["setup"]
