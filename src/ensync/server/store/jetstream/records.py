"""How the JetStream backend names its streams and subjects, and its records.

Every string that goes into a subject (app ids, message names) is
base64url-encoded without padding, so it is one subject token whatever it
holds (names contain ``/``, and may contain ``.``). A partition is
``<recipient token>.<name token>``.

Streams (``NS`` is the namespace in upper case, ``ns`` as given):

* ``NS_APPS`` (one message per subject): ``ns.app.a.<name>`` (an app),
  ``ns.app.v`` (a version every app write moves), ``ns.app.s.<client id>``
  (client sessions, with a TTL), ``ns.app.layout`` (the namespace's layout);
* ``NS_OWNED``: ``ns.o.>``, slot leases and fences, the live nodes and the
  partition logs (:mod:`.slots`, :mod:`.nodes`, :mod:`.partition_logs`).

Nodes ask each other under ``ns.peer.>`` (core NATS, in no stream).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from ensync.server.store.base import AppRecord, StoredMessage

__all__ = [
    "GONE",
    "Names",
    "app_from_json",
    "app_to_json",
    "detoken",
    "is_gone",
    "message_dict",
    "message_from",
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
        self.apps = f"{upper}_APPS"
        # One owner per partition: live nodes, slots, fences and partition logs.
        self.owned = f"{upper}_OWNED"
        self.owned_prefix = f"{namespace}.o"
        # Core NATS requests between nodes: in no stream.
        self.peers_prefix = f"{namespace}.peer"

    @staticmethod
    def partition(recipient: str, name: str) -> str:
        return f"{token(recipient)}.{token(name)}"

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


GONE = orjson.dumps({"gone": 1})


def is_gone(record: Any) -> bool:
    return isinstance(record, dict) and record.get("gone") == 1


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
