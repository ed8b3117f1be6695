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
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

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

MAX_REASON_LENGTH = 200
"""Upper bound on ``Malformed.reason``: it is echoed to the peer in ``-FAIL:``."""

# ---------------------------------------------------------------------------
# Requests (client → server), §3.3


@dataclass(frozen=True, slots=True)
class Conn:
    """``CONN``: authenticate the socket with an app key."""

    access_key: str


@dataclass(frozen=True, slots=True)
class Pub:
    """``PUB``: publish one message to one recipient app id."""

    client_id: str
    name: str
    payload: str
    delivery_to: str
    metadata: str
    payload_metadata: str | None  # None: the key was absent (N-ws-0018, P-ws)


@dataclass(frozen=True, slots=True)
class Sub:
    """``SUB``: start deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Unsub:
    """``UNSUB``: stop deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK``: acknowledge a delivery; ``block`` and ``name`` are hints (§7.10).

    ``block`` is None when BLOCK is missing or not a decimal integer; ``name``
    may be ``"undefined"`` (N-ws-0018 auto-ack) or ``""``.
    """

    client_id: str
    idem: str
    block: int | None
    name: str


@dataclass(frozen=True, slots=True)
class Rollback:
    """``ROLLBACK``: give a delivery back (BLOCK, or PARTITION_BLOCK from G-ws)."""

    client_id: str
    idem: str
    block: int | None
    # ensync extension: why the message is given back (official clients send none).
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Defer:
    """``DEFER``: redeliver after ``delay_ms`` (any integer; the engine checks range)."""

    client_id: str
    idem: str
    name: str
    delay_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class Discard:
    """``DISCARD``: never deliver the message again."""

    client_id: str
    idem: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Replay:
    """``REPLAY``: send the message again as ``+REPLAY:<record>``."""

    client_id: str
    idem: str
    name: str


@dataclass(frozen=True, slots=True)
class Pause:
    """``PAUSE``: hold deliveries of ``name`` to this client."""

    client_id: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Continue:
    """``CONTINUE``: resume deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Extend:
    """``EXTEND``: our extension, extend a delivery's lease; official clients never send it."""

    client_id: str
    idem: str
    name: str


@dataclass(frozen=True, slots=True)
class Pong:
    """Bare ``PONG``: a client's answer to ``PING``; it gets no reply (§3.2, §3.8 rule 2)."""


Request: TypeAlias = (
    Conn
    | Pub
    | Sub
    | Unsub
    | Ack
    | Rollback
    | Defer
    | Discard
    | Replay
    | Pause
    | Continue
    | Extend
    | Pong
)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be understood; ``reason`` says what is wrong (≤ 200 chars)."""

    reason: str


def _malformed(reason: str) -> Malformed:
    if len(reason) > MAX_REASON_LENGTH:
        reason = reason[: MAX_REASON_LENGTH - 3] + "..."
    return Malformed(reason)


def _show(value: str, limit: int = 40) -> str:
    """``value`` quoted for a reason, cut to ``limit`` characters (reasons stay short)."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + "..."


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
_DECIMAL = re.compile(r"-?[0-9]+")
_PM_SEP = ";PAYLOAD_METADATA=:"

_Fields: TypeAlias = Mapping[_Field, str]


@dataclass(frozen=True, slots=True)
class _Command:
    word: str
    fields: tuple[_Field, ...]  # §3.3 order; format_request writes them in it
    optional: frozenset[_Field]
    build: Callable[[_Fields], Request | Malformed]
    boundary: re.Pattern[str]  # ";KEY=:" for every spelling of this command's keys


def _command(
    word: str,
    fields: tuple[_Field, ...],
    optional: tuple[_Field, ...],
    build: Callable[[_Fields], Request | Malformed],
) -> _Command:
    spellings = sorted((k for k, f in _WIRE_KEYS.items() if f in fields), key=len, reverse=True)
    boundary = re.compile(";(" + "|".join(spellings) + ")=:")
    return _Command(word, fields, frozenset(optional), build, boundary)


def _int_or_none(text: str | None) -> int | None:
    if text is None or _DECIMAL.fullmatch(text) is None:
        return None
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        return None


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
    """The command word and (field, value) pairs, in §3.3 order."""
    f = _F
    match request:
        case Pong():
            return "PONG", []
        case Conn():
            return "CONN", [(f.ACCESS_KEY, request.access_key)]
        case Pub():
            pairs = [
                (f.CLIENT_ID, request.client_id),
                (f.NAME, request.name),
                (f.PAYLOAD, request.payload),
                (f.DELIVERY_TO, request.delivery_to),
                (f.METADATA, request.metadata),
            ]
            if request.payload_metadata is not None:
                pairs.append((f.PAYLOAD_METADATA, request.payload_metadata))
            return "PUB", pairs
        case Sub():
            return "SUB", [(f.CLIENT_ID, request.client_id), (f.NAME, request.name)]
        case Unsub():
            return "UNSUB", [(f.CLIENT_ID, request.client_id), (f.NAME, request.name)]
        case Ack():
            pairs = [(f.CLIENT_ID, request.client_id), (f.IDEM, request.idem)]
            if request.block is not None:
                pairs.append((f.BLOCK, str(request.block)))
            return "ACK", [*pairs, (f.NAME, request.name)]
        case Rollback():
            pairs = [(f.CLIENT_ID, request.client_id), (f.IDEM, request.idem)]
            if request.block is not None:
                pairs.append((f.BLOCK, str(request.block)))
            if request.reason:
                pairs.append((f.REASON, request.reason))
            return "ROLLBACK", pairs
        case Defer():
            return "DEFER", [
                (f.CLIENT_ID, request.client_id),
                (f.IDEM, request.idem),
                (f.NAME, request.name),
                (f.DELAY, str(request.delay_ms)),
                (f.REASON, request.reason),
            ]
        case Discard():
            return "DISCARD", [
                (f.CLIENT_ID, request.client_id),
                (f.IDEM, request.idem),
                (f.NAME, request.name),
                (f.REASON, request.reason),
            ]
        case Replay():
            return "REPLAY", [
                (f.CLIENT_ID, request.client_id),
                (f.IDEM, request.idem),
                (f.NAME, request.name),
            ]
        case Pause():
            return "PAUSE", [
                (f.CLIENT_ID, request.client_id),
                (f.NAME, request.name),
                (f.REASON, request.reason),
            ]
        case Continue():
            return "CONTINUE", [(f.CLIENT_ID, request.client_id), (f.NAME, request.name)]
        case Extend():
            return "EXTEND", [
                (f.CLIENT_ID, request.client_id),
                (f.IDEM, request.idem),
                (f.NAME, request.name),
            ]


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


# ---------------------------------------------------------------------------
# Records, §3.7


@dataclass(frozen=True, slots=True)
class Record:
    """A delivery as carried by ``+RECORD:`` and ``+REPLAY:``."""

    idem: str
    name: str
    block: int
    logged_at_ms: int
    payload: str
    # Left out of the hash so records stay hashable despite the dict.
    metadata: dict[str, Any] = field(hash=False)
    sender: str
    # ensync extension: which delivery attempt this is (1 = first). Official
    # clients ignore unknown record keys.
    attempt: int = 1


# P-ws strips every "+RECORD:" / "+REPLAY:" from a frame, not just the prefix
# (§3.7). Such text can only sit inside a JSON string, where "\u002b" is the
# same '+' to every JSON parser and no client's replace() matches it.
_PREFIX_IN_JSON = re.compile(r"\+(?=RECORD:|REPLAY:)")


def record_to_json(record: Record) -> str:
    """The §3.7 JSON object for ``record``: id and idem, block as a decimal string,
    loggedAt a number, metadata an object; compact, ASCII-only (lone surrogates
    from a peer's JSON escapes stay escaped, so the frame always encodes)."""
    text = json.dumps(
        {
            "id": record.idem,
            "idem": record.idem,
            "name": record.name,
            "block": str(record.block),
            "loggedAt": record.logged_at_ms,
            "payload": record.payload,
            "metadata": record.metadata,
            "sender": record.sender,
            "attempt": record.attempt,
        },
        separators=(",", ":"),
    )
    return _PREFIX_IN_JSON.sub(r"\\u002b", text)


def parse_record(text: str) -> Record | Malformed:
    """Parse a record as any server may send it (§3.7), tolerantly: block as a
    string or number, ``id`` when ``idem`` is missing, metadata as an object or
    JSON text (missing: ``{}``), loggedAt missing: 0, sender missing: ``""``.
    Never raises."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return _malformed(f"record is not JSON: {_show(text)}")
    if not isinstance(obj, dict):
        return _malformed("record is not a JSON object")
    idem = obj.get("idem") or obj.get("id")
    if not isinstance(idem, str) or not idem:
        return _malformed("record lacks idem and id")
    name = obj.get("name")
    if not isinstance(name, str):
        return _malformed("record lacks name")
    block = _json_int(obj.get("block"))
    if block is None:
        return _malformed(f"record block {_describe(obj.get('block'))} is not an integer")
    raw_logged = obj.get("loggedAt")
    logged_at = 0 if raw_logged is None else _json_int(raw_logged)
    if logged_at is None:
        return _malformed(f"record loggedAt {_describe(raw_logged)} is not a number")
    payload = obj.get("payload")
    if not isinstance(payload, str):
        return _malformed("record lacks payload")
    metadata = _json_object(obj.get("metadata"))
    if metadata is None:
        return _malformed("record metadata is not a JSON object")
    sender = obj.get("sender", "")
    if not isinstance(sender, str):
        return _malformed("record sender is not a string")
    attempt = obj.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        attempt = 1
    return Record(idem, name, block, logged_at, payload, metadata, sender, attempt)


def _describe(value: object) -> str:
    # Never repr() a peer's object: it may be huge or nested past the recursion limit.
    return _show(value) if isinstance(value, str) else f"of type {type(value).__name__}"


def _json_int(value: object) -> int | None:
    if isinstance(value, bool):  # bool is an int to Python, not to JSON
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return _int_or_none(value)
    return None


def _json_object(value: object) -> dict[str, Any] | None:
    if value is None or value == "":
        return {}
    if isinstance(value, str):  # G-ws accepts metadata as JSON text too
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------
# Replies (server → client), §3.5


@dataclass(frozen=True, slots=True)
class Pass:
    """``+PASS:<text>``: success of the oldest pending request."""

    text: str


@dataclass(frozen=True, slots=True)
class Fail:
    """``-FAIL:<reason>``: failure of the oldest pending request."""

    reason: str


@dataclass(frozen=True, slots=True)
class Replayed:
    """``+REPLAY:<record>``: success of a REPLAY."""

    record: Record


@dataclass(frozen=True, slots=True)
class Delivered:
    """``+RECORD:<record>``: a delivery, never a reply."""

    record: Record


@dataclass(frozen=True, slots=True)
class Ping:
    """``PING``: optional keep-alive; the client answers ``PONG``."""


Reply: TypeAlias = Pass | Fail | Replayed | Delivered | Ping


def format_reply(reply: Reply) -> str:
    """The text frame for ``reply`` (§3.5). Servers go through ``ServerSession``."""
    match reply:
        case Pass(text=text):
            return "+PASS:" + text
        case Fail(reason=reason):
            return "-FAIL:" + reason
        case Replayed(record=record):
            return "+REPLAY:" + record_to_json(record)
        case Delivered(record=record):
            return "+RECORD:" + record_to_json(record)
        case Ping():
            return "PING"


def parse_reply(text: str) -> Reply | Malformed:
    """Parse one server text frame (client role). Strips only the leading prefix,
    unlike the official clients (§3.7). Never raises."""
    for prefix in ("+RECORD:", "+REPLAY:"):
        if text.startswith(prefix):
            record = parse_record(text[len(prefix) :])
            if isinstance(record, Malformed):
                return record
            return Delivered(record) if prefix == "+RECORD:" else Replayed(record)
    if text.startswith("+PASS:"):
        return Pass(text[len("+PASS:") :])
    if text.startswith("-FAIL:"):
        return Fail(text[len("-FAIL:") :])
    if text == "PING":
        return Ping()
    return _malformed(f"unknown reply {_show(text)}")


# ---------------------------------------------------------------------------
# The CONN reply, §3.6

# Node keeps only the piece after the first '=' of each ','-separated item,
# so none of these may appear in the values (§3.6, §7.2).
_NOT_IN_CONN_VALUES = re.compile(r"[,={};\s]")


def format_conn_pass(
    client_id: str, client_hash: str, extra: Mapping[str, str] | None = None
) -> str:
    """The ``+PASS:`` text of a successful CONN: ``{clientId=<id>, clientHash=<hash>}``,
    followed by any ``extra`` pairs (clients tolerate them, §3.6; ensync sends
    ``ackDeadlineMs``).

    Raises:
        ValueError: ``client_id`` is empty, or a key or value holds ``,`` ``=``
            ``{`` ``}`` ``;`` or whitespace, which the clients' parsers break on.
    """
    if not client_id:
        raise ValueError("client_id is empty")
    pairs = [("clientId", client_id), ("clientHash", client_hash), *(extra or {}).items()]
    for key, value in pairs:
        for label, text in ((f"key {key!r}", key), (f"value of {key}", value)):
            if _NOT_IN_CONN_VALUES.search(text):
                raise ValueError(
                    f"{label} {text!r} holds one of , = {{ }} ; or whitespace (PROTOCOL.md §3.6)"
                )
    return "{" + ", ".join(f"{key}={value}" for key, value in pairs) + "}"


def parse_conn_fields(text: str) -> dict[str, str]:
    """Every ``key=value`` pair of a CONN's ``+PASS:`` text (braces optional)."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    items: dict[str, str] = {}
    for item in body.split(","):
        key, sep, value = item.partition("=")
        if sep:
            items[key.strip()] = value.strip()
    return items


def parse_conn_pass(text: str) -> tuple[str, str] | Malformed:
    """``(client_id, client_hash)`` from a CONN's ``+PASS:`` text, parsed like P-ws:
    braces optional, items split on ``,`` then on the first ``=``, items without
    ``=`` and unknown keys ignored, a missing clientHash read as ``""``."""
    items = parse_conn_fields(text)
    client_id = items.get("clientId", "")
    if not client_id:
        return _malformed(f"CONN reply lacks clientId: {_show(text)}")
    return client_id, items.get("clientHash", "")
