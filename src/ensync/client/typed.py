"""Typed payloads: dataclasses and pydantic models in, and out again.

pydantic is optional: a model is recognised by its ``model_dump`` /
``model_validate`` methods (pydantic 2), never imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ensync import errors

__all__ = ["as_payload", "check_model", "from_payload"]


def as_payload(payload: object) -> Mapping[str, Any]:
    """The JSON object to send for ``payload``.

    A mapping as it is, a dataclass instance as its fields, a pydantic model
    as its JSON dump.
    """
    if isinstance(payload, Mapping):
        return payload
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        return dataclasses.asdict(payload)
    dump = getattr(payload, "model_dump", None)
    if callable(dump) and not isinstance(payload, type):
        dumped = dump(mode="json")
        if isinstance(dumped, Mapping):
            return dumped
    raise errors.EnSyncValidationError(
        "payload must be a JSON object (a mapping), a dataclass or a pydantic model,"
        f" not {type(payload).__name__}"
    )


def check_model(model: object) -> type[Any]:
    """``model`` must be a dataclass or a pydantic model class."""
    if isinstance(model, type) and (
        dataclasses.is_dataclass(model) or callable(getattr(model, "model_validate", None))
    ):
        return model
    raise errors.EnSyncValidationError(
        f"model must be a dataclass or a pydantic model class, not {model!r}"
    )


def from_payload(model: type[Any], payload: Any) -> Any:
    """``payload`` as an instance of ``model``.

    Raises:
        ValueError: the payload does not fit (pydantic's ValidationError is one).
    """
    if not isinstance(payload, dict):
        raise ValueError(f"the payload is a {type(payload).__name__}, not a JSON object")
    if dataclasses.is_dataclass(model):
        try:
            return model(**payload)
        except TypeError as exc:  # a missing or an unknown field
            raise ValueError(str(exc)) from None
    return model.model_validate(payload)
