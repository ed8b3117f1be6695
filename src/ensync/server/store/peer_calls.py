"""Store calls between engine nodes, as bytes: a node asks a partition's owner.

With one owner per partition (docs/architecture.md), a node serves the
partitions of its own slots and asks the owner for the others: appends,
claims, settlements, reads of one message or of dead letters. A batch of
calls for one owner travels as one message, and comes back as one message
of answers in the same order: a value, "not served here" (the slot moved:
the caller asks the new owner), or a store error's text.

The form is JSON arrays, a tag first and the values in declaration order.
Sans-I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ensync._json import dumps_compact, loads_strict
from ensync.server.store.base import (
    Appended,
    Claim,
    DeadRef,
    DeliveryPolicy,
    Lease,
    MessageState,
    NewMessage,
    Release,
    Released,
    Settlement,
    StoredMessage,
)

__all__ = [
    "Append",
    "Backlog",
    "ClaimFrom",
    "Dead",
    "DeadRefs",
    "Defer",
    "Extend",
    "Failed",
    "Get",
    "NotServed",
    "PeerCall",
    "Redrive",
    "ReleaseMany",
    "SettleMany",
    "Watch",
    "decode_answers",
    "decode_calls",
    "encode_answers",
    "encode_calls",
]

Key = tuple[str, str]
_FORM = 1


@dataclass(frozen=True, slots=True)
class Append:
    """``append(batch)``; answered with the ``Appended`` list."""

    batch: tuple[NewMessage, ...]
    now_ms: int
    dedupe_since_ms: int


@dataclass(frozen=True, slots=True)
class ClaimFrom:
    """``claim`` for ``node``'s subscribers; the owner tells ``node`` when
    the partition has news."""

    node: str
    recipient: str
    name: str
    limit: int
    now_ms: int
    policy: DeliveryPolicy


@dataclass(frozen=True, slots=True)
class Extend:
    idem: str
    token: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class ReleaseMany:
    releases: tuple[Release, ...]
    now_ms: int
    policy: DeliveryPolicy


@dataclass(frozen=True, slots=True)
class Defer:
    idem: str
    visible_at_ms: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class SettleMany:
    settlements: tuple[Settlement, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class Get:
    idem: str


@dataclass(frozen=True, slots=True)
class Dead:
    """``list_dead`` of the partitions the owner serves."""

    recipient: str
    limit: int


@dataclass(frozen=True, slots=True)
class DeadRefs:
    recipient: str


@dataclass(frozen=True, slots=True)
class Redrive:
    idem: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class Backlog:
    """``backlog`` of the partitions the owner serves."""


@dataclass(frozen=True, slots=True)
class Watch:
    """``node`` waits for news of ``keys``; answered with those that have
    pending messages now (a notice that was lost costs a moment, not a
    message)."""

    node: str
    keys: tuple[Key, ...]


PeerCall = (
    Append
    | ClaimFrom
    | Extend
    | ReleaseMany
    | Defer
    | SettleMany
    | Get
    | Dead
    | DeadRefs
    | Redrive
    | Backlog
    | Watch
)


@dataclass(frozen=True, slots=True)
class NotServed:
    """The node asked does not serve ``slot`` (any longer)."""

    slot: int


# ------------------------------------------------------------------- values


def _message_out(message: StoredMessage | NewMessage) -> list[Any]:
    values = [getattr(message, f.name) for f in dataclasses.fields(message)]
    return [int(v) if isinstance(v, MessageState) else v for v in values]


_STORED = [f.name for f in dataclasses.fields(StoredMessage)]
_NEW = [f.name for f in dataclasses.fields(NewMessage)]


def _stored_in(values: list[Any]) -> StoredMessage:
    fields = dict(zip(_STORED, values, strict=True))
    fields["state"] = MessageState(fields["state"])
    return StoredMessage(**fields)


def _new_in(values: list[Any]) -> NewMessage:
    return NewMessage(**dict(zip(_NEW, values, strict=True)))


def _policy_out(policy: DeliveryPolicy) -> list[Any]:
    return [policy.lease_ms, policy.max_deliveries, list(policy.backoff_ms)]


def _policy_in(values: list[Any]) -> DeliveryPolicy:
    lease_ms, max_deliveries, backoff = values
    return DeliveryPolicy(int(lease_ms), int(max_deliveries), tuple(int(b) for b in backoff))


# -------------------------------------------------------------------- calls


def _call_out(call: PeerCall) -> list[Any]:
    if isinstance(call, Append):
        return ["a", [_message_out(m) for m in call.batch], call.now_ms, call.dedupe_since_ms]
    if isinstance(call, ClaimFrom):
        return [
            "c",
            call.node,
            call.recipient,
            call.name,
            call.limit,
            call.now_ms,
            _policy_out(call.policy),
        ]
    if isinstance(call, Extend):
        return ["x", call.idem, call.token, call.deadline_ms]
    if isinstance(call, ReleaseMany):
        releases = [[r.idem, r.token, r.failure, r.delivered] for r in call.releases]
        return ["r", releases, call.now_ms, _policy_out(call.policy)]
    if isinstance(call, Defer):
        return ["f", call.idem, call.visible_at_ms, call.now_ms]
    if isinstance(call, SettleMany):
        items = [[s.idem, int(s.state), s.reason] for s in call.settlements]
        return ["s", items, call.now_ms]
    if isinstance(call, Get):
        return ["g", call.idem]
    if isinstance(call, Dead):
        return ["d", call.recipient, call.limit]
    if isinstance(call, DeadRefs):
        return ["D", call.recipient]
    if isinstance(call, Redrive):
        return ["R", call.idem, call.now_ms]
    if isinstance(call, Backlog):
        return ["b"]
    return ["w", call.node, [list(key) for key in call.keys]]


def _call_in(item: list[Any]) -> PeerCall:
    tag, *v = item
    if tag == "a":
        return Append(tuple(_new_in(m) for m in v[0]), int(v[1]), int(v[2]))
    if tag == "c":
        return ClaimFrom(str(v[0]), str(v[1]), str(v[2]), int(v[3]), int(v[4]), _policy_in(v[5]))
    if tag == "x":
        return Extend(str(v[0]), int(v[1]), int(v[2]))
    if tag == "r":
        releases = tuple(Release(str(i), int(t), f, bool(d)) for i, t, f, d in v[0])
        return ReleaseMany(releases, int(v[1]), _policy_in(v[2]))
    if tag == "f":
        return Defer(str(v[0]), int(v[1]), int(v[2]))
    if tag == "s":
        items = tuple(Settlement(str(i), MessageState(s), r) for i, s, r in v[0])
        return SettleMany(items, int(v[1]))
    if tag == "g":
        return Get(str(v[0]))
    if tag == "d":
        return Dead(str(v[0]), int(v[1]))
    if tag == "D":
        return DeadRefs(str(v[0]))
    if tag == "R":
        return Redrive(str(v[0]), int(v[1]))
    if tag == "b" and not v:
        return Backlog()
    if tag == "w":
        return Watch(str(v[0]), tuple((str(r), str(n)) for r, n in v[1]))
    raise ValueError(f"call tag {tag!r}")


def encode_calls(calls: Sequence[PeerCall]) -> bytes:
    """A batch of calls for one owner, as one message."""
    return dumps_compact([_FORM, *(_call_out(call) for call in calls)])


def decode_calls(data: bytes) -> list[PeerCall]:
    """The calls :func:`encode_calls` wrote; ValueError if ``data`` is not a batch."""
    try:
        form, *items = loads_strict(data)
        if form != _FORM:
            raise ValueError(f"form {form!r}")
        return [_call_in(item) for item in items]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"not a batch of store calls: {exc!r}") from None


# ------------------------------------------------------------------ answers

Answer = Any  # a call's value, NotServed, or a StoreError's text (str in an "e" item)


def _value_out(call: PeerCall, value: Any) -> Any:
    if isinstance(call, Append):
        return [[a.idem, a.block, a.duplicate, a.error] for a in value]
    if isinstance(call, ClaimFrom):
        claim: Claim = value
        leases = [[_message_out(x.message), x.token, x.deadline_ms] for x in claim.leases]
        return [leases, list(claim.dead), list(claim.expired), claim.next_visible_ms]
    if isinstance(call, ReleaseMany):
        return [[r.visible_at_ms, r.dead, r.stale] for r in value]
    if isinstance(call, Get):
        return None if value is None else _message_out(value)
    if isinstance(call, Dead):
        return [_message_out(m) for m in value]
    if isinstance(call, DeadRefs):
        return [list(ref) for ref in value]
    if isinstance(call, Watch):
        return [list(key) for key in value]
    return value  # bools, lists of bools, the backlog's dict


def _value_in(call: PeerCall, value: Any) -> Any:
    if isinstance(call, Append):
        return [Appended(str(i), int(b), bool(d), e) for i, b, d, e in value]
    if isinstance(call, ClaimFrom):
        leases, dead, expired, next_visible = value
        return Claim(
            tuple(Lease(_stored_in(m), int(t), int(d)) for m, t, d in leases),
            tuple(dead),
            tuple(expired),
            next_visible,
        )
    if isinstance(call, ReleaseMany):
        return [Released(v, bool(d), bool(s)) for v, d, s in value]
    if isinstance(call, Get):
        return None if value is None else _stored_in(value)
    if isinstance(call, Dead):
        return [_stored_in(m) for m in value]
    if isinstance(call, DeadRefs):
        return [DeadRef(int(at), str(i), str(n)) for at, i, n in value]
    if isinstance(call, Watch):
        return [(str(r), str(n)) for r, n in value]
    if isinstance(call, Backlog):
        return {str(app): int(count) for app, count in value.items()}
    if isinstance(call, SettleMany):
        return [bool(done) for done in value]
    return bool(value)


@dataclass(frozen=True, slots=True)
class Failed:
    """The owner's store failed the call (a ``StoreError``'s text)."""

    message: str


def encode_answers(calls: Sequence[PeerCall], answers: Sequence[Any]) -> bytes:
    """Answers to a batch (values, :class:`NotServed` or :class:`Failed`), in its order."""
    items: list[Any] = [_FORM]
    for call, answer in zip(calls, answers, strict=True):
        if isinstance(answer, NotServed):
            items.append(["n", answer.slot])
        elif isinstance(answer, Failed):
            items.append(["e", answer.message])
        else:
            items.append(["v", _value_out(call, answer)])
    return dumps_compact(items)


def decode_answers(calls: Sequence[PeerCall], data: bytes) -> list[Any]:
    """The answers :func:`encode_answers` wrote for ``calls``; ValueError if
    ``data`` is not such a message."""
    try:
        form, *items = loads_strict(data)
        if form != _FORM or len(items) != len(calls):
            raise ValueError(f"form {form!r}, {len(items)} answers for {len(calls)} calls")
        out: list[Any] = []
        for call, (tag, value) in zip(calls, items, strict=True):
            if tag == "n":
                out.append(NotServed(int(value)))
            elif tag == "e":
                out.append(Failed(str(value)))
            elif tag == "v":
                out.append(_value_in(call, value))
            else:
                raise ValueError(f"answer tag {tag!r}")
        return out
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"not answers to store calls: {exc!r}") from None
