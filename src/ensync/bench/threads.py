"""``ensync bench --threads``: sealing and opening beside a busy Python thread.

An application may run CPU-bound Python threads beside the SDK. PyNaCl
releases the GIL around every libsodium call, and taking it back waits for
such a thread's switch interval (5 ms); ensync's crypto calls libsodium with
the GIL held instead (:mod:`ensync.crypto._sodium`). This program shows the
difference, in this process, no engine involved.

Five operations on one ``--payload-bytes`` message (1 KB): the bare NaCl
call, then four through the SDK's public crypto functions (nonce, base64 and
JSON included):

* box only, cached key: ``crypto_box_easy_afternm`` alone;
* seal, cached key: :class:`~ensync.crypto.Sealer` reusing its key pair
  (one XSalsa20-Poly1305 pass);
* seal, fresh key: :func:`~ensync.crypto.seal` (a new key pair and a shared
  key: two X25519 operations);
* open, cached key: :func:`~ensync.crypto.open_payload` of envelopes from a
  reusing sender (the shared key is cached);
* open, fresh key: the same of envelopes with a key pair each (one X25519
  operation).

Each is timed ``--messages`` times (2,000) alone and again beside one thread
running Python in a loop that never waits, for the GIL-keeping binding and
for plain PyNaCl, in blocks of 250 calls that take turns so that drift in the
machine touches both alike. Figures: median and p99 in µs, and how many calls
took over 1 ms. What remains beside a busy thread with the GIL kept is the
ordinary switch interval: every 5 ms the busy thread gets the GIL for 5 ms,
and a call that straddles the hand-over waits for it, whatever it calls; and
on a loaded machine, the operating system's own preemptions.

A last column counts, apart from any timing, how often the calls let another
thread take the GIL: with a switch interval far longer than the run, a thread
that only waits for the GIL and gives it straight back counts each time it
got it. Zero means the calls never let go of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, TextIO

from ensync.bench.display import Progress, print_rows

# _sodium is private: which libsodium binding the crypto package calls is no
# public matter, but comparing both is this program's point.
from ensync.crypto import Sealer, _sodium, generate_keypair, open_payload, seal

__all__ = [
    "BLOCK",
    "DEFAULT_CALLS",
    "OperationFigures",
    "ThreadsResult",
    "gil_handoffs",
    "measure",
    "print_table",
    "run",
]

DEFAULT_CALLS = 2_000
BLOCK = 250
"""Calls timed in a row before the other binding takes its turn."""

Binding = Literal["gil-keeping", "pynacl"]
OPERATIONS = (
    "box only, cached key",
    "seal, cached key",
    "seal, fresh key",
    "open, cached key",
    "open, fresh key",
)
BINDING_LABELS: dict[Binding, str] = {
    "gil-keeping": "ensync (GIL kept)",
    "pynacl": "PyNaCl (GIL released)",
}


@dataclass(frozen=True, slots=True)
class Timing:
    """Calls of one operation, alone or beside a busy thread: µs per call."""

    p50_us: float
    p99_us: float
    max_us: float
    over_1ms: int


@dataclass(frozen=True, slots=True)
class OperationFigures:
    """One operation through one binding."""

    operation: str
    binding: Binding
    calls: int
    alone: Timing
    busy_thread: Timing
    gil_handoffs: int


@dataclass(frozen=True, slots=True)
class ThreadsResult:
    """Every operation through every binding that loads here."""

    payload_bytes: int
    calls: int
    switch_interval_ms: float
    library: str | None
    figures: list[OperationFigures]


def run(args: argparse.Namespace) -> int:
    """Time the operations, print the figures; returns the exit code."""
    result = measure(calls=args.messages, payload_bytes=args.payload_bytes)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print_table(result, sys.stdout)
    return 0


def measure(*, calls: int, payload_bytes: int, progress: Progress | None = None) -> ThreadsResult:
    """Time every operation ``calls`` times per binding, alone and beside a busy thread."""
    progress = progress if progress is not None else Progress()
    bindings: dict[Binding, _sodium.Bindings] = {}
    if _sodium.GIL_KEEPING is not None:
        bindings["gil-keeping"] = _sodium.GIL_KEEPING
    bindings["pynacl"] = _sodium.PYNACL
    message = _payload(payload_bytes)
    timings: dict[tuple[str, bool], dict[Binding, Timing]] = {}
    for busy in (False, True):
        with _busy_thread(busy):
            for operation in OPERATIONS:
                progress.show(f"{operation}{', beside a busy thread' if busy else ''}", force=True)
                samples = _take_turns(bindings, operation, message, calls)
                timings[operation, busy] = {b: _timing(s) for b, s in samples.items()}
    figures: list[OperationFigures] = []
    for operation in OPERATIONS:
        progress.show(f"{operation}: does it let go of the GIL?", force=True)
        for binding, chosen in bindings.items():
            with _sodium.using(chosen):
                handoffs = gil_handoffs(_operation(operation, message, calls), calls)
            figures.append(
                OperationFigures(
                    operation=operation,
                    binding=binding,
                    calls=calls,
                    alone=timings[operation, False][binding],
                    busy_thread=timings[operation, True][binding],
                    gil_handoffs=handoffs,
                )
            )
    progress.finish()
    return ThreadsResult(
        payload_bytes=payload_bytes,
        calls=calls,
        switch_interval_ms=sys.getswitchinterval() * 1e3,
        library=_sodium.GIL_KEEPING.path if _sodium.GIL_KEEPING is not None else None,
        figures=figures,
    )


def print_table(result: ThreadsResult, out: TextIO) -> None:
    """The figures as a table: per operation, one row per binding."""
    out.write(
        f"{result.payload_bytes:,}-byte messages, {result.calls:,} calls per figure,"
        f" switch interval {result.switch_interval_ms:g} ms\n"
    )
    if result.library is None:
        out.write("libsodium cannot be called with the GIL held here: PyNaCl only\n")
    out.write("\n")
    rows: list[tuple[str, str]] = [
        ("µs per call", f"{'alone':^17}   {'beside a busy thread':^26}   {'GIL':>8}"),
        (" ", f"{'p50':>8} {'p99':>8}   {'p50':>8} {'p99':>8} {'> 1 ms':>8}   {'let go':>8}"),
    ]
    for operation in OPERATIONS:
        rows.append((operation, ""))
        for figures in result.figures:
            if figures.operation != operation:
                continue
            alone, busy = figures.alone, figures.busy_thread
            rows.append(
                (
                    f"  {BINDING_LABELS[figures.binding]}",
                    f"{alone.p50_us:>8,.1f} {alone.p99_us:>8,.1f}   {busy.p50_us:>8,.1f}"
                    f" {busy.p99_us:>8,.1f} {busy.over_1ms:>8,}   {figures.gil_handoffs:>8,}",
                )
            )
    print_rows(rows, out)


def gil_handoffs(call: Callable[[], object], calls: int) -> int:
    """How often another thread took the GIL while ``call`` ran ``calls`` times.

    The switch interval is raised far beyond the run, so this thread keeps
    the GIL unless a call lets go of it; the other thread, always waiting
    for the GIL, counts once each time it gets it and gives it straight back.
    """
    count = [0]
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)  # lets go of the GIL at once

    interval = sys.getswitchinterval()
    thread = threading.Thread(target=other, name="gil-probe", daemon=True)
    thread.start()
    try:
        sys.setswitchinterval(100.0)
        # The other thread's waits begun under the old interval end here.
        time.sleep(0.01)
        time.sleep(0.01)
        before = count[0]
        for _ in range(calls):
            call()
        return count[0] - before
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        thread.join()


# ---------------------------------------------------------------- measuring


def _payload(size: int) -> bytes:
    # A JSON object of about ``size`` bytes, as the SDK seals them.
    filler = max(0, size - len('{"text":""}'))
    return b'{"text":"' + b"x" * filler + b'"}'


def _spin(stop: threading.Event) -> None:
    # Python bytecode without a pause, as a CPU-bound application thread runs.
    while not stop.is_set():
        for _ in range(1_000):
            pass


@contextlib.contextmanager
def _busy_thread(wanted: bool) -> Iterator[None]:
    if not wanted:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_spin, args=(stop,), name="busy", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _take_turns(
    bindings: dict[Binding, _sodium.Bindings], operation: str, message: bytes, calls: int
) -> dict[Binding, list[int]]:
    samples: dict[Binding, list[int]] = {binding: [] for binding in bindings}
    while any(len(taken) < calls for taken in samples.values()):
        for binding, chosen in bindings.items():
            count = min(BLOCK, calls - len(samples[binding]))
            if count <= 0:
                continue
            with _sodium.using(chosen):
                call = _operation(operation, message, count)
                samples[binding].extend(_time_calls(call, count))
    return samples


def _operation(operation: str, message: bytes, count: int) -> Callable[[], object]:
    """A call doing ``operation`` once, ``count`` times at most; keys are
    made and caches warmed here, outside the timing."""
    recipient = generate_keypair()
    if operation == "box only, cached key":
        nonce, key = os.urandom(24), os.urandom(32)
        return lambda: _sodium.bindings.crypto_box_easy_afternm(message, nonce, key)
    if operation == "seal, cached key":
        sealer = Sealer(reuse_ms=1 << 40)
        sealer.seal(message, recipient.app_id, 0)
        return lambda: sealer.seal(message, recipient.app_id, 0)
    if operation == "seal, fresh key":
        seal(message, recipient.app_id)
        return lambda: seal(message, recipient.app_id)
    if operation == "open, cached key":
        wire = Sealer(reuse_ms=1 << 40).seal(message, recipient.app_id, 0)
        open_payload(wire, recipient.secret_key)
        return lambda: open_payload(wire, recipient.secret_key)
    # open, fresh key: a new recipient, and every envelope its own key pair,
    # so that each open computes its shared key.
    wires = iter([seal(message, recipient.app_id) for _ in range(count)])
    open_payload(seal(message, recipient.app_id), recipient.secret_key)
    return lambda: open_payload(next(wires), recipient.secret_key)


def _time_calls(call: Callable[[], object], count: int) -> Iterator[int]:
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        call()
        yield clock() - start


def _timing(samples: Sequence[int]) -> Timing:
    ordered = sorted(samples)
    # p99 by nearest rank: the value below which 99 % of the calls fall.
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return Timing(
        p50_us=round(statistics.median(ordered) / 1e3, 2),
        p99_us=round(p99 / 1e3, 2),
        max_us=round(ordered[-1] / 1e3, 2),
        over_1ms=sum(1 for ns in ordered if ns > 1_000_000),
    )
