"""Calls and their answers as bytes, for a node that forwards to a partition's owner.

Any engine node accepts any client; a call on a partition the node does not
own goes to the owner, batched (docs/architecture.md, "One owner per
partition"). A batch of calls (:mod:`ensync.server.core.calls`) travels as
one message and comes back as one message of answers, in the same order:
a value (an idem, a time, nothing) or a refusal (:class:`ServiceError`'s
code, message and limit).

The form is JSON arrays, a type tag first and the fields in declaration
order: compact, and readable in a packet capture. Sans-I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ensync._json import dumps_compact, loads_strict
from ensync.server.core.calls import (
    Observe,
    Pause,
    Publish,
    Replay,
    Resume,
    Settle,
    SettleKind,
    Subscribe,
    Unsubscribe,
)
from ensync.server.core.errors import ErrorCode, ServiceError

__all__ = ["Answer", "Call", "decode_answers", "decode_calls", "encode_answers", "encode_calls"]

Call = Publish | Settle | Subscribe | Unsubscribe | Pause | Resume | Replay | Observe
Answer = str | int | None | ServiceError

_TAGS: dict[type[Any], str] = {
    Publish: "p",
    Settle: "s",
    Subscribe: "sub",
    Unsubscribe: "uns",
    Pause: "pau",
    Resume: "res",
    Replay: "rep",
    Observe: "obs",
}
_TYPES = {tag: kind for kind, tag in _TAGS.items()}
_FORMAT = 1  # the first item of every batch: a node refuses a form it does not know


def encode_calls(calls: Sequence[Call]) -> bytes:
    """A batch of calls as one message."""
    items: list[Any] = [_FORMAT]
    for call in calls:
        fields = [getattr(call, f.name) for f in dataclasses.fields(call)]
        if isinstance(call, Settle):
            fields = [value.value if isinstance(value, SettleKind) else value for value in fields]
        items.append([_TAGS[type(call)], *fields])
    return dumps_compact(items)


def decode_calls(data: bytes) -> list[Call]:
    """The calls `encode_calls` wrote; ValueError if ``data`` is not such a batch."""
    try:
        form, *items = loads_strict(data)
        if form != _FORMAT:
            raise ValueError(f"form {form!r}")
        calls: list[Call] = []
        for tag, *values in items:
            kind = _TYPES[tag]
            names = [f.name for f in dataclasses.fields(kind)]
            if len(values) != len(names):
                raise ValueError(f"{len(values)} fields for {kind.__name__}")
            arguments = dict(zip(names, values, strict=True))
            if kind is Settle:
                arguments["kind"] = SettleKind(arguments["kind"])
            _check_types(kind, arguments)
            calls.append(kind(**arguments))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a batch of forwarded calls: {exc}") from None
    return calls


def _check_types(kind: type[Any], arguments: dict[str, Any]) -> None:
    # What JSON gives back must be what the dataclass declares: a forwarding
    # node is trusted, but a bug there must not reach the core as a wrong type.
    for name, value in arguments.items():
        if name in ("delay_ms",):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif name == "stop":
            ok = isinstance(value, bool)
        elif name == "kind":
            ok = isinstance(value, SettleKind)
        elif name in ("name", "payload_metadata"):
            ok = value is None or isinstance(value, str)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise TypeError(f"{kind.__name__}.{name} is {type(value).__name__}")


def encode_answers(answers: Sequence[Answer]) -> bytes:
    """Answers to a batch, in its order, as one message."""
    items: list[Any] = [_FORMAT]
    for answer in answers:
        if isinstance(answer, ServiceError):
            items.append(["e", answer.code.value, answer.message, answer.limit])
        else:
            items.append(["v", answer])
    return dumps_compact(items)


def decode_answers(data: bytes) -> list[Answer]:
    """The answers `encode_answers` wrote; ValueError if ``data`` is not such a message."""
    try:
        form, *items = loads_strict(data)
        if form != _FORMAT:
            raise ValueError(f"form {form!r}")
        answers: list[Answer] = []
        for tag, *values in items:
            if tag == "v" and len(values) == 1:
                (value,) = values
                if not (value is None or isinstance(value, str | int)) or isinstance(value, bool):
                    raise TypeError(f"answer {value!r}")
                answers.append(value)
            elif tag == "e" and len(values) == 3:
                code, message, limit = values
                answers.append(ServiceError(ErrorCode(code), str(message), limit=limit))
            else:
                raise ValueError(f"answer tag {tag!r}")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not forwarded answers: {exc}") from None
    return answers
