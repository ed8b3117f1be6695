"""The ``ensync`` command line."""

__all__: list[str] = []
