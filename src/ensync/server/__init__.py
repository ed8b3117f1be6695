"""The ensync engine: core, stores and transports."""

__all__: list[str] = []
