"""libsodium called with the GIL held (ensync.crypto._sodium): same bytes as PyNaCl, no stalls.

The envelope code must never let go of the GIL on a message's way: beside a
CPU-bound thread, taking it back waits for that thread's switch interval
(docs/performance.md, "Threads in your application"). These tests show that
it does not (with PyNaCl it does), that both bindings make and open the same
bytes, and that bad input fails the same way in both.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import nacl.bindings
import pytest
from nacl import _sodium as nacl_sodium
from nacl import exceptions as nacl_exceptions

from ensync.bench.threads import gil_handoffs
from ensync.crypto import (
    Sealer,
    _sodium,
    keypair_from_seed,
    open_payload,
    seal,
    seal_hybrid,
    x25519_public,
    x25519_secret,
)
from ensync.crypto._base64 import b64decode, b64encode

__all__: list[str] = []

BOB = keypair_from_seed(bytes([31]) * 32)
CAROL = keypair_from_seed(bytes([32]) * 32)
KILOBYTE = b'{"text":"' + b"x" * 1013 + b'"}'
SIZES = [0, 1, 1024, _sodium.HOLD_GIL_UP_TO, _sodium.HOLD_GIL_UP_TO + 1]

pytestmark = pytest.mark.skipif(
    _sodium.GIL_KEEPING is None and sys.platform == "win32",
    reason="Windows builds of PyNaCl do not export libsodium; ensync uses PyNaCl there",
)


def gil_keeping() -> _sodium.GilKeepingBindings:
    assert _sodium.GIL_KEEPING is not None, "libsodium could not be loaded through PyDLL"
    return _sodium.GIL_KEEPING


@pytest.fixture
def both() -> tuple[_sodium.Bindings, _sodium.Bindings]:
    return gil_keeping(), _sodium.PYNACL


# -- loading ---------------------------------------------------------------


def test_the_crypto_package_calls_pynacls_libsodium_with_the_gil_held() -> None:
    binding = gil_keeping()
    assert _sodium.bindings is binding
    assert binding.path == nacl_sodium.__file__


def test_a_library_without_libsodium_is_refused() -> None:
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to try")
    with pytest.raises(OSError, match="does not export libsodium"):
        _sodium.GilKeepingBindings(libc)
    with pytest.raises(OSError):
        _sodium.GilKeepingBindings("/nonexistent/libsodium.so")


def test_pynacl_is_the_fallback_with_one_debug_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unloadable(path: str) -> _sodium.GilKeepingBindings:
        raise OSError(f"{path}: no symbols")

    monkeypatch.setattr(_sodium, "GilKeepingBindings", unloadable)
    with caplog.at_level(logging.DEBUG, logger=_sodium.__name__):
        assert _sodium.load_gil_keeping() is None
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert "no symbols" in caplog.records[0].getMessage()


def test_using_switches_the_binding_for_a_block_only() -> None:
    before = _sodium.bindings
    with _sodium.using(_sodium.PYNACL):
        assert _sodium.bindings is _sodium.PYNACL
    assert _sodium.bindings is before


# -- the same bytes ----------------------------------------------------------


def test_deterministic_functions_give_pynacls_bytes(
    both: tuple[_sodium.Bindings, _sodium.Bindings],
) -> None:
    mine, theirs = both
    seed = bytes(range(32))
    nonce = bytes(range(24))
    ed_public, ed_secret = theirs.crypto_sign_seed_keypair(seed)
    assert mine.crypto_sign_seed_keypair(seed) == (ed_public, ed_secret)
    calls: list[Callable[[_sodium.Bindings], bytes]] = [
        lambda b: b.crypto_sign_ed25519_pk_to_curve25519(ed_public),
        lambda b: b.crypto_sign_ed25519_sk_to_curve25519(ed_secret),
        lambda b: b.crypto_scalarmult_base(seed),
        lambda b: b.crypto_box_beforenm(x25519_public(BOB.app_id), seed),
        lambda b: b.crypto_box_easy(KILOBYTE, nonce, x25519_public(BOB.app_id), seed),
        lambda b: b.crypto_box_easy_afternm(KILOBYTE, nonce, seed),
        lambda b: b.crypto_secretbox_easy(KILOBYTE, nonce, seed),
    ]
    for call in calls:
        assert call(mine) == call(theirs)


def test_random_key_pairs_are_real_key_pairs(
    both: tuple[_sodium.Bindings, _sodium.Bindings],
) -> None:
    mine, theirs = both
    public, secret = mine.crypto_box_keypair()
    assert theirs.crypto_scalarmult_base(secret) == public
    ed_public, ed_secret = mine.crypto_sign_keypair()
    assert theirs.crypto_sign_seed_keypair(ed_secret[:32]) == (ed_public, ed_secret)
    assert len({mine.randombytes(24) for _ in range(100)}) == 100
    assert len(mine.randombytes(0)) == 0


@pytest.mark.parametrize("size", SIZES)
def test_each_binding_opens_what_the_other_sealed(
    size: int, both: tuple[_sodium.Bindings, _sodium.Bindings]
) -> None:
    message = os.urandom(size)
    nonce, key = os.urandom(24), os.urandom(32)
    for sealer, opener in (both, both[::-1]):
        boxed = sealer.crypto_box_easy_afternm(message, nonce, key)
        assert opener.crypto_box_open_easy_afternm(boxed, nonce, key) == message
        secret = sealer.crypto_secretbox_easy(message, nonce, key)
        assert opener.crypto_secretbox_open_easy(secret, nonce, key) == message


@pytest.mark.parametrize("size", SIZES)
def test_envelopes_sealed_through_one_binding_open_through_the_other(size: int) -> None:
    message = os.urandom(size)
    for sealing, opening in ((gil_keeping(), _sodium.PYNACL), (_sodium.PYNACL, gil_keeping())):
        with _sodium.using(sealing):
            wires = [
                seal(message, BOB.app_id),
                Sealer(reuse_ms=60_000).seal(message, BOB.app_id, 0),
                seal_hybrid(message, [CAROL.app_id, BOB.app_id]),
            ]
        with _sodium.using(opening):
            assert [open_payload(wire, BOB.secret_key) for wire in wires] == [message] * 3
            assert open_payload(wires[2], CAROL.secret_key) == message


# -- the same failures -------------------------------------------------------

KEY = bytes(32)
NONCE = bytes(24)
SMALL_ORDER_POINT = bytes(32)  # the identity: libsodium refuses a shared key with it
FAILURES: dict[str, Callable[[_sodium.Bindings], object]] = {
    "short public key": lambda b: b.crypto_box_beforenm(bytes(31), KEY),
    "long secret key": lambda b: b.crypto_box_beforenm(KEY, bytes(33)),
    "small-order point": lambda b: b.crypto_box_beforenm(SMALL_ORDER_POINT, bytes(range(32))),
    "box: short nonce": lambda b: b.crypto_box_easy(b"", bytes(23), KEY, KEY),
    "box: short key": lambda b: b.crypto_box_easy(b"", NONCE, KEY, bytes(31)),
    "afternm: long nonce": lambda b: b.crypto_box_easy_afternm(b"", bytes(25), KEY),
    "afternm: short key": lambda b: b.crypto_box_easy_afternm(b"", NONCE, bytes(16)),
    "open afternm: shorter than a tag": lambda b: b.crypto_box_open_easy_afternm(
        bytes(15), NONCE, KEY
    ),
    "open afternm: forged": lambda b: b.crypto_box_open_easy_afternm(bytes(40), NONCE, KEY),
    "open afternm: short nonce": lambda b: b.crypto_box_open_easy_afternm(bytes(40), b"", KEY),
    "secretbox: short key": lambda b: b.crypto_secretbox_easy(b"", NONCE, bytes(31)),
    "open secretbox: shorter than a tag": lambda b: b.crypto_secretbox_open_easy(b"", NONCE, KEY),
    "open secretbox: forged": lambda b: b.crypto_secretbox_open_easy(bytes(16), NONCE, KEY),
    "seed of 31 bytes": lambda b: b.crypto_sign_seed_keypair(bytes(31)),
    "ed25519 public key of 33 bytes": lambda b: b.crypto_sign_ed25519_pk_to_curve25519(bytes(33)),
    "ed25519 public key off the curve": lambda b: b.crypto_sign_ed25519_pk_to_curve25519(
        b"\x02" + bytes(31)
    ),
    "ed25519 secret key of 32 bytes": lambda b: b.crypto_sign_ed25519_sk_to_curve25519(KEY),
}


@pytest.mark.parametrize("case", FAILURES)
def test_bad_input_fails_as_in_pynacl(
    case: str, both: tuple[_sodium.Bindings, _sodium.Bindings]
) -> None:
    raised: list[type[BaseException]] = []
    for binding in both:
        with pytest.raises(nacl_exceptions.CryptoError) as caught:
            FAILURES[case](binding)
        raised.append(type(caught.value))
    assert raised[0] is raised[1], case


def test_a_scalar_of_the_wrong_length_never_reaches_libsodium() -> None:
    # PyNaCl passes it on (libsodium would read 32 bytes); this binding refuses.
    with pytest.raises(nacl_exceptions.ValueError):
        gil_keeping().crypto_scalarmult_base(bytes(31))


# -- no stall ----------------------------------------------------------------


def hot_paths() -> dict[str, Callable[[], object]]:
    sealer = Sealer(reuse_ms=60_000)
    single = seal(KILOBYTE, BOB.app_id)
    reused = sealer.seal(KILOBYTE, BOB.app_id, 0)
    hybrid = seal_hybrid(KILOBYTE, [CAROL.app_id, BOB.app_id])
    x25519_secret(BOB.secret_key)
    return {
        "seal": lambda: seal(KILOBYTE, BOB.app_id),
        "Sealer, cached key": lambda: sealer.seal(KILOBYTE, BOB.app_id, 0),
        "Sealer, new key": lambda: Sealer(reuse_ms=60_000).seal(KILOBYTE, BOB.app_id, 0),
        "seal_hybrid": lambda: seal_hybrid(KILOBYTE, [CAROL.app_id, BOB.app_id]),
        "open": lambda: open_payload(single, BOB.secret_key),
        "open, cached key": lambda: open_payload(reused, BOB.secret_key),
        "open hybrid": lambda: open_payload(hybrid, BOB.secret_key),
        "base64": lambda: b64decode(b64encode(KILOBYTE)),
    }


@pytest.mark.parametrize("path", list(hot_paths()))
def test_sealing_and_opening_never_let_go_of_the_gil(path: str) -> None:
    call = hot_paths()[path]
    call()
    # 2,000 calls: more than one refill of the nonce buffer (~170 nonces).
    assert gil_handoffs(call, 2_000) == 0


def test_the_check_sees_pynacl_let_go_of_the_gil() -> None:
    with _sodium.using(_sodium.PYNACL):
        assert gil_handoffs(lambda: seal(KILOBYTE, BOB.app_id), 500) > 0


def test_a_seal_beside_a_busy_thread_does_not_wait_for_its_switch_interval() -> None:
    # A seal that lets go of the GIL waits, if the busy thread took it, until
    # that thread's switch interval ends. A fresh-key seal spends ~50 µs in
    # libsodium, long enough for the busy thread to take the GIL: through
    # PyNaCl ~2 % of seals wait. A 100 ms interval sets such a wait far apart
    # from the machine's own noise (a loaded 2-core machine preempts this
    # thread for a few ms at a time), and makes scheduled switches, which
    # delay the seal they fall in whatever the binding, a handful per run.
    calls = 2_000
    interval_s = 0.1
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            for _ in range(1_000):
                pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        clock = time.perf_counter_ns
        took: list[int] = []
        for _ in range(calls):
            start = clock()
            seal(KILOBYTE, BOB.app_id)
            took.append(clock() - start)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    took.sort()
    p99_ms = took[int(0.99 * calls)] / 1e6
    waited = sum(1 for ns in took if ns > interval_s * 1e9 / 2)
    assert p99_ms < interval_s * 1e3 / 4, (
        f"p99 {p99_ms:,.1f} ms; {waited} of {calls} seals took over half the switch interval"
    )


def test_every_binding_method_is_in_the_protocol() -> None:
    names = {name for name in dir(_sodium.Bindings) if name.startswith(("crypto_", "random"))}
    mine = {name for name in dir(_sodium.GilKeepingBindings) if not name.startswith("_")}
    assert names <= mine
    assert all(callable(getattr(nacl.bindings, name)) for name in names)
