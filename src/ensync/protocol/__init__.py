"""Sans-I/O protocol helpers shared by the engine and the SDK."""

from ensync.protocol.names import MAX_NAME_LENGTH, is_valid_name, validate_name

__all__ = ["MAX_NAME_LENGTH", "is_valid_name", "validate_name"]
