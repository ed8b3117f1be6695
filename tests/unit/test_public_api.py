"""The package exports what the docs promise.

That layers import downward only is checked by import-linter (``make lint``:
the contracts in pyproject.toml), which sees relative imports too.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import ensync
from ensync import errors

SRC = Path(ensync.__file__).parent


def test_top_level_exports() -> None:
    for name in ("EnSyncEngine", "EnSyncClient", "Subscription", "Message", "EnSyncError"):
        assert name in ensync.__all__
        assert getattr(ensync, name) is not None
    assert sorted(ensync.__all__) == sorted(set(ensync.__all__))


def test_every_module_declares_all() -> None:
    for module in pkgutil.walk_packages([str(SRC)], prefix="ensync."):
        if module.name.startswith("ensync._proto"):
            continue
        loaded = importlib.import_module(module.name)
        assert hasattr(loaded, "__all__"), module.name
        for name in loaded.__all__:
            assert hasattr(loaded, name), f"{module.name}.{name}"


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (errors.EnSyncError, "EnSyncError"),
        (errors.EnSyncConnectionError, "EnSyncConnectionError"),
        (errors.EnSyncAuthError, "EnSyncAuthError"),
        (errors.EnSyncPublishError, "EnSyncPublishError"),
        (errors.EnSyncSubscriptionError, "EnSyncSubscriptionError"),
        (errors.EnSyncGenericError, "EnSyncGenericError"),
        (errors.EnSyncValidationError, "EnSyncValidationError"),
        (errors.EnSyncTimeoutError, "EnSyncTimeoutError"),
        (errors.EnSyncReplayError, "EnSyncReplayError"),
        (errors.EnSyncDeferError, "EnSyncDeferError"),
        (errors.EnSyncDiscardError, "EnSyncDiscardError"),
        (errors.EnSyncPauseError, "EnSyncPauseError"),
        (errors.EnSyncContinueError, "EnSyncContinueError"),
    ],
)
def test_error_names_match_the_official_sdks(cls: type[errors.EnSyncError], name: str) -> None:
    error = cls("boom")
    assert error.name == name
    assert isinstance(error, errors.EnSyncError)
    assert str(error) == "boom"  # the class name prints once, from the traceback
