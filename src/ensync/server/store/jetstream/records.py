"""How the JetStream backend lays its data out: subjects and records.

Every string that goes into a subject (app ids, message names, idems) is
base64url-encoded without padding, so it is one subject token whatever it
holds (names contain ``/``, and may contain ``.``). A partition is
``<recipient token>.<name token>``.

Streams (``NS`` is the namespace in upper case, ``ns`` as given):

=================  =========================================  =================
stream             subjects                                   holds
=================  =========================================  =================
``NS_MESSAGES``    ``ns.m.<partition>.<idem>``                each message, in
                                                              block order per
                                                              partition
                   ``ns.k.<digest>``                          idempotency keys
                                                              (with a TTL)
``NS_VOLATILE``    ``ns.v.<idem>``                            bodies of
                                                              ``persist: false``
                                                              messages (memory)
``NS_STATE``       ``ns.c.<partition>``                       first-delivery
                                                              cursor
                   ``ns.l.<partition>.<idem>``                a message that
                                                              left the line:
                                                              lease, schedule,
                                                              attempts
                   ``ns.x.<partition>.<idem>``                acked or expired
                   ``ns.d.<partition>.<idem>``                dead letter
``NS_APPS``        ``ns.app.a.<name>``, ``ns.app.v``          apps, and a
                                                              version all app
                                                              writes move
``NS_COUNTS``      ``ns.n.<recipient>``                       pending messages
                                                              per app (counter)
=================  =========================================  =================

``NS_STATE`` and ``NS_APPS`` keep one message per subject, so the last
sequence of ``ns.*.<partition>.<idem>`` is the revision of a message's
state: every state write expects it (compare-and-set).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from ensync.server.store.base import AppRecord, DeliveryPolicy, MessageState, StoredMessage

__all__ = [
    "Live",
    "Names",
    "app_from_json",
    "app_to_json",
    "detoken",
    "token",
]


def token(text: str) -> str:
    """``text`` as one subject token (base64url, no padding)."""
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode() or "="


def detoken(encoded: str) -> str:
    """The text a :func:`token` stands for."""
    if encoded == "=":
        return ""
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


class Names:
    """Stream names and subjects of one namespace."""

    def __init__(self, namespace: str) -> None:
        if not namespace or not all(c.isalnum() or c in "-_" for c in namespace):
            raise ValueError(f"namespace {namespace!r}: letters, digits, '-' and '_' only")
        self.ns = namespace
        upper = namespace.upper().replace("-", "_")
        self.messages = f"{upper}_MESSAGES"
        self.volatile = f"{upper}_VOLATILE"
        self.state = f"{upper}_STATE"
        self.apps = f"{upper}_APPS"
        self.counts = f"{upper}_COUNTS"
        # One owner per partition: live nodes, slots, fences and partition logs.
        self.owned = f"{upper}_OWNED"
        self.owned_prefix = f"{namespace}.o"
        # Core NATS requests between nodes: in no stream.
        self.peers_prefix = f"{namespace}.peer"
        self.ready = f"{namespace}.ready"

    @staticmethod
    def partition(recipient: str, name: str) -> str:
        return f"{token(recipient)}.{token(name)}"

    def message(self, part: str, idem: str) -> str:
        return f"{self.ns}.m.{part}.{token(idem)}"

    def messages_of(self, part: str) -> str:
        return f"{self.ns}.m.{part}.*"

    def message_anywhere(self, idem: str) -> str:
        return f"{self.ns}.m.*.*.{token(idem)}"

    def dedupe(self, digest: bytes) -> str:
        return f"{self.ns}.k.{digest.hex()}"

    def body(self, idem: str) -> str:
        return f"{self.ns}.v.{token(idem)}"

    def cursor(self, part: str) -> str:
        return f"{self.ns}.c.{part}"

    def live(self, part: str, idem: str) -> str:
        return f"{self.ns}.l.{part}.{token(idem)}"

    def lives_of(self, part: str) -> str:
        return f"{self.ns}.l.{part}.*"

    def settled(self, part: str, idem: str, state: MessageState) -> str:
        kind = "d" if state is MessageState.DEAD else "x"
        return f"{self.ns}.{kind}.{part}.{token(idem)}"

    def dead_of(self, recipient: str) -> str:
        return f"{self.ns}.d.{token(recipient)}.*.*"

    def state_of(self, part: str, idem: str) -> str:
        """The filter every state subject of a message matches (its revision)."""
        return f"{self.ns}.*.{part}.{token(idem)}"

    def state_anywhere(self, idem: str) -> str:
        return f"{self.ns}.*.*.*.{token(idem)}"

    def app(self, name: str) -> str:
        return f"{self.ns}.app.a.{token(name)}"

    @property
    def apps_all(self) -> str:
        return f"{self.ns}.app.a.*"

    @property
    def apps_version(self) -> str:
        return f"{self.ns}.app.v"

    def session(self, client_id: str) -> str:
        return f"{self.ns}.app.s.{token(client_id)}"

    def count(self, recipient: str) -> str:
        return f"{self.ns}.n.{token(recipient)}"

    @property
    def counts_all(self) -> str:
        return f"{self.ns}.n.*"

    @staticmethod
    def split_count(subject: str) -> str:
        """The recipient of a counter subject."""
        return detoken(subject.rsplit(".", 1)[1])

    def split(self, subject: str) -> tuple[str, str, str, str]:
        """``(kind, recipient, name, idem)`` of a per-message subject."""
        _, kind, recipient, name, idem = subject.split(".")
        return kind, detoken(recipient), detoken(name), detoken(idem)


@dataclass(slots=True)
class Live:
    """A message's state while it is pending and has left the first-delivery
    line (claimed once, deferred or redriven): ``NS_STATE``'s ``l`` record.

    ``rev`` is the sequence of the last state write (the compare-and-set
    value); ``token`` is non-zero while leased, until ``deadline_ms``.
    """

    rev: int
    attempts: int
    visible_at_ms: int
    token: int
    deadline_ms: int
    seq: int  # the message's sequence in NS_MESSAGES
    block: int
    expires_at_ms: int | None
    mine: bool = False  # leased by this store instance

    def claimable_at(self, policy: DeliveryPolicy) -> int:
        if self.token:
            return self.deadline_ms + policy.backoff_after(self.attempts)
        return self.visible_at_ms

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "a": self.attempts,
                "v": self.visible_at_ms,
                "t": self.token,
                "d": self.deadline_ms,
                "q": self.seq,
                "b": self.block,
                "x": self.expires_at_ms,
            }
        )

    @classmethod
    def from_json(cls, rev: int, record: dict[str, Any]) -> Live:
        return cls(
            rev=rev,
            attempts=record["a"],
            visible_at_ms=record["v"],
            token=record["t"],
            deadline_ms=record["d"],
            seq=record["q"],
            block=record["b"],
            expires_at_ms=record.get("x"),
        )


GONE = orjson.dumps({"gone": 1})


def is_gone(record: Any) -> bool:
    return isinstance(record, dict) and record.get("gone") == 1


def settled_json(
    state: MessageState, at_ms: int, reason: str | None, seq: int, block: int, attempts: int
) -> bytes:
    return orjson.dumps(
        {"s": int(state), "at": at_ms, "why": reason, "q": seq, "b": block, "a": attempts}
    )


def message_json(message: StoredMessage) -> bytes:
    return orjson.dumps(message_dict(message))


def message_dict(message: StoredMessage) -> dict[str, Any]:
    """A message's record (its idem, recipient and name are in its subject)."""
    record: dict[str, Any] = {
        "b": message.block,
        "s": message.sender,
        "c": message.created_at_ms,
        "x": message.expires_at_ms,
        "k": message.dedupe_key,
    }
    if message.persist:
        record.update(p=message.payload, md=message.metadata, pm=message.payload_metadata)
    else:
        record["v"] = 1
    return record


def body_json(message: StoredMessage) -> bytes:
    return orjson.dumps(
        {"p": message.payload, "md": message.metadata, "pm": message.payload_metadata}
    )


def message_from(
    recipient: str, name: str, idem: str, record: dict[str, Any], body: dict[str, Any] | None
) -> StoredMessage:
    """A stored message as appended (state PENDING, no attempts yet)."""
    source = record if body is None else body
    return StoredMessage(
        idem=idem,
        recipient=recipient,
        name=name,
        block=record["b"],
        payload=source["p"],
        metadata=source["md"],
        sender=record["s"],
        created_at_ms=record["c"],
        payload_metadata=source.get("pm"),
        expires_at_ms=record.get("x"),
        dedupe_key=record.get("k"),
        persist=not record.get("v"),
    )


def app_to_json(app: AppRecord) -> bytes:
    return orjson.dumps(
        {
            "name": app.name,
            "app_id": app.app_id,
            "key_hash": app.key_hash.hex(),
            "created_at_ms": app.created_at_ms,
            "revoked": app.revoked,
            "publish_rules": list(app.publish_rules),
            "subscribe_rules": list(app.subscribe_rules),
        }
    )


def app_from_json(record: dict[str, Any]) -> AppRecord:
    return AppRecord(
        name=record["name"],
        app_id=record["app_id"],
        key_hash=bytes.fromhex(record["key_hash"]),
        created_at_ms=record["created_at_ms"],
        revoked=record["revoked"],
        publish_rules=tuple(record["publish_rules"]),
        subscribe_rules=tuple(record["subscribe_rules"]),
    )
