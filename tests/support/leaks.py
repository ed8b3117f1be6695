"""Never leak secrets: a pytest plugin that greps a whole test run for the keys it used.

DESIGN.md §6 and STYLE.md habit 12 promise that payloads, app keys and secret
keys never appear in logs, error messages or metrics. This plugin checks the
promise against everything a full run does, not only the tests written for it.

For the whole session it

* **captures** every log record of the ``ensync`` loggers at DEBUG and of any
  other logger at INFO or above, formatted with its exception text, noting
  the test that was running (:class:`RecordCollector`);
* **records secrets** the run uses (:class:`SecretBook`): every app
  ``AppRegistry.create`` registers (``TestServer.create_app``, in-process
  engines), every app key and secret key given to ``create_client`` or
  ``subscribe`` (this catches the keys tests got from ``ensync app create`` in
  a subprocess, and the wrong keys they try), and plaintext markers that
  tests publish (:func:`new_marker`);
* **collects other text** to scan: every ``EnSyncError`` and core
  ``ServiceError`` message constructed in this process, the ``*.log`` files a
  test left in its ``tmp_path`` (the engine subprocess logs of tests/faults),
  and whatever a test hands to :func:`record_text` (a ``/metrics`` scrape,
  CLI output);
* **scans** all of it once at the end (:func:`find_leaks`: one pass over the
  text with every secret at once) for each secret, its cheap encodings (the
  Ed25519 seed and the X25519 scalar in base64 and hex, the app key's random
  bytes in hex and standard base64) and any 16-character or longer prefix of
  a key, and fails the run (exit status 1) with a report naming each secret,
  masked, and where it appeared.

Not covered: output of subprocesses that a test reads from a pipe and throws
away (``ensync serve`` stderr in tests/integration/test_cli.py), official
clients' own output (not our code), keys a subprocess creates that no test
ever hands to the SDK, and secrets encoded in ways not listed above.

Tests that want a leak to fail *them* use :func:`capture_logs`,
:func:`needles_for_app` and :func:`assert_no_leaks` directly.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import pytest
from nacl import bindings

from ensync.client.client import EnSyncClient
from ensync.client.engine import BaseEngine
from ensync.client.subscription import Subscription
from ensync.errors import EnSyncError
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.core.errors import ServiceError

__all__ = [
    "MIN_MATCH",
    "Leak",
    "LeakWatch",
    "Needle",
    "RecordCollector",
    "SecretBook",
    "assert_no_leaks",
    "capture_logs",
    "find_leaks",
    "format_leaks",
    "mask",
    "needles_for_app",
    "needles_for_app_key",
    "needles_for_marker",
    "needles_for_secret_key",
    "new_marker",
    "record_app",
    "record_marker",
    "record_text",
    "session_watch",
]

MIN_MATCH = 16
"""Shortest match reported: a secret's first 16 characters, or a whole marker."""

# Every secret and every encoding of one that we look for is made of these
# characters, so a secret can only sit inside a run of them: the scan looks
# at those runs and skips the rest of the text in C.
_TOKEN_RUN = re.compile(rf"[A-Za-z0-9+/=_\-]{{{MIN_MATCH},}}")
_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]+")
_APP_KEY_PREFIX = "ensk_"
_ENSYNC = "ensync"
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_MAX_ERROR_MESSAGES = 200_000
_MAX_FILE_BYTES = 32 * 1024 * 1024
_EXCERPT = 60

_ACTIVE: LeakWatch | None = None


# ---------------------------------------------------------------------------
# What is searched for


@dataclass(frozen=True, slots=True)
class Needle:
    """One string that must not appear.

    Attributes:
        text: the string (base64 without its ``=`` padding, so padded and
            unpadded spellings both match).
        label: what it is, for the report (``"secret key of app 'bob'"``).
        partial: whether a prefix of at least :data:`MIN_MATCH` characters
            counts as a leak (keys and random-first markers: yes).
    """

    text: str
    label: str
    partial: bool = True


def mask(secret: str) -> str:
    """A secret as a report may show it: its first few characters and its length."""
    shown = 8 if secret.startswith(_APP_KEY_PREFIX) else 4
    return f"{secret[:shown]}… ({len(secret)} chars)"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _is_b64_of_32(text: str) -> bool:
    """Whether ``text`` has an app id's form: standard base64 of 32 bytes."""
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def needles_for_app_key(app_key: str, owner: str = "an app") -> list[Needle]:
    """An app key (``ensk_`` + URL-safe base64 of 32 random bytes) and its encodings.

    The ``ensk_`` prefix is public, so only the random part is searched
    (which also finds the key with its prefix).
    """
    label = f"app key of {owner} ({mask(app_key)})"
    token = app_key.removeprefix(_APP_KEY_PREFIX).rstrip("=")
    found = [Needle(token, label)]
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return found
    if len(raw) >= MIN_MATCH:
        found.append(Needle(raw.hex(), f"{label}, random bytes in hex"))
        if _b64(raw) != token:
            found.append(Needle(_b64(raw), f"{label}, in standard base64"))
    return found


def needles_for_secret_key(secret_key: str, owner: str = "an app") -> list[Needle]:
    """A secret key and the forms its secret half takes elsewhere.

    A 64-byte key (seed ‖ public key) also yields the 32-byte seed and the
    X25519 scalar derived from it, each in standard and URL-safe base64 and
    in hex; a 32-byte key is itself an X25519 scalar. The public half is an
    app id, public by design, so it is not searched on its own.
    """
    label = f"secret key of {owner} ({mask(secret_key)})"
    found = [Needle(secret_key.rstrip("="), label)]
    try:
        raw = base64.b64decode(secret_key, validate=True)
    except (binascii.Error, ValueError):
        return found
    forms: list[tuple[str, bytes]] = []
    if len(raw) == 64:
        forms.append(("Ed25519 seed", raw[:32]))
        forms.append(("X25519 scalar", bindings.crypto_sign_ed25519_sk_to_curve25519(raw)))
    elif len(raw) == 32:
        forms.append(("X25519 scalar", raw))
    for what, value in forms:
        found.append(Needle(_b64(value), f"{label}, {what} in base64"))
        found.append(Needle(_b64url(value), f"{label}, {what} in URL-safe base64"))
        found.append(Needle(value.hex(), f"{label}, {what} in hex"))
    return found


def needles_for_marker(marker: str, owner: str = "a test", *, partial: bool = True) -> list[Needle]:
    """A plaintext marker.

    Its first :data:`MIN_MATCH` characters are found alone only with
    ``partial`` (right for :func:`new_marker`'s random-first markers; pass
    ``False`` for a marker whose beginning could be in test source).
    """
    if len(marker) < MIN_MATCH or _TOKEN.fullmatch(marker) is None:
        raise ValueError(
            f"a marker needs {MIN_MATCH}+ characters of [A-Za-z0-9+/=_-], not {marker!r}"
        )
    return [Needle(marker, f"plaintext marker of {owner} ({mask(marker)})", partial)]


def needles_for_app(app: NewApp) -> list[Needle]:
    """Both secrets of a freshly created app."""
    owner = f"app {app.name!r}"
    return needles_for_app_key(app.app_key, owner) + needles_for_secret_key(app.secret_key, owner)


class SecretBook:
    """Every secret the run used, as needles; public app ids are never needles."""

    def __init__(self) -> None:
        self._needles: dict[str, Needle] = {}
        self._public: set[str] = set()

    def __len__(self) -> int:
        return len(self._needles)

    def add(self, needles: Iterable[Needle]) -> None:
        for needle in needles:
            if len(needle.text) >= MIN_MATCH:
                self._needles.setdefault(needle.text, needle)

    def add_app(self, app: NewApp) -> None:
        self._public.add(app.app_id.rstrip("="))
        self.add(needles_for_app(app))

    def add_app_key(self, app_key: object, owner: str) -> None:
        # An app id where a key belongs (a test checking it is refused) does
        # not make the id, or its bytes, a secret.
        if isinstance(app_key, str) and len(app_key) >= MIN_MATCH and not _is_b64_of_32(app_key):
            self.add(needles_for_app_key(app_key, owner))

    def add_secret_key(self, secret_key: object, owner: str) -> None:
        if isinstance(secret_key, str) and len(secret_key) >= MIN_MATCH:
            self.add(needles_for_secret_key(secret_key, owner))

    def needles(self) -> list[Needle]:
        # A test may pass an app id where a key belongs (to see it refused):
        # that does not make the id a secret.
        return [n for text, n in self._needles.items() if text not in self._public]


# ---------------------------------------------------------------------------
# The scan


@dataclass(frozen=True, slots=True)
class Leak:
    """A needle found in a text."""

    needle: Needle
    source: str
    matched: int
    excerpt: str

    def describe(self) -> str:
        whole = len(self.needle.text)
        extent = (
            "in full" if self.matched >= whole else f"its first {self.matched} of {whole} chars"
        )
        return f"{self.needle.label}, {extent}, in {self.source}: {self.excerpt}"


def _common_prefix(text: str, start: int, needle: str) -> int:
    """How many characters of ``needle`` ``text`` holds at ``start`` (the first
    :data:`MIN_MATCH` are known to match)."""
    if text.startswith(needle, start):
        return len(needle)
    limit = min(len(needle), len(text) - start)
    n = MIN_MATCH
    while n < limit and text[start + n] == needle[n]:
        n += 1
    return n


def _excerpt(text: str, start: int, end: int) -> str:
    before = text[max(0, start - _EXCERPT) : start]
    after = text[end : end + _EXCERPT]
    return repr(f"{before}«…»{after}")


def find_leaks(texts: Iterable[tuple[str, str]], needles: Iterable[Needle]) -> list[Leak]:
    """Find every needle in every ``(source, text)``; one report per (source, needle).

    One pass over each text for all needles at once: the needles are indexed
    by their first :data:`MIN_MATCH` characters, and each window of that size
    inside a run of key characters is looked up in the index. Where several
    needles match at one place, the longest match is reported.
    """
    index: dict[str, list[Needle]] = {}
    for needle in needles:
        if len(needle.text) >= MIN_MATCH:
            index.setdefault(needle.text[:MIN_MATCH], []).append(needle)
    leaks: list[Leak] = []
    if not index:
        return leaks
    for source, text in texts:
        reported: set[str] = set()
        for run in _TOKEN_RUN.finditer(text):
            base, token = run.start(), run.group()
            for i in range(len(token) - MIN_MATCH + 1):
                candidates = index.get(token[i : i + MIN_MATCH])
                if candidates is None:
                    continue
                best: tuple[int, Needle] | None = None
                for needle in candidates:
                    matched = _common_prefix(token, i, needle.text)
                    if matched < len(needle.text) and not needle.partial:
                        continue
                    if best is None or matched > best[0]:
                        best = (matched, needle)
                if best is None or best[1].text in reported:
                    continue
                reported.add(best[1].text)
                start = base + i
                leaks.append(Leak(best[1], source, best[0], _excerpt(text, start, start + best[0])))
    return leaks


def format_leaks(leaks: Sequence[Leak], limit: int = 50) -> str:
    """A report of the first ``limit`` of ``leaks``, one per line."""
    lines = [f"  - {leak.describe()}" for leak in leaks[:limit]]
    if len(leaks) > limit:
        lines.append(f"  ... and {len(leaks) - limit} more")
    return "\n".join(lines)


def assert_no_leaks(texts: Iterable[tuple[str, str]], needles: Iterable[Needle]) -> None:
    """Fail with a report if any needle appears in any text."""
    leaks = find_leaks(texts, needles)
    if leaks:
        raise AssertionError(f"{len(leaks)} secret(s) leaked:\n{format_leaks(leaks)}")


# ---------------------------------------------------------------------------
# Log capture


def _wanted(record: logging.LogRecord) -> bool:
    # ensync's own records at every level; other libraries' from INFO up.
    # Their DEBUG records stay off on purpose: websockets' DEBUG records dump
    # every frame, which holds whatever the peer sent (CONN lines with app
    # keys, ciphertext). A library user who turns those on chooses to log
    # frames; that is not ensync leaking.
    name = record.name
    return record.levelno >= logging.INFO or name == _ENSYNC or name.startswith(_ENSYNC + ".")


class RecordCollector(logging.Handler):
    """Keeps each wanted record as ``(test, logger, level, formatted text)``.

    Records are formatted when they arrive (with their exception text), so
    nothing keeps tracebacks, and the arguments they reference, alive.
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(_LOG_FORMAT))
        self.records: list[tuple[str, str, str, str]] = []
        self.current_test = "(outside any test)"

    def emit(self, record: logging.LogRecord) -> None:
        if not _wanted(record):
            return
        try:
            text = self.format(record)
        # Isolation boundary, as in logging.Handler.emit: a malformed record
        # (any exception from its arguments) is reported, and logging goes on.
        except Exception:  # noqa: BLE001
            self.handleError(record)
            return
        self.records.append((self.current_test, record.name, record.levelname, text))

    def texts(self) -> Iterator[tuple[str, str]]:
        for test, name, level, text in self.records:
            yield f"log record {name} {level} during {test}", text

    def text(self) -> str:
        return "\n".join(text for _, _, _, text in self.records)


@contextlib.contextmanager
def capture_logs() -> Iterator[RecordCollector]:
    """Collect records (ensync at DEBUG, others at INFO+) while the block runs.

    For a test that checks its own logs: ``with capture_logs() as logs: ...``
    then ``assert_no_leaks([("logs", logs.text())], needles)``.
    """
    collector = RecordCollector()
    root, ensync = logging.getLogger(), logging.getLogger(_ENSYNC)
    levels = root.level, ensync.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    ensync.setLevel(logging.DEBUG)
    root.addHandler(collector)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
        root.setLevel(levels[0])
        ensync.setLevel(levels[1])


# ---------------------------------------------------------------------------
# The session plugin


class _Messaged(Protocol):
    message: str


def _recording_init(original: Callable[..., None], seen: Callable[[object], None]) -> Any:
    @functools.wraps(original)
    def init(self: _Messaged, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        seen(getattr(self, "message", None))

    return init


class LeakWatch:
    """The session plugin: captures, records, scans; see the module docstring."""

    def __init__(self) -> None:
        self.book = SecretBook()
        self.collector = RecordCollector()
        self.error_messages: dict[str, str] = {}
        self.texts: list[tuple[str, str]] = []
        self.files = 0
        self.leaks: list[Leak] = []
        self._patches = pytest.MonkeyPatch()
        self._levels: tuple[int, int] | None = None

    # -- recording

    def error_message(self, message: object) -> None:
        if (
            isinstance(message, str)
            and len(message) >= MIN_MATCH
            and len(self.error_messages) < _MAX_ERROR_MESSAGES
        ):
            self.error_messages.setdefault(message, self.collector.current_test)

    def record_text(self, source: str, text: str) -> None:
        self.texts.append((f"{source} during {self.collector.current_test}", text))

    def _collect_log_files(self, item: pytest.Item) -> None:
        funcargs: dict[str, object] = getattr(item, "funcargs", {})
        tmp = funcargs.get("tmp_path")
        if not isinstance(tmp, Path) or not tmp.is_dir():
            return
        for path in sorted(tmp.rglob("*.log")):
            try:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    continue
                text = path.read_text(errors="replace")
            except OSError:
                continue
            self.files += 1
            self.texts.append((f"file {path.name} of {item.nodeid}", text))

    # -- lifecycle

    def start(self) -> None:
        book, patches = self.book, self._patches

        original_create = AppRegistry.create

        @functools.wraps(original_create)
        async def create(self: AppRegistry, name: str) -> NewApp:
            app = await original_create(self, name)
            book.add_app(app)
            return app

        original_connect = BaseEngine.create_client

        @functools.wraps(original_connect)
        async def create_client(
            self: BaseEngine, app_key: str, *, app_secret_key: str | None = None
        ) -> EnSyncClient:
            book.add_app_key(app_key, "a create_client caller")
            book.add_secret_key(app_secret_key, "a create_client caller")
            return await original_connect(self, app_key, app_secret_key=app_secret_key)

        original_subscribe = EnSyncClient.subscribe

        @functools.wraps(original_subscribe)
        async def subscribe(
            self: EnSyncClient,
            message_name: str,
            *,
            auto_ack: bool = True,
            app_secret_key: str | None = None,
            model: type[Any] | None = None,
        ) -> Subscription:
            book.add_secret_key(app_secret_key, "a subscribe caller")
            return await original_subscribe(
                self, message_name, auto_ack=auto_ack, app_secret_key=app_secret_key, model=model
            )

        patches.setattr(AppRegistry, "create", create)
        patches.setattr(BaseEngine, "create_client", create_client)
        patches.setattr(EnSyncClient, "subscribe", subscribe)
        for error in (EnSyncError, ServiceError):
            patches.setattr(error, "__init__", _recording_init(error.__init__, self.error_message))
        root = logging.getLogger()
        self._levels = root.level, logging.getLogger(_ENSYNC).level
        self._ensure_logging()

    def _ensure_logging(self) -> None:
        """(Re)install the handler and levels: a test may have changed them."""
        root = logging.getLogger()
        if self.collector not in root.handlers:
            root.addHandler(self.collector)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        logging.getLogger(_ENSYNC).setLevel(logging.DEBUG)

    def stop(self) -> None:
        self._patches.undo()
        root = logging.getLogger()
        root.removeHandler(self.collector)
        if self._levels is not None:
            root.setLevel(self._levels[0])
            logging.getLogger(_ENSYNC).setLevel(self._levels[1])

    def scan(self) -> list[Leak]:
        errors = (
            (f"EnSyncError/ServiceError message first made during {test}", message)
            for message, test in self.error_messages.items()
        )
        self.leaks = find_leaks(
            [*self.collector.texts(), *errors, *self.texts], self.book.needles()
        )
        return self.leaks

    # -- hooks

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.collector.current_test = nodeid

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self) -> None:
        self._ensure_logging()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        # Before the fixtures are torn down: a tmp_path that pytest's
        # retention policy removes is still there.
        self._collect_log_files(item)
        return (yield)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self) -> None:
        self.collector.current_test = "(between tests)"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # trylast: after session-scoped fixtures were torn down and logged.
        if not self.scan():
            return
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if isinstance(reporter, pytest.TerminalReporter):
            # Counted in the final "N passed, ..." line, which then is not
            # green. Plain objects with a __dict__: other plugins read
            # reports' __dict__ (hypothesis does).
            reporter.stats["secret leak(s)"] = [SimpleNamespace(leak=leak) for leak in self.leaks]

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        scanned = (
            f"{len(self.collector.records)} log records, {len(self.error_messages)} error "
            f"messages, {self.files} log files, {len(self.texts) - self.files} other texts; "
            f"{len(self.book.needles())} secret forms"
        )
        if not self.leaks:
            if terminalreporter.verbosity >= 0:
                terminalreporter.write_line(f"secret-leak scan: {scanned}: no leaks")
            return
        terminalreporter.write_sep("=", "secret leaks", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(self.leaks)} secret(s) appeared where they must not ({scanned}); the run fails:"
        )
        terminalreporter.write_line(format_leaks(self.leaks))


def pytest_configure(config: pytest.Config) -> None:
    global _ACTIVE
    watch = LeakWatch()
    watch.start()
    config.pluginmanager.register(watch, "ensync-leak-watch")
    _ACTIVE = watch


def pytest_unconfigure(config: pytest.Config) -> None:
    global _ACTIVE
    watch = config.pluginmanager.get_plugin("ensync-leak-watch")
    if isinstance(watch, LeakWatch):
        watch.stop()
        config.pluginmanager.unregister(watch)
    _ACTIVE = None


# ---------------------------------------------------------------------------
# For tests


def new_marker(label: str = "marker") -> str:
    """A distinctive random plaintext string, recorded for the session scan.

    The random part comes first, so that no prefix of it is in test source.
    """
    marker = f"{secrets.token_hex(12)}-{label}"
    record_marker(marker, f"the {label!r} test")
    return marker


def record_marker(marker: str, owner: str = "a test", *, partial: bool = True) -> None:
    """Make the session scan look for ``marker`` (a plaintext that was published)."""
    needles = needles_for_marker(marker, owner, partial=partial)
    if _ACTIVE is not None:
        _ACTIVE.book.add(needles)


def record_app(app: NewApp) -> None:
    """Make the session scan look for an app's keys (e.g. ``ensync app create`` output)."""
    if _ACTIVE is not None:
        _ACTIVE.book.add_app(app)


def record_text(source: str, text: str) -> None:
    """Have the session scan look through ``text`` (a metrics scrape, CLI output)."""
    if _ACTIVE is not None:
        _ACTIVE.record_text(source, text)


def session_watch() -> LeakWatch | None:
    """The running session's plugin, if the plugin is active."""
    return _ACTIVE
