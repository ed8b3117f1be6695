"""Server and client session state machines: PROTOCOL.md §3.6, §3.8, §3.9."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensync.protocol import wssession
from ensync.protocol.wsclient import (
    ClientSession,
    PingArrived,
    RecordArrived,
    ReplyFor,
    Unexpected,
)
from ensync.protocol.wscodec import (
    Ack,
    Conn,
    Delivered,
    Fail,
    Pass,
    Ping,
    Pong,
    Pub,
    Record,
    Replay,
    Replayed,
    Request,
    Sub,
    format_reply,
    parse_request,
    record_to_json,
)
from ensync.protocol.wssession import (
    SERVER_TRANSITIONS,
    Incoming,
    LocalProtocolError,
    ServerAction,
    ServerEvent,
    ServerSession,
    ServerState,
)

RECORD = Record("idem-1", "a/b", 3, 1_718_000_000_000, "cGF5bG9hZA==", {"persist": True}, "app")
CONN = "CONN;ACCESS_KEY=:ek_1"
PASS_C1 = "+PASS:{clientId=c1, clientHash=h1}"


def sub(client_id: str = "c1", name: str = "a/b") -> str:
    return f"SUB;CLIENT_ID=:{client_id};EVENT_NAME=:{name}"


def is_reply(frame: str) -> bool:
    return frame.startswith(("+PASS:", "-FAIL:", "+REPLAY:"))


def open_session() -> ServerSession:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    assert session.conn_accepted(conn.seq, "c1", "h1") == []
    assert session.data_to_send() == [PASS_C1]
    return session


# ---------------------------------------------------------------------------
# The transition table, row by row


@dataclass
class Walk:
    """A session driven into a state, and what the test knows about it."""

    session: ServerSession
    conn_seq: int | None = None
    incoming: list[Incoming] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)


def walk_to(state: ServerState) -> Walk:
    session = ServerSession()
    if state is ServerState.AWAITING_CONN:
        return Walk(session)
    [conn] = session.receive_text(CONN)
    if state is ServerState.CONNECTING:
        return Walk(session, conn_seq=conn.seq)
    session.conn_accepted(conn.seq, "c1", "h1")
    session.data_to_send()
    if state is ServerState.CLOSED:
        session.close()
    return Walk(session)


def fire(walk: Walk, event: ServerEvent) -> None:
    session = walk.session
    seq = walk.conn_seq if walk.conn_seq is not None else 1
    match event:
        case ServerEvent.CONN:
            walk.incoming = session.receive_text(CONN)
        case ServerEvent.COMMAND:
            walk.incoming = session.receive_text(sub("c1"))
        case ServerEvent.FOREIGN_COMMAND:
            walk.incoming = session.receive_text(sub("someone-else"))
        case ServerEvent.MALFORMED:
            walk.incoming = session.receive_text("FOO;BAR=:1")
        case ServerEvent.BINARY:
            session.receive_binary(b"\x00\x01")
        case ServerEvent.PONG:
            walk.incoming = session.receive_text("PONG")
        case ServerEvent.CONN_ACCEPTED:
            walk.incoming = session.conn_accepted(seq, "c1", "h1")
        case ServerEvent.CONN_REFUSED:
            walk.incoming = session.conn_refused(seq, "unknown app key")
        case ServerEvent.REPLY:
            if session.state is ServerState.OPEN:  # something to answer first
                [command] = session.receive_text(sub("c1"))
                seq = command.seq
            session.reply(seq, Pass("done"))
        case ServerEvent.PUSH:
            session.push(RECORD)
        case ServerEvent.PING:
            session.send_ping()
        case ServerEvent.CLOSE:
            session.close()
    walk.frames = session.data_to_send()


def settle(walk: Walk) -> list[str]:
    """Decide a CONN left pending by the walk so replies held behind it come out."""
    session = walk.session
    pending = [i.seq for i in walk.incoming if isinstance(i.request, Conn)]
    if walk.conn_seq is not None and session.state is ServerState.CONNECTING:
        pending.append(walk.conn_seq)
    for seq in pending:
        if session.state is ServerState.CONNECTING:
            session.conn_refused(seq, "settled")
    return session.data_to_send()


FAIL_TEXT = {
    ServerAction.FAIL_MALFORMED: "-FAIL:unknown command 'FOO'",
    ServerAction.FAIL_BINARY: "-FAIL:binary frames are not supported",
    ServerAction.FAIL_CONN_FIRST: "-FAIL:not connected: send CONN first (got SUB)",
    ServerAction.FAIL_ALREADY_CONNECTED: "-FAIL:already connected",
    ServerAction.FAIL_FOREIGN_CLIENT: (
        "-FAIL:CLIENT_ID 'someone-else' is not the client id of this socket"
    ),
}


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.name}-{e.name}") for s, e in SERVER_TRANSITIONS],
)
def test_every_transition_row(state: ServerState, event: ServerEvent) -> None:
    row = SERVER_TRANSITIONS[(state, event)]
    walk = walk_to(state)
    before = walk.session.outstanding()
    fire(walk, event)
    session = walk.session
    assert session.state is row.next_state
    match row.action:
        case ServerAction.EXECUTE:
            [incoming] = walk.incoming
            assert incoming.request == parse_request(CONN if event is ServerEvent.CONN else sub())
            assert walk.frames == []
        case ServerAction.BUFFER:
            assert walk.incoming == []
            assert walk.frames == []
            assert session.statistics().buffered == 1
            assert session.outstanding() == before + 1
        case ServerAction.IGNORE:
            assert walk.incoming == []
            assert walk.frames == []
            assert session.outstanding() == before
        case ServerAction.ACCEPT:
            assert walk.frames == [PASS_C1]
            assert session.client_id == "c1"
        case ServerAction.REFUSE:
            assert walk.frames == ["-FAIL:unknown app key"]
            assert session.client_id is None
        case ServerAction.COMPLETE:
            assert walk.frames == ["+PASS:done"]
        case ServerAction.SEND:
            expected = "PING" if event is ServerEvent.PING else format_reply(Delivered(RECORD))
            assert walk.frames == [expected]
        case ServerAction.CLOSE:
            assert session.outstanding() == 0
            assert session.receive_text(sub()) == []
            assert session.data_to_send() == []
        case _:  # one of the FAIL_* actions: a reply, after any held CONN's
            frames = walk.frames + settle(walk)
            assert frames[-1].startswith(FAIL_TEXT[row.action]), frames
            assert walk.incoming == []


def test_peer_input_has_a_row_in_every_state() -> None:
    frame_events = {
        ServerEvent.CONN,
        ServerEvent.COMMAND,
        ServerEvent.MALFORMED,
        ServerEvent.BINARY,
        ServerEvent.PONG,
    }
    for state in ServerState:
        events = {event for s, event in SERVER_TRANSITIONS if s is state}
        assert frame_events <= events, state
    # A foreign CLIENT_ID needs a bound one: OPEN, or CLOSED after OPEN.
    assert {s for s, e in SERVER_TRANSITIONS if e is ServerEvent.FOREIGN_COMMAND} == {
        ServerState.OPEN,
        ServerState.CLOSED,
    }


MISSING_ROW_CALLS: dict[ServerEvent, Callable[[ServerSession], object]] = {
    ServerEvent.CONN_ACCEPTED: lambda s: s.conn_accepted(1, "c1", "h1"),
    ServerEvent.CONN_REFUSED: lambda s: s.conn_refused(1, "no"),
    ServerEvent.REPLY: lambda s: s.reply(1, Pass("x")),
    ServerEvent.PUSH: lambda s: s.push(RECORD),
}


@pytest.mark.parametrize(
    ("state", "event"),
    [
        pytest.param(s, e, id=f"{s.name}-{e.name}")
        for s in ServerState
        for e in MISSING_ROW_CALLS
        if (s, e) not in SERVER_TRANSITIONS
    ],
)
def test_driver_calls_without_a_row_are_local_errors(
    state: ServerState, event: ServerEvent
) -> None:
    walk = walk_to(state)
    with pytest.raises(LocalProtocolError, match="not allowed in state"):
        MISSING_ROW_CALLS[event](walk.session)
    assert walk.session.state is state


# ---------------------------------------------------------------------------
# Ordering, §3.8


def test_replies_leave_in_arrival_order_whatever_order_they_complete_in() -> None:
    session = open_session()
    commands = [session.receive_text(sub(name=f"n{i}"))[0] for i in range(4)]
    session.reply(commands[2].seq, Pass("2"))
    session.reply(commands[3].seq, Fail("3"))
    assert session.data_to_send() == []
    assert session.outstanding() == 4
    session.reply(commands[0].seq, Pass("0"))
    assert session.data_to_send() == ["+PASS:0"]
    session.reply(commands[1].seq, Replayed(RECORD))
    assert session.data_to_send() == [
        "+REPLAY:" + record_to_json(RECORD),
        "+PASS:2",
        "-FAIL:3",
    ]
    assert session.outstanding() == 0


def test_seqs_count_commands_in_arrival_order() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    assert conn.seq == 1
    session.receive_binary(b"x")  # seq 2
    session.receive_text("PONG")  # no seq
    [command] = session.conn_accepted(conn.seq, "c1", "h1") + session.receive_text(sub())
    assert command.seq == 3


def test_on_sent_runs_when_the_reply_is_released() -> None:
    session = open_session()
    first, subscribe = (session.receive_text(sub(name=n))[0] for n in ("x", "a/b"))
    released: list[list[str]] = []

    def start_deliveries() -> None:
        released.append(session.data_to_send())
        session.push(RECORD)  # §3.8 rule 4: records of a name after its SUB reply

    session.reply(subscribe.seq, Pass("subscribed"), on_sent=start_deliveries)
    assert released == []  # held behind the first command
    session.push(Delivered(RECORD).record)  # a record for another name may go first
    session.reply(first.seq, Pass("first"))
    assert released == [[format_reply(Delivered(RECORD)), "+PASS:first", "+PASS:subscribed"]]
    assert session.data_to_send() == [format_reply(Delivered(RECORD))]


def test_a_failing_on_sent_does_not_strand_later_replies() -> None:
    session = open_session()
    a, b, c = (session.receive_text(sub(name=n))[0] for n in "abc")

    def boom() -> None:
        raise RuntimeError("driver bug")

    session.reply(b.seq, Pass("b"), on_sent=boom)
    session.reply(c.seq, Pass("c"))
    with pytest.raises(RuntimeError, match="driver bug"):
        session.reply(a.seq, Pass("a"))
    assert session.data_to_send() == ["+PASS:a", "+PASS:b", "+PASS:c"]
    assert session.outstanding() == 0


def test_on_sent_may_answer_another_command() -> None:
    session = open_session()
    a, b = (session.receive_text(sub(name=n))[0] for n in "ab")
    session.reply(a.seq, Pass("a"), on_sent=lambda: session.reply(b.seq, Pass("b")))
    assert session.data_to_send() == ["+PASS:a", "+PASS:b"]


def test_records_and_pings_interleave_without_reordering_replies() -> None:
    session = open_session()
    a, b = (session.receive_text(sub(name=n))[0] for n in "ab")
    session.reply(b.seq, Pass("b"))
    session.push(RECORD)
    session.send_ping()
    session.reply(a.seq, Pass("a"))
    assert session.data_to_send() == [
        format_reply(Delivered(RECORD)),
        "PING",
        "+PASS:a",
        "+PASS:b",
    ]


# ---------------------------------------------------------------------------
# CONN, §3.6


def test_commands_before_conn_fail_and_are_never_executed() -> None:
    session = ServerSession()
    assert session.receive_text(sub()) == []
    assert session.receive_text("ACK;CLIENT_ID=:c1;EVENT_IDEM=:i;BLOCK=:1") == []
    assert session.data_to_send() == [
        "-FAIL:not connected: send CONN first (got SUB)",
        "-FAIL:not connected: send CONN first (got ACK)",
    ]
    assert session.state is ServerState.AWAITING_CONN


def test_a_foreign_client_id_is_refused_and_never_executed() -> None:
    session = open_session()
    assert session.receive_text(sub("c2")) == []
    assert session.data_to_send() == ["-FAIL:CLIENT_ID 'c2' is not the client id of this socket"]
    long_id = "x" * 10_000
    session.receive_text(sub(long_id))
    [frame] = session.data_to_send()
    assert len(frame) < 200


def test_pong_gets_no_reply_in_any_state() -> None:
    for state in ServerState:
        walk = walk_to(state)
        assert walk.session.receive_text("PONG") == []
        assert walk.session.data_to_send() == []
        assert walk.session.outstanding() == (1 if state is ServerState.CONNECTING else 0)


def test_commands_wait_while_conn_is_decided_then_run_in_order() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    assert session.receive_text(sub(name="first")) == []
    assert session.receive_text(sub("c9")) == []  # foreign once c1 is bound
    assert session.receive_text("FOO") == []
    assert session.receive_text(CONN) == []
    assert session.receive_text(sub(name="second")) == []
    assert session.statistics().buffered == 4
    assert session.data_to_send() == []
    incoming = session.conn_accepted(conn.seq, "c1", "h1")
    assert [(i.seq, i.request) for i in incoming] == [
        (2, Sub("c1", "first")),
        (6, Sub("c1", "second")),
    ]
    assert session.data_to_send() == [PASS_C1]  # the rest waits for seq 2
    session.reply(6, Pass("second"))
    session.reply(2, Pass("first"))
    assert session.data_to_send() == [
        "+PASS:first",
        "-FAIL:CLIENT_ID 'c9' is not the client id of this socket",
        "-FAIL:unknown command 'FOO'",
        "-FAIL:already connected: send CONN once per socket",
        "+PASS:second",
    ]


def test_a_refused_conn_keeps_the_socket_usable_and_runs_the_next_conn() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    session.receive_text(sub())
    session.receive_text("CONN;ACCESS_KEY=:ek_2")
    session.receive_text(sub(name="later"))
    [retry] = session.conn_refused(conn.seq, "unknown app key")
    assert retry == Incoming(3, Conn("ek_2"))
    assert session.state is ServerState.CONNECTING
    assert session.data_to_send() == [
        "-FAIL:unknown app key",
        "-FAIL:not connected: send CONN first (got SUB)",
    ]
    [later] = session.conn_accepted(retry.seq, "c1", "h1")
    assert later == Incoming(4, Sub("c1", "later"))
    assert session.data_to_send() == [PASS_C1]


def test_conn_accepted_checks_our_own_ids_first() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    with pytest.raises(ValueError, match=r"§3\.6"):
        session.conn_accepted(conn.seq, "c=1", "h")
    assert session.state is ServerState.CONNECTING
    assert session.conn_accepted(conn.seq, "c1", "h1") == []


def test_binary_frames_fail_as_one_command() -> None:
    session = open_session()
    session.receive_binary(b"SUB;CLIENT_ID=:c1;EVENT_NAME=:a")
    assert session.data_to_send() == [
        "-FAIL:binary frames are not supported: send each command as a text frame"
    ]


# ---------------------------------------------------------------------------
# Our own mistakes raise LocalProtocolError


def test_replying_twice_or_to_unknown_seqs_is_our_bug() -> None:
    session = open_session()
    [command] = session.receive_text(sub())
    [other] = session.receive_text(sub(name="x"))
    session.reply(other.seq, Pass("x"))
    with pytest.raises(LocalProtocolError, match="already answered"):
        session.reply(other.seq, Pass("again"))  # answered, not yet released
    session.reply(command.seq, Pass("ok"))
    with pytest.raises(LocalProtocolError, match="unknown or already answered"):
        session.reply(command.seq, Pass("again"))  # released
    with pytest.raises(LocalProtocolError, match="unknown"):
        session.reply(99, Pass("never"))
    with pytest.raises(LocalProtocolError, match="unknown"):
        session.reply(1, Pass("the CONN, long released"))


def test_replying_to_a_conn_or_a_held_command_is_our_bug() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    session.receive_text(sub())  # held behind the CONN
    for seq in (conn.seq, 2):
        with pytest.raises(LocalProtocolError, match="not allowed in state CONNECTING"):
            session.reply(seq, Pass("x"))
    with pytest.raises(LocalProtocolError, match="is not the CONN"):
        session.conn_accepted(2, "c1", "h1")
    [held] = session.conn_accepted(conn.seq, "c1", "h1")
    with pytest.raises(LocalProtocolError, match="unknown or already answered"):
        session.reply(conn.seq, Pass("the CONN, released at once"))
    session.reply(held.seq, Pass("ok"))


def test_replying_to_a_command_the_session_failed_is_our_bug() -> None:
    session = open_session()
    [command] = session.receive_text(sub())
    session.receive_text("FOO")  # failed by the session, held behind `command`
    with pytest.raises(LocalProtocolError, match="never handed out"):
        session.reply(command.seq + 1, Pass("x"))


def test_reply_takes_only_command_replies() -> None:
    session = open_session()
    [command] = session.receive_text(sub())
    for wrong in (Delivered(RECORD), Ping()):
        with pytest.raises(LocalProtocolError, match="push"):
            session.reply(command.seq, wrong)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# close()


def test_close_forgets_pending_work_and_ignores_late_calls() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    session.receive_text(sub())
    session.close()
    assert session.state is ServerState.CLOSED
    assert session.outstanding() == 0
    assert session.conn_accepted(conn.seq, "c1", "h1") == []  # the engine was slower
    assert session.conn_refused(conn.seq, "x") == []
    session.reply(2, Pass("late"))
    session.push(RECORD)
    session.send_ping()
    session.receive_binary(b"x")
    assert session.receive_text(sub()) == []
    session.close()
    assert session.data_to_send() == []


def test_frames_released_before_close_are_still_there() -> None:
    session = open_session()
    session.push(RECORD)
    session.close()
    assert session.data_to_send() == [format_reply(Delivered(RECORD))]
    assert session.client_id == "c1"


def test_statistics() -> None:
    session = ServerSession()
    [conn] = session.receive_text(CONN)
    session.receive_text(sub())
    session.receive_text("FOO")
    stats = session.statistics()
    assert (stats.outstanding, stats.executing, stats.buffered, stats.frames_to_send) == (
        3,
        1,
        1,
        0,
    )
    session.conn_accepted(conn.seq, "c1", "h1")
    stats = session.statistics()
    assert (stats.outstanding, stats.executing, stats.buffered, stats.frames_to_send) == (
        2,
        1,
        0,
        1,
    )


# ---------------------------------------------------------------------------
# Fuzzing the server session with a random driver

CLIENT_IDS = ["c1", "c2"]
FRAME_TEXTS = [
    CONN,
    "CONN;ACCESS_KEY=:bad",
    sub("c1"),
    sub("c2"),
    "ACK;CLIENT_ID=:c1;EVENT_IDEM=:i;BLOCK=:1;EVENT_NAME=:undefined",
    "REPLAY;CLIENT_ID=:c1;EVENT_IDEM=:i",
    "PONG",
    "PONG;X=:1",
    "PING",
    "FOO",
    "",
]
frame_strategy = st.one_of(
    st.sampled_from(FRAME_TEXTS),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.sampled_from(CLIENT_IDS).map(lambda cid: f"PUB;CLIENT_ID=:{cid};METADATA=:{{}}"),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frame_strategy, max_size=25), st.randoms(use_true_random=False))
def test_any_frames_get_exactly_one_reply_each_in_arrival_order(
    frames: list[str | bytes], rng: random.Random
) -> None:
    session = ServerSession()
    pending: list[Incoming] = []
    seq_frames: dict[int, str | bytes] = {}  # what the driver saw for each seq
    handed_out: set[int] = set()
    out: list[str] = []
    commands = 0

    def take(incoming: list[Incoming]) -> None:
        for item in incoming:
            assert item.seq not in handed_out
            handed_out.add(item.seq)
            frame = seq_frames[item.seq]
            assert isinstance(frame, str)
            assert item.request == parse_request(frame)
            if not isinstance(item.request, Conn):  # invariant 4
                assert session.state is ServerState.OPEN
                assert getattr(item.request, "client_id", None) == session.client_id
            pending.append(item)

    def complete_some() -> None:
        rng.shuffle(pending)
        for _ in range(rng.randint(0, len(pending))):
            item = pending.pop()
            if isinstance(item.request, Conn):
                if item.request.access_key == "bad" or rng.random() < 0.3:
                    take(session.conn_refused(item.seq, f"refused #{item.seq}"))
                else:
                    take(session.conn_accepted(item.seq, "c1", f"h{item.seq}"))
            else:
                reply = Pass(f"#{item.seq}") if rng.random() < 0.5 else Fail(f"#{item.seq}")
                session.reply(item.seq, reply)
        if session.state is ServerState.OPEN and rng.random() < 0.3:
            session.push(RECORD)
        out.extend(session.data_to_send())

    for frame in frames:
        if frame != "PONG":
            commands += 1
            seq_frames[commands] = frame
        if isinstance(frame, bytes):
            session.receive_binary(frame)
        else:
            take(session.receive_text(frame))
        complete_some()
    while pending:
        complete_some()
    out.extend(session.data_to_send())

    replies = [frame for frame in out if is_reply(frame)]
    assert len(replies) == commands  # exactly one each, none for PONG
    assert session.outstanding() == 0
    for position, reply in enumerate(replies, start=1):
        if position in handed_out:  # the driver's reply, tagged with its seq
            frame = seq_frames[position]
            assert isinstance(frame, str)
            if isinstance(parse_request(frame), Conn):
                assert reply.startswith(("-FAIL:refused #", "+PASS:{clientId=c1"))
                assert reply.endswith((f"#{position}", f"clientHash=h{position}}}"))
            else:
                assert reply in (f"+PASS:#{position}", f"-FAIL:#{position}")
        else:  # the session's own -FAIL:
            assert reply.startswith("-FAIL:")
            assert not reply.startswith(("-FAIL:#", "-FAIL:refused #"))


# ---------------------------------------------------------------------------
# ClientSession


def test_client_matches_replies_oldest_first() -> None:
    client = ClientSession()
    s1, text1 = client.send(Sub("c1", "a/b"))
    s2, text2 = client.send(Replay("c1", "i", "a/b"))
    assert (s1, s2) == (1, 2)
    assert text1 == "SUB;CLIENT_ID=:c1;EVENT_NAME=:a/b"
    assert text2 == "REPLAY;CLIENT_ID=:c1;EVENT_IDEM=:i;EVENT_NAME=:a/b"
    assert client.outstanding() == 2
    assert client.receive_text("+RECORD:" + record_to_json(RECORD)) == [RecordArrived(RECORD)]
    assert client.receive_text("PING") == [PingArrived()]
    assert client.receive_text("+PASS:ok") == [ReplyFor(1, Pass("ok"))]
    assert client.receive_text("+REPLAY:" + record_to_json(RECORD)) == [
        ReplyFor(2, Replayed(RECORD))
    ]
    assert client.outstanding() == 0


def test_client_pong_expects_no_reply() -> None:
    client = ClientSession()
    assert client.send(Pong()) == (None, "PONG")
    assert client.outstanding() == 0


def test_client_flags_what_fits_nothing() -> None:
    client = ClientSession()
    [event] = client.receive_text("+PASS:nobody asked")
    assert isinstance(event, Unexpected)
    assert event.reason == "a reply with no request outstanding"
    client.send(Sub("c1", "a"))
    [event] = client.receive_text("+RECORD:{not json" + "x" * 500)
    assert isinstance(event, Unexpected)
    assert len(event.text_excerpt) < 120
    assert "record is not JSON" in event.reason
    assert client.outstanding() == 1  # a broken record answers nothing
    [event] = client.receive_binary(b"\x00")
    assert isinstance(event, Unexpected)


def test_client_close_reports_requests_that_will_never_be_answered() -> None:
    client = ClientSession()
    client.send(Sub("c1", "a"))
    client.send(Sub("c1", "b"))
    client.receive_text("-FAIL:no")
    assert client.close() == [2]
    assert client.receive_text("+PASS:late") == []
    assert client.receive_binary(b"") == []
    with pytest.raises(LocalProtocolError, match="after close"):
        client.send(Sub("c1", "c"))


def test_client_refuses_unframeable_requests_without_counting_them() -> None:
    client = ClientSession()
    with pytest.raises(ValueError, match=";"):
        client.send(Sub("c1", "a;b"))
    assert client.outstanding() == 0
    assert client.send(Sub("c1", "a"))[0] == 1


client_ops = st.lists(
    st.sampled_from(["send", "pong", "pass", "fail", "replay", "record", "ping"]), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(client_ops)
def test_client_correlates_in_fifo_order(ops: list[str]) -> None:
    client = ClientSession()
    model: list[int] = []
    sent = 0
    for op in ops:
        if op == "send":
            seq, _ = client.send(Ack("c1", "i", 1, "n"))
            sent += 1
            assert seq == sent
            model.append(seq)
        elif op == "pong":
            assert client.send(Pong())[0] is None
        elif op in ("pass", "fail", "replay"):
            frame = {
                "pass": "+PASS:x",
                "fail": "-FAIL:x",
                "replay": "+REPLAY:" + record_to_json(RECORD),
            }[op]
            [event] = client.receive_text(frame)
            if model:
                assert isinstance(event, ReplyFor)
                assert event.seq == model.pop(0)
            else:
                assert isinstance(event, Unexpected)
        else:
            [event] = client.receive_text(
                "PING" if op == "ping" else "+RECORD:" + record_to_json(RECORD)
            )
            assert isinstance(event, PingArrived | RecordArrived)
        assert client.outstanding() == len(model)


# ---------------------------------------------------------------------------
# Both ends together


def test_client_and_server_sessions_talk() -> None:
    client, server = ClientSession(), ServerSession()
    requests: list[Request] = [
        Conn("ek_1"),
        Sub("c1", "a/b"),
        Pub("c1", "a/b", "cA==", "app", '{"headers":{"h":"x;y=:z"}}', None),
        Replay("c1", "idem-1", ""),
        Pong(),
    ]
    seqs = [client.send(r) for r in requests]
    executed: list[Incoming] = []
    for _, text in seqs:
        executed += server.receive_text(text)
    assert [i.request for i in executed] == [Conn("ek_1")]
    executed = server.conn_accepted(executed[0].seq, "c1", "h1")
    assert [i.request for i in executed] == requests[1:4]
    sub_, pub, replay = executed
    server.reply(replay.seq, Replayed(RECORD))
    server.reply(pub.seq, Pass("idem-9"))
    server.reply(sub_.seq, Pass("subscribed"), on_sent=lambda: server.push(RECORD))
    events = [event for frame in server.data_to_send() for event in client.receive_text(frame)]
    assert events == [
        ReplyFor(1, Pass("{clientId=c1, clientHash=h1}")),
        ReplyFor(2, Pass("subscribed")),
        RecordArrived(RECORD),
        ReplyFor(3, Pass("idem-9")),
        ReplyFor(4, Replayed(RECORD)),
    ]


def test_all_is_complete() -> None:
    for name in wssession.__all__:
        assert hasattr(wssession, name), name
    public = {
        name
        for name, value in vars(wssession).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == wssession.__name__
    }
    assert public <= set(wssession.__all__)
