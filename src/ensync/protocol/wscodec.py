"""The WebSocket text protocol (PROTOCOL.md §3) as pure functions over strings.

Client → server: :func:`parse_request` turns one text frame into a request
dataclass (or :class:`Malformed`); :func:`format_request` writes the frame our
SDK sends. Server → client: :func:`format_reply` / :func:`parse_reply`, the
record JSON (:func:`record_to_json` / :func:`parse_record`) and the CONN reply
text (:func:`format_conn_pass` / :func:`parse_conn_pass`). Ordering replies
and binding client ids is :mod:`ensync.protocol.wssession`'s job.

Nothing here raises on peer input: every problem becomes ``Malformed(reason)``
with a short reason that names the offending value. ``ValueError`` is raised
only for our own misuse (``format_*`` given values that cannot be framed).

How a request line is split (§3.2-§3.4), in one pass, linear in its length:

* the command is the text before the first ``;``;
* a field starts at ``;KEY=:`` where KEY is one the command carries
  (EVENT_* and MESSAGE_* spellings alike; PARTITION_BLOCK = BLOCK); keys may
  come in any order, a repeated key is malformed;
* CLIENT_ID, names, idems, PAYLOAD, DELIVERY_TO, BLOCK and DELAY never hold
  ``;`` (§3.4 rule 2): their value ends at the next ``;``, which must start
  another key of the command;
* REASON (and ACCESS_KEY, CONN's only key) is the rest of the line (rule 4);
* METADATA and PAYLOAD_METADATA are JSON: a value ends where its JSON value
  ends, if a key of the command follows there. Otherwise METADATA runs to the
  last ``;PAYLOAD_METADATA=:`` (or the end) and PAYLOAD_METADATA to the end
  (rule 3). Since a string has at most one prefix that is a JSON document,
  this finds the split "where both parse" whenever there is one, without
  trying every occurrence (which would be quadratic on hostile input).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from ensync.protocol.wsreplies import (
    Delivered,
    Fail,
    Pass,
    Ping,
    Record,
    Replayed,
    Reply,
    format_conn_pass,
    format_reply,
    parse_conn_fields,
    parse_conn_pass,
    parse_record,
    parse_reply,
    record_to_json,
)
from ensync.protocol.wsrequests import (
    MAX_REASON_LENGTH,
    Ack,
    Conn,
    Continue,
    Defer,
    Discard,
    Extend,
    Malformed,
    Pause,
    Pong,
    Pub,
    Replay,
    Request,
    Rollback,
    Sub,
    Unsub,
)
from ensync.protocol.wsrequests import int_or_none as _int_or_none
from ensync.protocol.wsrequests import malformed as _malformed
from ensync.protocol.wsrequests import show as _show

__all__ = [
    "MAX_REASON_LENGTH",
    "Ack",
    "Conn",
    "Continue",
    "Defer",
    "Delivered",
    "Discard",
    "Extend",
    "Fail",
    "Malformed",
    "Pass",
    "Pause",
    "Ping",
    "Pong",
    "Pub",
    "Record",
    "Replay",
    "Replayed",
    "Reply",
    "Request",
    "Rollback",
    "Sub",
    "Unsub",
    "format_conn_pass",
    "format_reply",
    "format_request",
    "parse_conn_fields",
    "parse_conn_pass",
    "parse_record",
    "parse_reply",
    "parse_request",
    "record_to_json",
]

# ---------------------------------------------------------------------------
# Keys and commands


class _Field(enum.Enum):
    """A request field; the value is the key our SDK writes (EVENT_* like every client)."""

    ACCESS_KEY = "ACCESS_KEY"
    CLIENT_ID = "CLIENT_ID"
    NAME = "EVENT_NAME"
    IDEM = "EVENT_IDEM"
    PAYLOAD = "PAYLOAD"
    DELIVERY_TO = "DELIVERY_TO"
    METADATA = "METADATA"
    PAYLOAD_METADATA = "PAYLOAD_METADATA"
    BLOCK = "BLOCK"
    DELAY = "DELAY"
    REASON = "REASON"


_F = _Field

# Values a refusal must never echo: the app key, the session's bearer token,
# the payload (DESIGN.md §6).
_SECRET_FIELDS: Final = frozenset({_F.ACCESS_KEY, _F.CLIENT_ID, _F.PAYLOAD})
# Accepted spellings: MESSAGE_* for our own SDK's older drafts (§7.12),
# PARTITION_BLOCK from G-ws ROLLBACK (§3.3). Accepted in ACK too: harmless, as
# ACK carries no free-text value a key could hide in.
_WIRE_KEYS: dict[str, _Field] = {f.value: f for f in _Field} | {
    "MESSAGE_NAME": _F.NAME,
    "MESSAGE_IDEM": _F.IDEM,
    "PARTITION_BLOCK": _F.BLOCK,
}
_REST_OF_LINE = frozenset({_F.ACCESS_KEY, _F.REASON})  # §3.4 rule 4; CONN has one key
_JSON_VALUED = frozenset({_F.METADATA, _F.PAYLOAD_METADATA})  # §3.4 rule 3

_ANY_KEY = re.compile(r";([A-Z_]{1,40})=:")
_JSON_WS = re.compile(r"[ \t\n\r]*")  # what json.loads skips around a value
_DECODER = json.JSONDecoder()
_PM_SEP = ";PAYLOAD_METADATA=:"

_Fields: TypeAlias = Mapping[_Field, str]


@dataclass(frozen=True, slots=True)
class _Command:
    word: str
    fields: tuple[_Field, ...]  # §3.3 order; format_request writes them in it
    optional: frozenset[_Field]
    build: Callable[[_Fields], Request | Malformed]
    boundary: re.Pattern[str]  # ";KEY=:" for every spelling of this command's keys
    # Optional fields format_request leaves out when empty (None is always left out).
    omit_if_empty: frozenset[_Field] = frozenset()


def _command(
    word: str,
    fields: tuple[_Field, ...],
    optional: tuple[_Field, ...],
    build: Callable[[_Fields], Request | Malformed],
    omit_if_empty: tuple[_Field, ...] = (),
) -> _Command:
    spellings = sorted((k for k, f in _WIRE_KEYS.items() if f in fields), key=len, reverse=True)
    boundary = re.compile(";(" + "|".join(spellings) + ")=:")
    return _Command(word, fields, frozenset(optional), build, boundary, frozenset(omit_if_empty))


def _defer(f: _Fields) -> Defer | Malformed:
    delay = _int_or_none(f[_F.DELAY])
    if delay is None:
        return _malformed(f"DELAY {_show(f[_F.DELAY])} is not an integer")
    return Defer(f[_F.CLIENT_ID], f[_F.IDEM], f.get(_F.NAME, ""), delay, f.get(_F.REASON, ""))


_COMMANDS: dict[str, _Command] = {
    c.word: c
    for c in (
        _command("CONN", (_F.ACCESS_KEY,), (), lambda f: Conn(f[_F.ACCESS_KEY])),
        _command(
            "PUB",
            (_F.CLIENT_ID, _F.NAME, _F.PAYLOAD, _F.DELIVERY_TO, _F.METADATA, _F.PAYLOAD_METADATA),
            (_F.PAYLOAD_METADATA,),
            lambda f: Pub(
                f[_F.CLIENT_ID],
                f[_F.NAME],
                f[_F.PAYLOAD],
                f[_F.DELIVERY_TO],
                f[_F.METADATA],
                f.get(_F.PAYLOAD_METADATA),
            ),
        ),
        _command("SUB", (_F.CLIENT_ID, _F.NAME), (), lambda f: Sub(f[_F.CLIENT_ID], f[_F.NAME])),
        _command(
            "UNSUB", (_F.CLIENT_ID, _F.NAME), (), lambda f: Unsub(f[_F.CLIENT_ID], f[_F.NAME])
        ),
        _command(
            "ACK",
            (_F.CLIENT_ID, _F.IDEM, _F.BLOCK, _F.NAME),
            (_F.BLOCK, _F.NAME),
            lambda f: Ack(
                f[_F.CLIENT_ID], f[_F.IDEM], _int_or_none(f.get(_F.BLOCK)), f.get(_F.NAME, "")
            ),
        ),
        _command(
            "ROLLBACK",
            (_F.CLIENT_ID, _F.IDEM, _F.BLOCK, _F.REASON),
            (_F.BLOCK, _F.REASON),
            lambda f: Rollback(
                f[_F.CLIENT_ID],
                f[_F.IDEM],
                _int_or_none(f.get(_F.BLOCK)),
                f.get(_F.REASON, ""),
            ),
            # REASON is our extension: official clients' ROLLBACK has none.
            omit_if_empty=(_F.REASON,),
        ),
        _command(
            "DEFER",
            (_F.CLIENT_ID, _F.IDEM, _F.NAME, _F.DELAY, _F.REASON),
            (_F.NAME, _F.REASON),
            _defer,
        ),
        _command(
            "DISCARD",
            (_F.CLIENT_ID, _F.IDEM, _F.NAME, _F.REASON),
            (_F.NAME, _F.REASON),
            lambda f: Discard(
                f[_F.CLIENT_ID], f[_F.IDEM], f.get(_F.NAME, ""), f.get(_F.REASON, "")
            ),
        ),
        _command(
            "REPLAY",
            (_F.CLIENT_ID, _F.IDEM, _F.NAME),
            (_F.NAME,),
            lambda f: Replay(f[_F.CLIENT_ID], f[_F.IDEM], f.get(_F.NAME, "")),
        ),
        _command(
            "PAUSE",
            (_F.CLIENT_ID, _F.NAME, _F.REASON),
            (_F.REASON,),
            lambda f: Pause(f[_F.CLIENT_ID], f[_F.NAME], f.get(_F.REASON, "")),
        ),
        _command(
            "CONTINUE",
            (_F.CLIENT_ID, _F.NAME),
            (),
            lambda f: Continue(f[_F.CLIENT_ID], f[_F.NAME]),
        ),
        _command(
            "EXTEND",
            (_F.CLIENT_ID, _F.IDEM, _F.NAME),
            (_F.NAME,),
            lambda f: Extend(f[_F.CLIENT_ID], f[_F.IDEM], f.get(_F.NAME, "")),
        ),
    )
}


# The request dataclass each command parses into (and is written from), and
# the attribute that holds each field's value.
_WORDS: Final[dict[type, str]] = {
    Conn: "CONN",
    Pub: "PUB",
    Sub: "SUB",
    Unsub: "UNSUB",
    Ack: "ACK",
    Rollback: "ROLLBACK",
    Defer: "DEFER",
    Discard: "DISCARD",
    Replay: "REPLAY",
    Pause: "PAUSE",
    Continue: "CONTINUE",
    Extend: "EXTEND",
}
_ATTRIBUTES: Final[dict[_Field, str]] = {
    _F.ACCESS_KEY: "access_key",
    _F.CLIENT_ID: "client_id",
    _F.NAME: "name",
    _F.IDEM: "idem",
    _F.PAYLOAD: "payload",
    _F.DELIVERY_TO: "delivery_to",
    _F.METADATA: "metadata",
    _F.PAYLOAD_METADATA: "payload_metadata",
    _F.BLOCK: "block",
    _F.DELAY: "delay_ms",
    _F.REASON: "reason",
}


# ---------------------------------------------------------------------------
# parse_request


def parse_request(text: str) -> Request | Malformed:
    """Parse one client text frame (§3.2-§3.4). Never raises.

    Returns a request dataclass, ``Pong()`` for bare ``PONG`` (which must get
    no reply), or ``Malformed(reason)`` to be answered ``-FAIL:<reason>``.
    A server hands the result to ``ServerSession`` rather than calling this.
    """
    word, sep, _ = text.partition(";")
    if word == "PONG":
        return Pong() if not sep else _malformed("PONG takes no keys")
    command = _COMMANDS.get(word)
    if command is None:
        if not word:
            return _malformed("empty command")
        # Echo only what looks like a command word: the text may be anything
        # a client sent, a key included.
        shown = _show(word) if re.fullmatch(r"[A-Za-z_]{1,16}", word) else "(not a command word)"
        return _malformed(f"unknown command {shown}")
    fields = _split_fields(command, text, len(word))
    if isinstance(fields, Malformed):
        return fields
    for wanted in command.fields:
        if wanted not in fields and wanted not in command.optional:
            return _malformed(f"{command.word} lacks {wanted.value}")
    return command.build(fields)


def _split_fields(command: _Command, text: str, pos: int) -> dict[_Field, str] | Malformed:
    fields: dict[_Field, str] = {}
    spelled: dict[_Field, str] = {}  # the key as sent, for "given twice" reasons
    end_of_text = len(text)
    while pos < end_of_text:
        # Every value below ends at the end of the text or at a boundary of
        # this command, except a never-';' value followed by a stray ';'.
        match = command.boundary.match(text, pos)
        if match is None:
            return _unexpected(command, text, pos, fields, spelled)
        key = match.group(1)
        which = _WIRE_KEYS[key]
        if which in fields:
            first = spelled[which]
            twice = f"{key} twice" if first == key else f"both {first} and {key}"
            return _malformed(f"{command.word} gives {twice}")
        start = match.end()
        if which in _REST_OF_LINE:
            end = end_of_text
        elif which is _F.METADATA:
            end = _metadata_end(command, text, start, _F.PAYLOAD_METADATA in fields)
        elif which is _F.PAYLOAD_METADATA:
            end = _json_field_end(command, text, start)
        else:
            found = text.find(";", start)
            end = end_of_text if found < 0 else found
        fields[which] = text[start:end]
        spelled[which] = key
        pos = end
    return fields


def _unexpected(
    command: _Command,
    text: str,
    pos: int,
    fields: dict[_Field, str],
    spelled: dict[_Field, str],
) -> Malformed:
    takes = ", ".join(f.value for f in command.fields)
    other = _ANY_KEY.match(text, pos)
    if other is not None:
        return _malformed(
            f"{command.word} does not take key {_show(other.group(1))} (it takes {takes})"
        )
    if not fields:
        # What follows may be a key (CONN's is the app key): never echo it.
        return _malformed(f"expected ';KEY=:' after {command.word}")
    # The previous field is a never-';' value (the other kinds end at a
    # boundary), so this ';' is inside it: §3.4 rule 2 says it cannot be.
    last = next(reversed(fields))
    if last in _SECRET_FIELDS:
        return _malformed(f"{spelled[last]} value contains ';'")
    value = fields[last] + text[pos:]
    return _malformed(f"{spelled[last]} value {_show(value)} contains ';'")


def _skip_ws(text: str, pos: int) -> int:
    found = _JSON_WS.match(text, pos)
    return pos if found is None else found.end()


def _json_end(text: str, start: int) -> int | None:
    """Index after the JSON value at ``start`` and the whitespace after it, or None."""
    try:
        _, end = _DECODER.raw_decode(text, _skip_ws(text, start))
    except (ValueError, RecursionError):  # not JSON; too deep; too many digits
        return None
    return _skip_ws(text, end)


def _json_field_end(command: _Command, text: str, start: int) -> int:
    """End of a JSON-valued field: after its JSON if a key follows, else end of line."""
    end = _json_end(text, start)
    if end is not None and (end == len(text) or command.boundary.match(text, end)):
        return end
    return len(text)


def _metadata_end(command: _Command, text: str, start: int, pm_seen: bool) -> int:
    """End of METADATA (§3.4 rule 3).

    A split "where both parse" needs METADATA's JSON to end exactly at the
    split, and only one prefix of a string is a JSON document, so there is
    at most one candidate: check it, else fall back to the last occurrence.
    """
    end = _json_end(text, start)
    if end is not None:
        if end == len(text):
            return end
        follows = command.boundary.match(text, end)
        if follows is not None:
            if follows.group(1) != "PAYLOAD_METADATA" or pm_seen:
                return end
            pm_end = _json_end(text, follows.end())
            if pm_end is not None and (pm_end == len(text) or command.boundary.match(text, pm_end)):
                return end
    if not pm_seen:
        last = text.rfind(_PM_SEP, start)
        if last >= 0:
            return last
    return len(text)


# ---------------------------------------------------------------------------
# format_request


def format_request(request: Request) -> str:
    """The frame our SDK sends for ``request``: EVENT_* keys in §3.3 order.

    ``Ack``/``Rollback`` with ``block=None`` omit BLOCK; empty names and
    reasons are written as empty values; ``Pub.payload_metadata=None`` omits
    the key. ``parse_request`` gives ``request`` back for every value this
    accepts.

    Raises:
        ValueError: a value that must not contain ``;`` does (ids, names,
            PAYLOAD, DELIVERY_TO: §3.4 rule 2), or METADATA/PAYLOAD_METADATA
            hold ``;`` without both being JSON (the split would be ambiguous).
    """
    word, pairs = _request_fields(request)
    for which, value in pairs:
        if ";" in value and which not in _REST_OF_LINE and which not in _JSON_VALUED:
            raise ValueError(f"{word} {which.value} {_show(value)} contains ';' (§3.4 rule 2)")
    if isinstance(request, Pub):
        _check_pub_json(request.metadata, request.payload_metadata)
    return word + "".join(f";{which.value}=:{value}" for which, value in pairs)


def _request_fields(request: Request) -> tuple[str, list[tuple[_Field, str]]]:
    """The command word and (field, value) pairs, in the order :data:`_COMMANDS`
    gives (the one place that order is written)."""
    if isinstance(request, Pong):
        return "PONG", []
    command = _COMMANDS[_WORDS[type(request)]]
    pairs: list[tuple[_Field, str]] = []
    for which in command.fields:
        value = getattr(request, _ATTRIBUTES[which])
        if value is None or (value == "" and which in command.omit_if_empty):
            continue
        pairs.append((which, str(value)))
    return command.word, pairs


def _is_json(text: str) -> bool:
    return _json_end(text, 0) == len(text)


def _check_pub_json(metadata: str, payload_metadata: str | None) -> None:
    # Without ';' in either value every ';' is a real boundary, whatever the
    # values are; with one, parse_request relies on both being JSON.
    if ";" not in metadata and (payload_metadata is None or ";" not in payload_metadata):
        return
    if not _is_json(metadata) or (payload_metadata is not None and not _is_json(payload_metadata)):
        raise ValueError(
            "METADATA and PAYLOAD_METADATA holding ';' must both be JSON text (§3.4 rule 3)"
        )
