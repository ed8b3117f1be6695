"""What the engine sends over the WebSocket text protocol (PROTOCOL.md §3.5-§3.7):
replies, the record JSON, and the CONN reply text. Pure functions; nothing
here raises on peer input (problems become :class:`Malformed`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ensync.protocol.wsrequests import Malformed
from ensync.protocol.wsrequests import int_or_none as _int_or_none
from ensync.protocol.wsrequests import malformed as _malformed
from ensync.protocol.wsrequests import show as _show

__all__ = [
    "Delivered",
    "Fail",
    "Pass",
    "Ping",
    "Record",
    "Replayed",
    "Reply",
    "format_conn_pass",
    "format_reply",
    "parse_conn_fields",
    "parse_conn_pass",
    "parse_record",
    "parse_reply",
    "record_to_json",
]


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
