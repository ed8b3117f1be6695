"""Fault tests: the engine killed for real, links dropped mid-stream."""
