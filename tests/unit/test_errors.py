"""How errors read when printed: the reason once, the class name once."""

from __future__ import annotations

import traceback

from ensync import errors


def test_an_error_prints_its_reason_once_under_its_class_name() -> None:
    error = errors.EnSyncPublishError("payload is 9 bytes, more than the limit of 8 bytes")
    assert str(error) == "payload is 9 bytes, more than the limit of 8 bytes"
    assert error.name == "EnSyncPublishError"
    (line,) = traceback.format_exception_only(error)
    assert line == (
        "ensync.errors.EnSyncPublishError: payload is 9 bytes, more than the limit of 8 bytes\n"
    )
