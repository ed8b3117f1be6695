"""Wire adapters over the engine core: gRPC, WebSocket, HTTP."""

__all__: list[str] = []
