"""The exceptions of ensync, all rooted at `EnSyncError`.

Every exception carries a ``name`` equal to the string the official EnSync
SDKs use for the same condition, so code that switches on ``error.name``
keeps working::

    EnSyncError                      "EnSyncError"
    ├── EnSyncConnectionError        "EnSyncConnectionError"   link down, engine unreachable
    │   └── EnSyncTimeoutError       "EnSyncTimeoutError"      a call got no answer in time
    ├── EnSyncAuthError              "EnSyncAuthError"         app key refused, session unknown
    ├── EnSyncValidationError        "EnSyncValidationError"   bad argument, caught before sending
    ├── EnSyncPublishError           "EnSyncPublishError"      the engine refused a publish
    ├── EnSyncSubscriptionError      "EnSyncSubscriptionError" subscribe/unsubscribe refused
    ├── EnSyncMessageError           "EnSyncMessageError"      a received message cannot be read
    ├── EnSyncAckError               "EnSyncAckError"          ack refused
    ├── EnSyncDeferError             "EnSyncDeferError"        defer refused
    ├── EnSyncDiscardError           "EnSyncDiscardError"      discard refused
    ├── EnSyncReplayError            "EnSyncReplayError"       replay refused (e.g. not found)
    ├── EnSyncPauseError             "EnSyncPauseError"        pause refused
    ├── EnSyncContinueError          "EnSyncContinueError"     continue refused
    └── EnSyncGenericError           "EnSyncGenericError"      anything else the engine reports

"The input or the peer was wrong" is an ``EnSyncError``; misuse of the API
(calling a method on a closed client) is also an ``EnSyncError`` subclass
named for the operation; a bug in ensync surfaces as an ordinary Python
exception and is never disguised as one of these.
"""

from __future__ import annotations

__all__ = [
    "EnSyncAckError",
    "EnSyncAuthError",
    "EnSyncConnectionError",
    "EnSyncContinueError",
    "EnSyncDeferError",
    "EnSyncDiscardError",
    "EnSyncError",
    "EnSyncGenericError",
    "EnSyncMessageError",
    "EnSyncPauseError",
    "EnSyncPublishError",
    "EnSyncReplayError",
    "EnSyncSubscriptionError",
    "EnSyncTimeoutError",
    "EnSyncValidationError",
]


class EnSyncError(Exception):
    """Root of every error ensync raises on purpose.

    Attributes:
        name: the error's type name as the official SDKs spell it.
        message: the human-readable reason, naming the offending value.
    """

    name = "EnSyncError"

    def __init__(self, message: str = "An error occurred with the EnSync service.") -> None:
        super().__init__(message)
        self.message = message


class EnSyncConnectionError(EnSyncError):
    """The engine cannot be reached, or the link broke during a call."""

    name = "EnSyncConnectionError"


class EnSyncTimeoutError(EnSyncConnectionError):
    """A call got no answer within its deadline."""

    name = "EnSyncTimeoutError"


class EnSyncAuthError(EnSyncError):
    """The app key was refused, or the session is no longer known."""

    name = "EnSyncAuthError"


class EnSyncValidationError(EnSyncError):
    """An argument is invalid; raised before anything is sent."""

    name = "EnSyncValidationError"


class EnSyncPublishError(EnSyncError):
    """The engine refused a publish."""

    name = "EnSyncPublishError"


class EnSyncSubscriptionError(EnSyncError):
    """A subscribe or unsubscribe failed."""

    name = "EnSyncSubscriptionError"


class EnSyncMessageError(EnSyncError):
    """A received message could not be decrypted or parsed."""

    name = "EnSyncMessageError"


class EnSyncAckError(EnSyncError):
    """The engine refused an acknowledgement."""

    name = "EnSyncAckError"


class EnSyncDeferError(EnSyncError):
    """The engine refused a defer."""

    name = "EnSyncDeferError"


class EnSyncDiscardError(EnSyncError):
    """The engine refused a discard."""

    name = "EnSyncDiscardError"


class EnSyncReplayError(EnSyncError):
    """The engine refused a replay (for example: no such message)."""

    name = "EnSyncReplayError"


class EnSyncPauseError(EnSyncError):
    """The engine refused a pause."""

    name = "EnSyncPauseError"


class EnSyncContinueError(EnSyncError):
    """The engine refused a continue (resume)."""

    name = "EnSyncContinueError"


class EnSyncGenericError(EnSyncError):
    """Any other failure reported by the engine."""

    name = "EnSyncGenericError"
