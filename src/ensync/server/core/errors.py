"""Errors the core reports to transports.

Each carries a :class:`ErrorCode`; transports turn it into ``success=false``
or ``-FAIL:<message>`` (never into a gRPC status that clients retry,
PROTOCOL.md §2.3). Messages name the offending value but never a payload,
an app key or a secret key.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "ServiceError"]


class ErrorCode(enum.Enum):
    """What kind of failure: chosen so each maps to one non-retryable status."""

    INVALID_ARGUMENT = "invalid argument"
    NOT_FOUND = "not found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission denied"
    FAILED_PRECONDITION = "failed precondition"
    LIMIT_EXCEEDED = "limit exceeded"
    UNAVAILABLE = "unavailable"


class ServiceError(Exception):
    """A request the core refused; ``message`` is safe to show the client."""

    def __init__(self, code: ErrorCode, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # For LIMIT_EXCEEDED: which limit (counted in /metrics under this name).
        self.limit = limit

    @classmethod
    def over_limit(cls, limit: str, message: str) -> ServiceError:
        return cls(ErrorCode.LIMIT_EXCEEDED, message, limit=limit)

    @classmethod
    def denied(cls, message: str) -> ServiceError:
        return cls(ErrorCode.PERMISSION_DENIED, message)

    @classmethod
    def invalid(cls, message: str) -> ServiceError:
        return cls(ErrorCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> ServiceError:
        return cls(ErrorCode.NOT_FOUND, message)

    @classmethod
    def internal(cls) -> ServiceError:
        """Our bug, not the caller's: it hears no more than that (the log has it)."""
        return cls(ErrorCode.UNAVAILABLE, "internal error")

    @classmethod
    def stopped(cls) -> ServiceError:
        """The engine stopped before the call was answered."""
        return cls(ErrorCode.UNAVAILABLE, "the engine stopped")

    @classmethod
    def unauthenticated(cls, message: str) -> ServiceError:
        return cls(ErrorCode.UNAUTHENTICATED, message)
