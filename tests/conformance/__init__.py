"""Contract suites: written once, run against every backend and transport."""

__all__: list[str] = []
