"""The WebSocket text codec against PROTOCOL.md §3.2-§3.7 and every official client's frames."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensync.protocol import wscodec, wsrequests
from ensync.protocol.wscodec import (
    MAX_REASON_LENGTH,
    Ack,
    Conn,
    Continue,
    Defer,
    Delivered,
    Discard,
    Extend,
    Fail,
    Malformed,
    Pass,
    Pause,
    Ping,
    Pong,
    Pub,
    Record,
    Replay,
    Replayed,
    Request,
    Rollback,
    Sub,
    Unsub,
    format_conn_pass,
    format_reply,
    format_request,
    parse_conn_pass,
    parse_record,
    parse_reply,
    parse_request,
    record_to_json,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CID = "c-7f3a"
IDEM = "01HZX3K9Q2-idem_1"
APP = "MCowBQYDK2VwAyEAq83vEjJ3S0zLx6tT4mH1o6b0m7w5mQ2c8kV9bXoYr1Y="  # base64 with padding
PAYLOAD = "eyJub25jZSI6ICJhYmMiLCAiY2lwaGVydGV4dCI6ICJ4eXoifQ=="
NODE_META = '{"persist":true,"headers":{}}'  # JSON.stringify
PY_META = json.dumps({"persist": True, "headers": {}})  # json.dumps: ", " and ": "
NODE_PM = '{"byte_size":42,"skeleton":{"orderId":"string","qty":"number"}}'
GO_PM = '{"byte_size":40,"skeleton":{"orderId":"string","qty":"number"}}'


# ---------------------------------------------------------------------------
# Every command of §3.3 as each official client writes it

N_WS_0018: list[tuple[str, Request | None]] = [
    ("CONN;ACCESS_KEY=:ek_live_abc", Conn("ek_live_abc")),
    (
        f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:orders/created;PAYLOAD=:{PAYLOAD};"
        f"DELIVERY_TO=:{APP};METADATA=:{NODE_META}",
        Pub(CID, "orders/created", PAYLOAD, APP, NODE_META, None),
    ),
    (f"SUB;CLIENT_ID=:{CID};EVENT_NAME=:orders/created", Sub(CID, "orders/created")),
    (f"UNSUB;CLIENT_ID=:{CID};EVENT_NAME=:orders/created", Unsub(CID, "orders/created")),
    (
        f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:17;EVENT_NAME=:orders/created",
        Ack(CID, IDEM, 17, "orders/created"),
    ),
    # The auto-ack path sends the JavaScript value undefined as the name (§6).
    (
        f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:17;EVENT_NAME=:undefined",
        Ack(CID, IDEM, 17, "undefined"),
    ),
    (f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:17", Rollback(CID, IDEM, 17)),
]

N_WS: list[tuple[str, Request | None]] = [
    ("CONN;ACCESS_KEY=:ek_live_abc", Conn("ek_live_abc")),
    (
        f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:orders/created;PAYLOAD=:{PAYLOAD};"
        f"DELIVERY_TO=:{APP};METADATA=:{NODE_META};PAYLOAD_METADATA=:{NODE_PM}",
        Pub(CID, "orders/created", PAYLOAD, APP, NODE_META, NODE_PM),
    ),
    (f"SUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Sub(CID, "a/b")),
    (f"UNSUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Unsub(CID, "a/b")),
    (
        f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:3;EVENT_NAME=:a/b",
        Ack(CID, IDEM, 3, "a/b"),
    ),
    (f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:3", Rollback(CID, IDEM, 3)),
    (
        f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b;DELAY=:5000;REASON=:busy",
        Defer(CID, IDEM, "a/b", 5000, "busy"),
    ),
    (
        f"DISCARD;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b;REASON=:",
        Discard(CID, IDEM, "a/b", ""),
    ),
    (f"REPLAY;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b", Replay(CID, IDEM, "a/b")),
    (
        f"PAUSE;CLIENT_ID=:{CID};EVENT_NAME=:a/b;REASON=:maintenance",
        Pause(CID, "a/b", "maintenance"),
    ),
    (f"CONTINUE;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Continue(CID, "a/b")),
]

P_WS: list[tuple[str, Request | None]] = [
    ("CONN;ACCESS_KEY=:ek_live_abc", Conn("ek_live_abc")),
    (
        f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b;PAYLOAD=:{PAYLOAD};"
        f"DELIVERY_TO=:{APP};METADATA=:{PY_META}",
        Pub(CID, "a/b", PAYLOAD, APP, PY_META, None),
    ),
    (f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b;PAYLOAD=:p;DELIVERY_TO=:{APP};METADATA=:{{}}", None),
    (f"SUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Sub(CID, "a/b")),
    (f"UNSUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Unsub(CID, "a/b")),
    (
        f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:3;EVENT_NAME=:a/b",
        Ack(CID, IDEM, 3, "a/b"),
    ),
    (f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:3", Rollback(CID, IDEM, 3)),
    (
        f"DISCARD;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b;REASON=:bad payload",
        Discard(CID, IDEM, "a/b", "bad payload"),
    ),
    (
        f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b;DELAY=:1000;REASON=:",
        Defer(CID, IDEM, "a/b", 1000, ""),
    ),
    (f"CONTINUE;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Continue(CID, "a/b")),
    (f"PAUSE;CLIENT_ID=:{CID};EVENT_NAME=:a/b;REASON=:", Pause(CID, "a/b", "")),
    (f"REPLAY;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b", Replay(CID, IDEM, "a/b")),
]

G_WS: list[tuple[str, Request | None]] = [
    ("CONN;ACCESS_KEY=:ek_live_abc", Conn("ek_live_abc")),
    (
        f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b;PAYLOAD=:{PAYLOAD};"
        f"DELIVERY_TO=:{APP};METADATA=:{NODE_META};PAYLOAD_METADATA=:{GO_PM}",
        Pub(CID, "a/b", PAYLOAD, APP, NODE_META, GO_PM),
    ),
    (f"SUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Sub(CID, "a/b")),
    (f"UNSUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Unsub(CID, "a/b")),
    # Go formats BLOCK with strconv: an integer, the subscription's name.
    (
        f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:9007199254740993;EVENT_NAME=:a/b",
        Ack(CID, IDEM, 9007199254740993, "a/b"),
    ),
    (
        f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};PARTITION_BLOCK=:3",
        Rollback(CID, IDEM, 3),
    ),
    # Go may leave names out (empty or absent) of DEFER / DISCARD / REPLAY.
    (
        f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:;DELAY=:60000;REASON=:later",
        Defer(CID, IDEM, "", 60000, "later"),
    ),
    (
        f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};DELAY=:60000;REASON=:later",
        Defer(CID, IDEM, "", 60000, "later"),
    ),
    (f"DISCARD;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};REASON=:x", Discard(CID, IDEM, "", "x")),
    (f"REPLAY;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM}", Replay(CID, IDEM, "")),
    (f"REPLAY;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:", Replay(CID, IDEM, "")),
    (f"PAUSE;CLIENT_ID=:{CID};EVENT_NAME=:a/b;REASON=:deploy", Pause(CID, "a/b", "deploy")),
    (f"CONTINUE;CLIENT_ID=:{CID};EVENT_NAME=:a/b", Continue(CID, "a/b")),
]


def _cases(client: str, rows: list[tuple[str, Request | None]]) -> list[Any]:
    return [
        pytest.param(frame, expected, id=f"{client}-{frame.split(';')[0]}-{i}")
        for i, (frame, expected) in enumerate(rows)
    ]


@pytest.mark.parametrize(
    ("frame", "expected"),
    _cases("N-ws-0018", N_WS_0018)
    + _cases("N-ws", N_WS)
    + _cases("P-ws", P_WS)
    + _cases("G-ws", G_WS),
)
def test_official_client_frames(frame: str, expected: Request | None) -> None:
    parsed = parse_request(frame)
    assert not isinstance(parsed, Malformed), parsed
    if expected is not None:
        assert parsed == expected


def test_bare_pong() -> None:
    assert parse_request("PONG") == Pong()
    assert format_request(Pong()) == "PONG"


def test_extend_is_our_extension() -> None:
    frame = f"EXTEND;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a/b"
    assert parse_request(frame) == Extend(CID, IDEM, "a/b")
    assert parse_request(f"EXTEND;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM}") == Extend(CID, IDEM, "")
    assert format_request(Extend(CID, IDEM, "a/b")) == frame


# ---------------------------------------------------------------------------
# §3.4 hazards

TRICKY_META = json.dumps({"persist": True, "headers": {"x-tricky": "semi;colon=:eq,comma"}})
EVIL_META = json.dumps(
    {
        "headers": {
            "a": "x;PAYLOAD_METADATA=:{}",
            "b": ';PAYLOAD_METADATA=:{"byte_size":1}',
            "c": "y;REASON=:z;CLIENT_ID=:evil",
            "d": "+RECORD:not a prefix",
        }
    },
    separators=(",", ":"),
)
EVIL_PM = json.dumps({"skeleton": {"k;PAYLOAD_METADATA=:": "string", "m;METADATA=:": "x"}})


def _pub(metadata: str, payload_metadata: str | None) -> str:
    frame = (
        f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a/b;PAYLOAD=:p;DELIVERY_TO=:{APP};METADATA=:{metadata}"
    )
    return frame if payload_metadata is None else f"{frame};PAYLOAD_METADATA=:{payload_metadata}"


@pytest.mark.parametrize(
    ("metadata", "payload_metadata"),
    [
        (TRICKY_META, None),
        (TRICKY_META, NODE_PM),
        (EVIL_META, None),
        (EVIL_META, NODE_PM),
        (EVIL_META, EVIL_PM),
        (NODE_META, EVIL_PM),
        (EVIL_META, '"just a JSON string;PAYLOAD_METADATA=:"'),
        ("{}", "{}"),
    ],
)
def test_metadata_hazards(metadata: str, payload_metadata: str | None) -> None:
    """A naive split on ';' corrupts these (§3.4, verified with real clients)."""
    parsed = parse_request(_pub(metadata, payload_metadata))
    assert parsed == Pub(CID, "a/b", "p", APP, metadata, payload_metadata)
    assert isinstance(parsed, Pub)
    assert format_request(parsed) == _pub(metadata, payload_metadata)


def test_metadata_that_is_not_json_runs_to_the_last_payload_metadata_key() -> None:
    # §3.4 rule 3: no split makes both parse, so the last occurrence wins.
    parsed = parse_request(_pub("not json;PAYLOAD_METADATA=:x", "{}"))
    assert isinstance(parsed, Pub)
    assert (parsed.metadata, parsed.payload_metadata) == ("not json;PAYLOAD_METADATA=:x", "{}")
    parsed = parse_request(_pub("undefined", None))
    assert isinstance(parsed, Pub)
    assert (parsed.metadata, parsed.payload_metadata) == ("undefined", None)


def test_metadata_split_where_both_parse_beats_the_last_occurrence() -> None:
    pm = '{"s":"a;PAYLOAD_METADATA=:b"}'
    parsed = parse_request(_pub('{"a":1}', pm))
    assert isinstance(parsed, Pub)
    assert (parsed.metadata, parsed.payload_metadata) == ('{"a":1}', pm)


def test_payload_metadata_that_is_not_json_falls_back_to_the_last_occurrence() -> None:
    parsed = parse_request(_pub('{"a":1}', "bad;PAYLOAD_METADATA=:{}"))
    assert isinstance(parsed, Pub)
    assert (parsed.metadata, parsed.payload_metadata) == ('{"a":1};PAYLOAD_METADATA=:bad', "{}")


@pytest.mark.parametrize(
    ("tail", "metadata", "payload_metadata"),
    [
        # METADATA's JSON is followed by junk, not a key: it runs to the end.
        ('{"a":1}x', '{"a":1}x', None),
        ('{"a":1} ;FOO=:1', '{"a":1} ;FOO=:1', None),
        # PAYLOAD_METADATA that is not JSON is the rest of the line.
        ('{"a":1};PAYLOAD_METADATA=:not json', '{"a":1}', "not json"),
        ('{"a":1};PAYLOAD_METADATA=:{}x;CLIENT_ID=:c', '{"a":1}', "{}x;CLIENT_ID=:c"),
        # Whitespace around JSON belongs to the value (forwarded unchanged).
        (' {"a":1} ;PAYLOAD_METADATA=:\t{}\n', ' {"a":1} ', "\t{}\n"),
    ],
)
def test_json_value_fallbacks(tail: str, metadata: str, payload_metadata: str | None) -> None:
    frame = f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a;PAYLOAD=:p;DELIVERY_TO=:d;METADATA=:{tail}"
    assert parse_request(frame) == Pub(CID, "a", "p", "d", metadata, payload_metadata)


def test_payload_metadata_before_metadata() -> None:
    head = f"PUB;CLIENT_ID=:{CID};EVENT_NAME=:a;PAYLOAD=:p;DELIVERY_TO=:d;PAYLOAD_METADATA=:"
    assert parse_request(head + '{"s":";"};METADATA=:{}') == Pub(
        CID, "a", "p", "d", "{}", '{"s":";"}'
    )
    # METADATA that is not JSON never swallows a key given twice: it is the rest.
    parsed = parse_request(head + "{};METADATA=:undefined;PAYLOAD_METADATA=:x")
    assert parsed == Pub(CID, "a", "p", "d", "undefined;PAYLOAD_METADATA=:x", "{}")
    parsed = parse_request(head + "{};METADATA=:{};PAYLOAD_METADATA=:x")
    assert isinstance(parsed, Malformed)
    assert "PUB gives PAYLOAD_METADATA twice" in parsed.reason


def test_reasons_are_capped_even_if_a_message_grows() -> None:
    reason = wsrequests.malformed("x" * 1000).reason
    assert len(reason) == MAX_REASON_LENGTH
    assert reason.endswith("...")


@pytest.mark.parametrize(
    "reason",
    ["", "plain", "semi;colon=:eq", ";REASON=:again;DELAY=:5", ";CLIENT_ID=:x;EVENT_NAME=:y", " "],
)
def test_reason_is_the_rest_of_the_line(reason: str) -> None:
    frame = f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a;DELAY=:5;REASON=:{reason}"
    assert parse_request(frame) == Defer(CID, IDEM, "a", 5, reason)
    assert parse_request(f"PAUSE;CLIENT_ID=:{CID};EVENT_NAME=:a;REASON=:{reason}") == Pause(
        CID, "a", reason
    )
    frame = f"DISCARD;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};EVENT_NAME=:a;REASON=:{reason}"
    assert parse_request(frame) == Discard(CID, IDEM, "a", reason)


def test_keys_in_any_order_and_message_synonyms() -> None:
    assert parse_request(f"SUB;EVENT_NAME=:a;CLIENT_ID=:{CID}") == Sub(CID, "a")
    assert parse_request(f"SUB;CLIENT_ID=:{CID};MESSAGE_NAME=:a") == Sub(CID, "a")
    frame = f"ACK;EVENT_NAME=:a;BLOCK=:2;MESSAGE_IDEM=:{IDEM};CLIENT_ID=:{CID}"
    assert parse_request(frame) == Ack(CID, IDEM, 2, "a")
    frame = f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};PARTITION_BLOCK=:2"
    assert parse_request(frame) == Ack(CID, IDEM, 2, "")
    frame = f"PUB;METADATA=:{TRICKY_META};CLIENT_ID=:{CID};PAYLOAD=:p;EVENT_NAME=:a;DELIVERY_TO=:d"
    assert parse_request(frame) == Pub(CID, "a", "p", "d", TRICKY_META, None)
    frame = f"DEFER;CLIENT_ID=:{CID};DELAY=:7;EVENT_IDEM=:{IDEM};REASON=:r;EVENT_NAME=:x"
    assert parse_request(frame) == Defer(CID, IDEM, "", 7, "r;EVENT_NAME=:x")


def test_access_key_is_the_rest_of_the_line() -> None:
    # CONN has one key; the app key is opaque (§1), so nothing in it is split.
    assert parse_request("CONN;ACCESS_KEY=:a;b=:c") == Conn("a;b=:c")
    assert parse_request("CONN;ACCESS_KEY=:") == Conn("")


@pytest.mark.parametrize(
    ("block", "expected"),
    [("7", 7), ("-3", -3), ("0", 0), ("abc", None), ("", None), ("1.5", None), (" 7", None)],
)
def test_block_is_a_hint(block: str, expected: int | None) -> None:
    frame = f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:{block};EVENT_NAME=:a"
    assert parse_request(frame) == Ack(CID, IDEM, expected, "a")
    frame = f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:{block}"
    assert parse_request(frame) == Rollback(CID, IDEM, expected)


def test_missing_block() -> None:
    assert parse_request(f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM}") == Ack(CID, IDEM, None, "")
    assert parse_request(f"ROLLBACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM}") == Rollback(
        CID, IDEM, None
    )


def test_huge_integers_do_not_raise() -> None:
    digits = "9" * 10_000  # past sys.get_int_max_str_digits()
    frame = f"ACK;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};BLOCK=:{digits}"
    assert parse_request(frame) == Ack(CID, IDEM, None, "")
    parsed = parse_request(f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};DELAY=:{digits}")
    assert isinstance(parsed, Malformed)
    assert len(parsed.reason) <= MAX_REASON_LENGTH
    frame = f"DEFER;CLIENT_ID=:{CID};EVENT_IDEM=:{IDEM};DELAY=:{'9' * 30}"
    assert parse_request(frame) == Defer(CID, IDEM, "", 10**30 - 1, "")  # range: the engine's


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("", "empty command"),
        ("FOO", "unknown command 'FOO'"),
        ("FOO;CLIENT_ID=:c", "unknown command 'FOO'"),
        ("sub;CLIENT_ID=:c;EVENT_NAME=:a", "unknown command 'sub'"),
        ("PING", "unknown command 'PING'"),
        ("PONG;CLIENT_ID=:c", "PONG takes no keys"),
        ("CONN", "CONN lacks ACCESS_KEY"),
        ("SUB", "SUB lacks CLIENT_ID"),
        ("SUB;CLIENT_ID=:c", "SUB lacks EVENT_NAME"),
        ("PUB;CLIENT_ID=:c;EVENT_NAME=:a;PAYLOAD=:p;METADATA=:{}", "PUB lacks DELIVERY_TO"),
        ("PUB;CLIENT_ID=:c;EVENT_NAME=:a;PAYLOAD=:p;DELIVERY_TO=:d", "PUB lacks METADATA"),
        ("ACK;CLIENT_ID=:c;BLOCK=:1", "ACK lacks EVENT_IDEM"),
        ("DEFER;CLIENT_ID=:c;EVENT_IDEM=:i;REASON=:r", "DEFER lacks DELAY"),
        ("DEFER;CLIENT_ID=:c;EVENT_IDEM=:i;DELAY=:abc", "DELAY 'abc' is not an integer"),
        ("DEFER;CLIENT_ID=:c;EVENT_IDEM=:i;DELAY=:1.5", "DELAY '1.5' is not an integer"),
        ("DEFER;CLIENT_ID=:c;EVENT_IDEM=:i;DELAY=:", "DELAY '' is not an integer"),
        ("SUB;CLIENT_ID=:a;CLIENT_ID=:b;EVENT_NAME=:n", "SUB gives CLIENT_ID twice"),
        ("SUB;CLIENT_ID=:a;EVENT_NAME=:n;MESSAGE_NAME=:m", "both EVENT_NAME and MESSAGE_NAME"),
        ("ROLLBACK;CLIENT_ID=:c;EVENT_IDEM=:i;BLOCK=:1;PARTITION_BLOCK=:1", "both BLOCK and"),
        ("SUB;CLIENT_ID=:c;EVENT_NAME=:a;FOO=:x", "SUB does not take key 'FOO'"),
        ("SUB;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:n", "SUB does not take key 'EVENT_IDEM'"),
        ("SUB;CLIENT_ID=:c;EVENT_NAME=:a;b", "EVENT_NAME value 'a;b' contains ';'"),
        ("SUB;client_id=:c", "expected ';KEY=:' after SUB"),
        ("SUB;", "expected ';KEY=:' after SUB"),
        ("SUB;CLIENT_ID=c;EVENT_NAME=:n", "expected ';KEY=:' after SUB"),
        ("PUB;CLIENT_ID=:c;METADATA=:{};METADATA=:{}", "PUB gives METADATA twice"),
    ],
)
def test_malformed_frames_say_what_is_wrong(frame: str, reason: str) -> None:
    parsed = parse_request(frame)
    assert isinstance(parsed, Malformed)
    assert reason in parsed.reason


def test_malformed_reasons_stay_short() -> None:
    for frame in ["X" * 100_000, "SUB;CLIENT_ID=:c;EVENT_NAME=:" + "a;" * 50_000, ";" * 10]:
        parsed = parse_request(frame)
        assert isinstance(parsed, Malformed)
        assert len(parsed.reason) <= MAX_REASON_LENGTH


def test_hostile_metadata_is_parsed_in_linear_time() -> None:
    # Trying every ';PAYLOAD_METADATA=:' with json.loads would be quadratic.
    metadata = '"' + ";PAYLOAD_METADATA=:" * 50_000  # an unterminated JSON string, ~1 MB
    started = time.perf_counter()
    parsed = parse_request(_pub(metadata, "{}"))
    assert time.perf_counter() - started < 5
    assert isinstance(parsed, Pub)
    assert parsed.payload_metadata == "{}"


def test_deeply_nested_metadata_does_not_raise() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    parsed = parse_request(_pub(deep, None))
    assert isinstance(parsed, Pub)
    assert parsed.metadata == deep  # not JSON to us (too deep): the whole rest of the line


# ---------------------------------------------------------------------------
# format_request


@pytest.mark.parametrize(
    ("request_", "frame"),
    [
        (Conn("k"), "CONN;ACCESS_KEY=:k"),
        (
            Pub("c", "a/b", "p", "d", "{}", None),
            "PUB;CLIENT_ID=:c;EVENT_NAME=:a/b;PAYLOAD=:p;DELIVERY_TO=:d;METADATA=:{}",
        ),
        (
            Pub("c", "a/b", "p", "d", "{}", '{"byte_size":1}'),
            "PUB;CLIENT_ID=:c;EVENT_NAME=:a/b;PAYLOAD=:p;DELIVERY_TO=:d;METADATA=:{}"
            ';PAYLOAD_METADATA=:{"byte_size":1}',
        ),
        (Sub("c", "a"), "SUB;CLIENT_ID=:c;EVENT_NAME=:a"),
        (Unsub("c", "a"), "UNSUB;CLIENT_ID=:c;EVENT_NAME=:a"),
        (Ack("c", "i", 5, "a"), "ACK;CLIENT_ID=:c;EVENT_IDEM=:i;BLOCK=:5;EVENT_NAME=:a"),
        (Ack("c", "i", None, ""), "ACK;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:"),
        (Rollback("c", "i", 5), "ROLLBACK;CLIENT_ID=:c;EVENT_IDEM=:i;BLOCK=:5"),
        (Rollback("c", "i", None), "ROLLBACK;CLIENT_ID=:c;EVENT_IDEM=:i"),
        (
            Defer("c", "i", "a", -1, "r;x"),
            "DEFER;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:a;DELAY=:-1;REASON=:r;x",
        ),
        (Discard("c", "i", "", ""), "DISCARD;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:;REASON=:"),
        (Replay("c", "i", "a"), "REPLAY;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:a"),
        (Pause("c", "a", "why"), "PAUSE;CLIENT_ID=:c;EVENT_NAME=:a;REASON=:why"),
        (Continue("c", "a"), "CONTINUE;CLIENT_ID=:c;EVENT_NAME=:a"),
        (Extend("c", "i", "a"), "EXTEND;CLIENT_ID=:c;EVENT_IDEM=:i;EVENT_NAME=:a"),
        (Pong(), "PONG"),
    ],
)
def test_format_request_writes_event_keys_in_table_order(request_: Request, frame: str) -> None:
    assert format_request(request_) == frame
    assert parse_request(frame) == request_


@pytest.mark.parametrize(
    "request_",
    [
        Sub("c;d", "a"),
        Sub("c", "a;b"),
        Ack("c", "i;j", 1, "a"),
        Pub("c", "a", "p;q", "d", "{}", None),
        Pub("c", "a", "p", "d;e", "{}", None),
        Pub("c", "a", "p", "d", "not json; at all", None),
        Pub("c", "a", "p", "d", "{}", "not; json"),
        Pub("c", "a", "p", "d", "not json", '{"s":";"}'),
    ],
)
def test_format_request_refuses_what_cannot_be_framed(request_: Request) -> None:
    with pytest.raises(ValueError, match=";"):
        format_request(request_)


# ---------------------------------------------------------------------------
# Records, §3.7

RECORD = Record(
    idem=IDEM,
    name="orders/created",
    block=42,
    logged_at_ms=1_718_000_000_123,
    payload=PAYLOAD,
    metadata={"persist": True, "headers": {"x-tricky": "semi;colon=:eq,comma"}},
    sender=APP,
)


def test_record_json_is_exactly_section_3_7() -> None:
    # §3.7 plus ensync's "attempt" key, which official clients ignore.
    assert record_to_json(RECORD) == (
        '{"id":"01HZX3K9Q2-idem_1","idem":"01HZX3K9Q2-idem_1","name":"orders/created",'
        '"block":"42","loggedAt":1718000000123,"payload":"' + PAYLOAD + '",'
        '"metadata":{"persist":true,"headers":{"x-tricky":"semi;colon=:eq,comma"}},'
        '"sender":"' + APP + '","attempt":1}'
    )
    obj = json.loads(record_to_json(RECORD))
    assert list(obj) == [
        "id",
        "idem",
        "name",
        "block",
        "loggedAt",
        "payload",
        "metadata",
        "sender",
        "attempt",
    ]
    assert isinstance(obj["block"], str)
    assert isinstance(obj["loggedAt"], int)
    assert isinstance(obj["metadata"], dict)


def test_record_json_hides_reply_prefixes_from_replace_happy_clients() -> None:
    record = Record("i", "n", 1, 2, "p", {"h": "+RECORD:x +REPLAY:y +PASS:z"}, "s")
    text = record_to_json(record)
    assert "+RECORD:" not in text
    assert "+REPLAY:" not in text
    # What P-ws does to a frame before json.loads still leaves the same record.
    frame = format_reply(Delivered(record))
    stripped = frame.replace("+RECORD:", "").replace("+REPLAY:", "")
    assert json.loads(stripped)["metadata"]["h"] == "+RECORD:x +REPLAY:y +PASS:z"
    assert parse_record(text) == record


def test_record_json_escapes_lone_surrogates() -> None:
    # A peer's JSON escape can put a lone surrogate into metadata; the frame must encode.
    record = Record("i", "n", 1, 2, "p", json.loads('{"h":"\\ud800"}'), "s")
    record_to_json(record).encode("utf-8")


def test_records_are_hashable() -> None:
    assert hash(RECORD) == hash(Record(**{f: getattr(RECORD, f) for f in RECORD.__slots__}))


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            {"id": "i", "name": "n", "block": 7, "loggedAt": 5, "payload": "p", "metadata": {}},
            Record("i", "n", 7, 5, "p", {}, ""),
        ),
        (
            {
                "idem": "i",
                "name": "n",
                "block": "7",
                "loggedAt": 5.9,
                "payload": "p",
                "metadata": '{"persist":false}',
                "sender": "s",
            },
            Record("i", "n", 7, 5, "p", {"persist": False}, "s"),
        ),
        (
            {"idem": "", "id": "i", "name": "n", "block": "7", "payload": "p"},
            Record("i", "n", 7, 0, "p", {}, ""),
        ),
        (
            {"idem": "i", "name": "n", "block": "7", "loggedAt": "5", "payload": "p", "x": 1},
            Record("i", "n", 7, 5, "p", {}, ""),
        ),
    ],
)
def test_parse_record_is_tolerant(obj: dict[str, Any], expected: Record) -> None:
    assert parse_record(json.dumps(obj)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "record is not JSON"),
        ("[1]", "not a JSON object"),
        ('{"name":"n","block":1,"payload":"p"}', "lacks idem"),
        ('{"idem":"i","block":1,"payload":"p"}', "lacks name"),
        ('{"idem":"i","name":"n","payload":"p"}', "block of type NoneType"),
        ('{"idem":"i","name":"n","block":true,"payload":"p"}', "block of type bool"),
        ('{"idem":"i","name":"n","block":"x","payload":"p"}', "block 'x' is not an integer"),
        ('{"idem":"i","name":"n","block":1,"payload":"p","loggedAt":[]}', "loggedAt of type"),
        ('{"idem":"i","name":"n","block":1,"payload":"p","loggedAt":NaN}', "loggedAt"),
        ('{"idem":"i","name":"n","block":1}', "lacks payload"),
        ('{"idem":"i","name":"n","block":1,"payload":"p","metadata":[1]}', "metadata"),
        ('{"idem":"i","name":"n","block":1,"payload":"p","metadata":"{"}', "metadata"),
        ('{"idem":"i","name":"n","block":1,"payload":"p","sender":5}', "sender"),
        ("[" * 100_000, "record is not JSON"),
    ],
)
def test_parse_record_rejects_what_it_cannot_use(text: str, reason: str) -> None:
    parsed = parse_record(text)
    assert isinstance(parsed, Malformed)
    assert reason in parsed.reason


# ---------------------------------------------------------------------------
# Replies, §3.5


@pytest.mark.parametrize(
    ("reply", "frame"),
    [
        (Pass("01HZ"), "+PASS:01HZ"),
        (Pass(""), "+PASS:"),
        (Fail("no such message"), "-FAIL:no such message"),
        (Replayed(RECORD), "+REPLAY:" + record_to_json(RECORD)),
        (Delivered(RECORD), "+RECORD:" + record_to_json(RECORD)),
        (Ping(), "PING"),
    ],
)
def test_replies_round_trip(reply: wscodec.Reply, frame: str) -> None:
    assert format_reply(reply) == frame
    assert parse_reply(frame) == reply


def test_parse_reply_strips_only_the_leading_prefix() -> None:
    assert parse_reply("+PASS:+PASS:x") == Pass("+PASS:x")
    assert parse_reply("-FAIL:-FAIL: +RECORD:") == Fail("-FAIL: +RECORD:")
    record = Record("i", "n", 1, 2, "p", {}, "+RECORD:")
    text = json.dumps(
        {
            "idem": "i",
            "name": "n",
            "block": "1",
            "loggedAt": 2,
            "payload": "p",
            "sender": "+RECORD:",
        }
    )
    assert parse_reply("+RECORD:" + text) == Delivered(record)


@pytest.mark.parametrize(
    "frame", ["", "PONG", "+PASS", "pass:x", "+RECORD:{", "+REPLAY:[]", "PING ", "+OK:x"]
)
def test_parse_reply_flags_unknown_frames(frame: str) -> None:
    assert isinstance(parse_reply(frame), Malformed)


# ---------------------------------------------------------------------------
# The CONN reply, §3.6


def test_format_conn_pass() -> None:
    assert format_conn_pass("c-1", "h_2") == "{clientId=c-1, clientHash=h_2}"
    assert parse_conn_pass(format_conn_pass("c-1", "h_2")) == ("c-1", "h_2")
    assert format_conn_pass("c", "") == "{clientId=c, clientHash=}"


@pytest.mark.parametrize("bad", ["a,b", "a=", "{a", "a}", "a;b", "a b", "a\tb", "a\nb"])
def test_format_conn_pass_refuses_what_clients_cannot_parse(bad: str) -> None:
    with pytest.raises(ValueError, match=r"§3\.6"):
        format_conn_pass(bad, "h")
    with pytest.raises(ValueError, match=r"§3\.6"):
        format_conn_pass("c", bad)


def test_format_conn_pass_refuses_an_empty_client_id() -> None:
    with pytest.raises(ValueError, match="empty"):
        format_conn_pass("", "h")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{clientId=c1, clientHash=h1}", ("c1", "h1")),
        ("{clientId=c1,clientHash=h1}", ("c1", "h1")),
        ("clientId=c1, clientHash=h1", ("c1", "h1")),
        ("{ clientHash=h1 , junk, clientId=c1, extra=x=y }", ("c1", "h1")),
        ("{clientId=c1}", ("c1", "")),
        ("{clientId=a=b, clientHash=h}", ("a=b", "h")),
    ],
)
def test_parse_conn_pass_is_tolerant_like_p_ws(text: str, expected: tuple[str, str]) -> None:
    assert parse_conn_pass(text) == expected


@pytest.mark.parametrize("text", ["", "{}", "ok", "{clientHash=h}", "{clientId=, clientHash=h}"])
def test_parse_conn_pass_needs_a_client_id(text: str) -> None:
    parsed = parse_conn_pass(text)
    assert isinstance(parsed, Malformed)
    assert "clientId" in parsed.reason


# ---------------------------------------------------------------------------
# Fuzzing

WIRE_KEYS = [
    "ACCESS_KEY",
    "CLIENT_ID",
    "EVENT_NAME",
    "MESSAGE_NAME",
    "EVENT_IDEM",
    "MESSAGE_IDEM",
    "PAYLOAD",
    "DELIVERY_TO",
    "METADATA",
    "PAYLOAD_METADATA",
    "BLOCK",
    "PARTITION_BLOCK",
    "DELAY",
    "REASON",
    "FOO",
    "",
    "event_name",
]
COMMANDS = [
    "CONN",
    "PUB",
    "SUB",
    "UNSUB",
    "ACK",
    "ROLLBACK",
    "DEFER",
    "DISCARD",
    "REPLAY",
    "PAUSE",
    "CONTINUE",
    "EXTEND",
    "PONG",
    "PING",
    "FOO",
    "",
]
HAZARDS = [";", "=:", ";PAYLOAD_METADATA=:", ";REASON=:", ";METADATA=:", "{", '"', "\\", "+RECORD:"]

hazard_text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(HAZARDS)), max_size=6).map(
    "".join
)
no_semicolon = st.text(st.characters(exclude_characters=";"), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | hazard_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hazard_text, inner, max_size=4),
    max_leaves=12,
)
json_text = st.builds(
    lambda value, ascii_only, compact: json.dumps(
        value, ensure_ascii=ascii_only, separators=(",", ":") if compact else None
    ),
    # Mostly objects whose keys and values carry the §3.4 hazards, like headers.
    st.one_of(
        json_values,
        st.dictionaries(hazard_text, hazard_text | json_values, min_size=1, max_size=4),
    ),
    st.booleans(),
    st.booleans(),
)
huge = st.builds(
    lambda piece, n: piece * n, st.sampled_from(["a", ";", "=:", "{", "é"]), st.just(60_000)
)
any_value = st.one_of(st.text(), hazard_text, json_text, st.sampled_from(["", "undefined", "7"]))

requests = st.one_of(
    st.builds(Conn, st.text()),
    st.builds(
        Pub,
        no_semicolon,
        no_semicolon,
        no_semicolon,
        no_semicolon,
        json_text,
        st.none() | json_text,
    ),
    st.builds(Sub, no_semicolon, no_semicolon),
    st.builds(Unsub, no_semicolon, no_semicolon),
    st.builds(Ack, no_semicolon, no_semicolon, st.none() | st.integers(), no_semicolon),
    st.builds(Rollback, no_semicolon, no_semicolon, st.none() | st.integers()),
    st.builds(Defer, no_semicolon, no_semicolon, no_semicolon, st.integers(), st.text()),
    st.builds(Discard, no_semicolon, no_semicolon, no_semicolon, st.text()),
    st.builds(Replay, no_semicolon, no_semicolon, no_semicolon),
    st.builds(Pause, no_semicolon, no_semicolon, st.text()),
    st.builds(Continue, no_semicolon, no_semicolon),
    st.builds(Extend, no_semicolon, no_semicolon, no_semicolon),
    st.just(Pong()),
)

token_frames = st.builds(
    lambda command, pairs: (
        command + "".join(f";{key}=:{value}" if key else f";{value}" for key, value in pairs)
    ),
    st.sampled_from(COMMANDS),
    st.lists(st.tuples(st.sampled_from(WIRE_KEYS), any_value), max_size=7),
)


@st.composite
def truncated_frames(draw: st.DrawFn) -> str:
    frame = format_request(draw(requests))
    return frame[: draw(st.integers(0, len(frame)))]


SYNONYMS = {"EVENT_NAME": "MESSAGE_NAME", "EVENT_IDEM": "MESSAGE_IDEM", "BLOCK": "PARTITION_BLOCK"}


@st.composite
def reordered_frames(draw: st.DrawFn) -> tuple[str, Request]:
    """A request written with its keys in any order (REASON, the rest of the line,
    stays last) and any accepted spelling: unambiguous, so it must parse back."""
    request = draw(requests.filter(lambda r: not isinstance(r, Pong | Conn)))
    word, fields = wscodec._request_fields(request)  # the (key, value) pairs, in §3.3 order
    pairs = [(which.value, value) for which, value in fields]
    tail = [pair for pair in pairs if pair[0] == "REASON"]
    pairs = [*draw(st.permutations([pair for pair in pairs if pair[0] != "REASON"])), *tail]
    pairs = [
        (SYNONYMS[key] if draw(st.booleans()) and key in SYNONYMS else key, value)
        for key, value in pairs
    ]
    return word + "".join(f";{key}=:{value}" for key, value in pairs), request


frames = st.one_of(
    st.text(), token_frames, truncated_frames(), reordered_frames().map(lambda pair: pair[0]), huge
)


def _check_parse(frame: str) -> None:
    parsed = parse_request(frame)
    if isinstance(parsed, Malformed):
        assert len(parsed.reason) <= MAX_REASON_LENGTH
        parsed.reason.encode("utf-8")  # it goes back to the peer
    if isinstance(parsed, Pong):
        assert frame == "PONG"


@FUZZ
@given(frames)
def test_parse_request_never_raises(frame: str) -> None:
    _check_parse(frame)


@settings(max_examples=20, deadline=None)
@given(token_frames, huge)
def test_parse_request_never_raises_on_huge_values(frame: str, filler: str) -> None:
    _check_parse(frame + filler)
    _check_parse(filler + frame)
    _check_parse(frame.replace("=:", "=:" + filler, 1))


@FUZZ
@given(requests)
def test_format_then_parse_gives_the_request_back(request_: Request) -> None:
    assert parse_request(format_request(request_)) == request_


@FUZZ
@given(reordered_frames())
def test_keys_in_any_order_parse_to_the_same_request(case: tuple[str, Request]) -> None:
    frame, request_ = case
    assert parse_request(frame) == request_


@FUZZ
@given(
    st.one_of(
        st.text(),
        st.sampled_from(["+RECORD:", "+REPLAY:", "+PASS:", "-FAIL:"]).flatmap(
            lambda prefix: st.one_of(st.text(), json_text).map(lambda body: prefix + body)
        ),
    )
)
def test_parse_reply_never_raises(frame: str) -> None:
    parsed = parse_reply(frame)
    if isinstance(parsed, Malformed):
        assert len(parsed.reason) <= MAX_REASON_LENGTH


records = st.builds(
    Record,
    st.text(min_size=1),
    st.text(),
    st.integers(),
    st.integers(),
    st.text(),
    st.dictionaries(st.text(), json_values, max_size=4),
    st.text(),
)


@FUZZ
@given(records)
def test_records_round_trip(record: Record) -> None:
    assert parse_record(record_to_json(record)) == record
    assert parse_reply(format_reply(Replayed(record))) == Replayed(record)


conn_values = st.text(st.characters(exclude_characters=",={};", exclude_categories=["Z", "Cc"]))


@FUZZ
@given(conn_values.filter(lambda value: value.strip() == value and bool(value)), conn_values)
def test_conn_pass_round_trips(client_id: str, client_hash: str) -> None:
    try:
        text = format_conn_pass(client_id, client_hash)
    except ValueError:  # other whitespace the categories above let through
        return
    assert parse_conn_pass(text) == (client_id, client_hash)


@FUZZ
@given(st.text())
def test_parse_conn_pass_never_raises(text: str) -> None:
    parse_conn_pass(text)


def test_all_is_complete() -> None:
    for name in wscodec.__all__:
        assert hasattr(wscodec, name), name
    public = {
        name
        for name, value in vars(wscodec).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == wscodec.__name__
    }
    assert public <= set(wscodec.__all__)


@pytest.mark.parametrize(
    "frame",
    [
        "CONNensk_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        "CONN ensk_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        "ensk_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG;X=:1",
        "SUB;CLIENT_ID=:secret-client-id;x;EVENT_NAME=:a",
    ],
)
def test_refusals_never_echo_keys_or_client_ids(frame: str) -> None:
    result = parse_request(frame)
    assert isinstance(result, Malformed)
    assert "abcdefghij" not in result.reason
    assert "secret-client-id" not in result.reason
