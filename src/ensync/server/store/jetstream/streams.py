"""The backend's streams: created when absent, never changed once they exist.

Every engine node and every ``ensync`` command that opens the store runs
:func:`ensure_streams`. What it promises:

* a stream that does not exist is created, with the replicas the store URL
  asks for (``?replicas=N``), or without that option with the replicas of
  the namespace's streams that exist (1 if none does);
* an existing stream is never changed: not its replicas, not its limits.
  A node or a command given a shorter URL (``nats://one-host``) must not
  scale a cluster's streams down, nor undo what an operator set;
* an existing stream must be what the backend relies on (subjects,
  storage, one message per subject where it says so, atomic batches,
  per-message TTLs, direct gets, roll-ups, no limit that drops messages),
  and have the
  replicas the URL asks for when it asks. Otherwise :class:`StreamConfigError`
  says which stream differs, how, and what to do; nothing is created or
  changed then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from ensync.server.store.base import StoreError
from ensync.server.store.jetstream.api import (
    STREAM_NAME_IN_USE,
    STREAM_NOT_FOUND,
    JetStreamApi,
    RejectedError,
)
from ensync.server.store.jetstream.records import Names
from ensync.server.store.jetstream.slots import owned_stream_config

__all__ = ["StreamConfigError", "ensure_streams", "stream_configs", "stream_problems"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# JetStream errors a cluster that is still forming answers: no peers yet for
# the replicas, no leader yet.
_NOT_YET = frozenset({10005, 10008, 10023})
# Limits the backend sets on no stream, as JetStream reports them unset: a
# stream that dropped messages by age, count or size would lose pending ones.
_UNLIMITED: Mapping[str, int] = {"max_age": 0, "max_msgs": -1, "max_bytes": -1}
_NANOSECONDS = frozenset({"max_age", "duplicate_window"})


class StreamConfigError(StoreError):
    """An existing stream is not configured as this store needs; the message
    says how and what to do. The stream was left as it is."""


def stream_configs(names: Names) -> list[dict[str, Any]]:
    """The configuration of each stream of a namespace, replicas aside."""
    owned = owned_stream_config(names.owned, names.owned_prefix)
    del owned["num_replicas"]
    return [
        {
            "name": names.apps,
            "subjects": [f"{names.ns}.app.>"],
            "storage": "file",
            "max_msgs_per_subject": 1,
            "allow_direct": True,
            "allow_atomic": True,
            "allow_msg_ttl": True,  # client sessions expire
        },
        owned,
    ]


async def ensure_streams(
    api: JetStreamApi,
    names: Names,
    replicas: int | None,
    *,
    within_s: float = 60.0,
    configs: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Create the namespace's streams that do not exist; check those that do.

    Args:
        replicas: what the store URL asks for, ``None`` if it does not say.
        configs: the streams, replicas aside (:func:`stream_configs` if not given).

    Raises:
        StreamConfigError: an existing stream differs (nothing was changed).
        StoreError: JetStream did not answer, or refused to create a stream.
    """
    await api.ready(within_s=within_s)
    deadline = time.monotonic() + within_s
    configs = stream_configs(names) if configs is None else configs
    existing: dict[str, dict[str, Any]] = {}
    for config in configs:
        found = await _retry(functools.partial(_info, api, config["name"]), deadline)
        if found is not None:
            existing[config["name"]] = found
    _check(configs, existing, replicas)
    create_with = replicas
    if create_with is None:
        create_with = next((int(c.get("num_replicas", 1)) for c in existing.values()), 1)
    for config in configs:
        if config["name"] in existing:
            continue
        wanted = {**config, "num_replicas": create_with}
        other = await _retry(functools.partial(_create, api, wanted), deadline)
        if other is None:
            log.info("created stream %s with %s", config["name"], _replicas(create_with))
        else:  # another node or command created it meanwhile
            _check([config], {config["name"]: other}, replicas)


async def _info(api: JetStreamApi, stream: str) -> dict[str, Any] | None:
    """An existing stream's configuration, or ``None``."""
    try:
        answer = await api.request(f"$JS.API.STREAM.INFO.{stream}")
    except RejectedError as exc:
        if exc.code == STREAM_NOT_FOUND:
            return None
        raise
    config: dict[str, Any] = answer["config"]
    return config


async def _create(api: JetStreamApi, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Create a stream; ``None``, or the configuration of the stream of that
    name that exists already with another one."""
    try:
        await api.request(f"$JS.API.STREAM.CREATE.{config['name']}", config)
    except RejectedError as exc:
        if exc.code != STREAM_NAME_IN_USE:
            raise
        return await _info(api, str(config["name"]))
    return None


async def _retry(call: Callable[[], Awaitable[_T]], deadline: float) -> _T:
    """``await call()``, again while a new cluster's servers are still
    finding each other (until ``deadline``)."""
    while True:
        try:
            return await call()
        except RejectedError as exc:
            if exc.code not in _NOT_YET or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


def _check(
    configs: Sequence[Mapping[str, Any]],
    existing: Mapping[str, Mapping[str, Any]],
    replicas: int | None,
) -> None:
    """Raise :class:`StreamConfigError` if an existing stream differs."""
    message = stream_problems(configs, existing, replicas)
    if message:
        raise StreamConfigError(message)


def stream_problems(
    configs: Sequence[Mapping[str, Any]],
    existing: Mapping[str, Mapping[str, Any]],
    replicas: int | None,
) -> str:
    """What is wrong with the existing streams, and what to do; ``""`` if nothing.

    Args:
        configs: what the backend needs (:func:`stream_configs`).
        existing: the configuration of each stream that exists, by name, as
            JetStream reports it.
        replicas: what the store URL asks for; ``None`` accepts any.
    """
    scaled: dict[str, int] = {}  # stream -> its replicas, where the URL asks for others
    differing: dict[str, list[str]] = {}
    for config in configs:
        found = existing.get(config["name"])
        if found is None:
            continue
        has = int(found.get("num_replicas", 1))
        if replicas is not None and has != replicas:
            scaled[config["name"]] = has
        problems = _differences(config, found)
        if problems:
            differing[config["name"]] = problems
    parts: list[str] = []
    if scaled and replicas is not None:
        parts.append(_replicas_advice(scaled, replicas))
    if differing:
        listed = ", ".join(f"stream {name}: {'; '.join(why)}" for name, why in differing.items())
        parts.append(
            f"existing streams are not configured as ensync needs them ({listed}). ensync"
            " never changes an existing stream: set these back with the NATS CLI"
            f" (nats stream edit {next(iter(differing))} ...), delete the streams if their"
            " data can go, or use another namespace (?namespace=NAME)"
        )
    return "; and ".join(parts)


def _replicas_advice(scaled: Mapping[str, int], asked: int) -> str:
    counts = set(scaled.values())
    if len(scaled) == 1:
        ((name, has),) = scaled.items()
        found = f"stream {name} has {_replicas(has)}"
    elif len(counts) == 1:
        found = f"streams {', '.join(scaled)} have {_replicas(next(iter(counts)))}"
    else:
        found = ", ".join(f"stream {name} has {_replicas(has)}" for name, has in scaled.items())
    keep = (
        f"add ?replicas={next(iter(counts))} to the store URL"
        if len(counts) == 1
        else "leave ?replicas out of the store URL"
    )
    return (
        f"{found}, this store URL asks for {asked}: {keep} (without ?replicas, ensync uses"
        " existing streams as they are). ensync never changes the replicas of an existing"
        " stream; to change them, edit each stream with the NATS CLI"
        f" (nats stream edit {next(iter(scaled))} --replicas {asked})"
    )


def _differences(config: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    subjects = found.get("subjects", ())
    missing = [subject for subject in config["subjects"] if subject not in subjects]
    if missing:
        problems.append(f"subjects lack {', '.join(missing)}")
    for key, value in config.items():
        if key in ("name", "subjects"):
            continue
        has = found.get(key, False if isinstance(value, bool) else None)
        if has != value:
            problems.append(f"{key} is {_show(key, has)}, ensync needs {_show(key, value)}")
    for key, value in _UNLIMITED.items():
        has = found.get(key, value)
        if has != value:
            problems.append(f"{key} is {_show(key, has)}, ensync needs no limit")
    return problems


def _show(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if key in _NANOSECONDS and isinstance(value, int):
        return f"{value / 1e9:g} s"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"
