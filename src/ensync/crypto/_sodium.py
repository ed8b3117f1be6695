"""The libsodium calls of ensync's envelopes, made without letting go of the GIL.

Why: PyNaCl calls libsodium through cffi, which releases the GIL around every
call. A call takes microseconds, but taking the GIL back afterwards waits for
whichever Python thread took it meanwhile, up to that thread's switch
interval (5 ms): beside one CPU-bound thread, sealing a message could take
milliseconds instead of microseconds (docs/performance.md, "Threads in your
application"). :class:`ctypes.PyDLL` calls a C function with the GIL held. A
call here is short (the longest, an X25519 operation, ~25 µs), so holding the
GIL through it costs other threads no more than as much Python code would.

How: PyNaCl's extension module links libsodium in and exports its symbols, so
:class:`GilKeepingBindings` loads that very file: the library PyNaCl uses,
initialised by ``import nacl.bindings`` (``sodium_init`` is called again here;
it is idempotent). Its methods have the names, arguments, results and
exceptions of their :mod:`nacl.bindings` namesakes (the subset ensync uses),
so either stands for the other. Where that file does not export libsodium
(Windows DLLs export only what they declare), :data:`bindings` is
:mod:`nacl.bindings` itself: the same bytes, with the GIL released.

Safety: ctypes checks no sizes, so every length is checked before the call,
as :mod:`nacl.bindings` checks it; a wrong one raises
:class:`nacl.exceptions.ValueError` and never reaches libsodium. Inputs longer
than :data:`HOLD_GIL_UP_TO` go through PyNaCl: their call runs long enough
that letting other threads run beside it is worth the wait to get the GIL back.

Callers look up :data:`bindings` on every call; tests and ``ensync bench
--threads`` swap it with :func:`using`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

import nacl.bindings
from nacl import exceptions as exc

__all__ = [
    "GIL_KEEPING",
    "HOLD_GIL_UP_TO",
    "PYNACL",
    "Bindings",
    "GilKeepingBindings",
    "bindings",
    "load_gil_keeping",
    "using",
]

_log = logging.getLogger(__name__)

HOLD_GIL_UP_TO = 1024 * 1024
"""Longest input, in bytes, sealed or opened with the GIL held: the engine's
default payload limit. A MiB takes ~1.5 ms here; the base64 of the same bytes
holds the GIL as long."""

_KEY = 32  # X25519 keys, shared keys, secretbox keys, Ed25519 public keys and seeds
_SIGN_SECRET = 64  # Ed25519 secret key: seed ‖ public key
_NONCE = 24
_MAC = 16


class Bindings(Protocol):
    """The :mod:`nacl.bindings` functions ensync uses, as it calls them."""

    def crypto_box_keypair(self) -> tuple[bytes, bytes]: ...
    def crypto_box_beforenm(self, pk: bytes, sk: bytes, /) -> bytes: ...
    def crypto_box_easy(self, message: bytes, nonce: bytes, pk: bytes, sk: bytes, /) -> bytes: ...
    def crypto_box_easy_afternm(self, message: bytes, nonce: bytes, k: bytes, /) -> bytes: ...
    def crypto_box_open_easy_afternm(
        self, ciphertext: bytes, nonce: bytes, k: bytes, /
    ) -> bytes: ...
    def crypto_secretbox_easy(self, message: bytes, nonce: bytes, key: bytes, /) -> bytes: ...
    def crypto_secretbox_open_easy(
        self, ciphertext: bytes, nonce: bytes, key: bytes, /
    ) -> bytes: ...
    def crypto_scalarmult_base(self, n: bytes, /) -> bytes: ...
    def crypto_sign_keypair(self) -> tuple[bytes, bytes]: ...
    def crypto_sign_seed_keypair(self, seed: bytes, /) -> tuple[bytes, bytes]: ...
    def crypto_sign_ed25519_pk_to_curve25519(self, public_key_bytes: bytes, /) -> bytes: ...
    def crypto_sign_ed25519_sk_to_curve25519(self, secret_key_bytes: bytes, /) -> bytes: ...
    def randombytes(self, size: int, /) -> bytes: ...


# Argument types: c_char_p takes a bytes object's own buffer (no copy) and an
# output array; lengths are unsigned long long (crypto_box, crypto_secretbox)
# or size_t (randombytes_buf), as libsodium declares them.
_P = ctypes.c_char_p
_ULL = ctypes.c_ulonglong


class GilKeepingBindings:
    """:mod:`nacl.bindings`' functions, calling libsodium with the GIL held.

    Args:
        path: a shared object exporting libsodium (PyNaCl's extension module).

    Raises:
        OSError: the file cannot be loaded, lacks a function, or
            ``sodium_init`` failed.
    """

    def __init__(self, path: str) -> None:
        lib = ctypes.PyDLL(path)
        try:
            functions = {name: getattr(lib, name) for name in _PROTOTYPES}
        except AttributeError as error:
            raise OSError(f"{path} does not export libsodium: {error}") from None
        for name, (argtypes, restype) in _PROTOTYPES.items():
            functions[name].argtypes = argtypes
            functions[name].restype = restype
        if functions["sodium_init"]() < 0:
            raise OSError("sodium_init failed")
        self.path = path
        self._box_keypair = functions["crypto_box_keypair"]
        self._box_beforenm = functions["crypto_box_beforenm"]
        self._box_easy = functions["crypto_box_easy"]
        self._box_easy_afternm = functions["crypto_box_easy_afternm"]
        self._box_open_easy_afternm = functions["crypto_box_open_easy_afternm"]
        self._secretbox_easy = functions["crypto_secretbox_easy"]
        self._secretbox_open_easy = functions["crypto_secretbox_open_easy"]
        self._scalarmult_base = functions["crypto_scalarmult_base"]
        self._sign_keypair = functions["crypto_sign_keypair"]
        self._sign_seed_keypair = functions["crypto_sign_seed_keypair"]
        self._pk_to_curve25519 = functions["crypto_sign_ed25519_pk_to_curve25519"]
        self._sk_to_curve25519 = functions["crypto_sign_ed25519_sk_to_curve25519"]
        self._randombytes_buf = functions["randombytes_buf"]

    def __repr__(self) -> str:
        return f"GilKeepingBindings({self.path!r})"

    def crypto_box_keypair(self) -> tuple[bytes, bytes]:
        """A fresh random X25519 key pair: ``(public, secret)``."""
        pk, sk = _Key(), _Key()
        _check_rc(self._box_keypair(pk, sk))
        return pk.raw, sk.raw

    def crypto_box_beforenm(self, pk: bytes, sk: bytes, /) -> bytes:
        """The shared key of a public and a secret X25519 key.

        Raises:
            nacl.exceptions.RuntimeError: ``pk`` is a point libsodium refuses
                (small order).
        """
        _check_length(pk, _KEY, "Invalid public key")
        _check_length(sk, _KEY, "Invalid secret key")
        k = _Key()
        _check_rc(self._box_beforenm(k, pk, sk))
        return k.raw

    def crypto_box_easy(self, message: bytes, nonce: bytes, pk: bytes, sk: bytes, /) -> bytes:
        """``message`` boxed from ``sk`` to ``pk``: tag ‖ ciphertext."""
        if len(message) > HOLD_GIL_UP_TO:
            return nacl.bindings.crypto_box_easy(message, nonce, pk, sk)
        _check_length(nonce, _NONCE, "Invalid nonce size")
        _check_length(pk, _KEY, "Invalid public key")
        _check_length(sk, _KEY, "Invalid secret key")
        out = ctypes.create_string_buffer(len(message) + _MAC)
        _check_rc(self._box_easy(out, message, len(message), nonce, pk, sk))
        return out.raw

    def crypto_box_easy_afternm(self, message: bytes, nonce: bytes, k: bytes, /) -> bytes:
        """``message`` boxed with a shared key from :meth:`crypto_box_beforenm`."""
        if len(message) > HOLD_GIL_UP_TO:
            return nacl.bindings.crypto_box_easy_afternm(message, nonce, k)
        _check_length(nonce, _NONCE, "Invalid nonce")
        _check_length(k, _KEY, "Invalid shared key")
        out = ctypes.create_string_buffer(len(message) + _MAC)
        _check_rc(self._box_easy_afternm(out, message, len(message), nonce, k))
        return out.raw

    def crypto_box_open_easy_afternm(self, ciphertext: bytes, nonce: bytes, k: bytes, /) -> bytes:
        """The message in a box, opened with a shared key.

        Raises:
            nacl.exceptions.CryptoError: the box does not authenticate.
            nacl.exceptions.TypeError: ``ciphertext`` is shorter than a tag.
        """
        if len(ciphertext) > HOLD_GIL_UP_TO:
            return nacl.bindings.crypto_box_open_easy_afternm(ciphertext, nonce, k)
        _check_length(nonce, _NONCE, "Invalid nonce")
        _check_length(k, _KEY, "Invalid shared key")
        return _open(self._box_open_easy_afternm, ciphertext, nonce, k)

    def crypto_secretbox_easy(self, message: bytes, nonce: bytes, key: bytes, /) -> bytes:
        """``message`` sealed with a secret key: tag ‖ ciphertext."""
        if len(message) > HOLD_GIL_UP_TO:
            return nacl.bindings.crypto_secretbox_easy(message, nonce, key)
        _check_length(key, _KEY, "Invalid key")
        _check_length(nonce, _NONCE, "Invalid nonce")
        out = ctypes.create_string_buffer(len(message) + _MAC)
        if self._secretbox_easy(out, message, len(message), nonce, key) != 0:
            raise exc.CryptoError("Encryption failed")
        return out.raw

    def crypto_secretbox_open_easy(self, ciphertext: bytes, nonce: bytes, key: bytes, /) -> bytes:
        """The message in a secretbox.

        Raises:
            nacl.exceptions.CryptoError: the box does not authenticate.
            nacl.exceptions.TypeError: ``ciphertext`` is shorter than a tag.
        """
        if len(ciphertext) > HOLD_GIL_UP_TO:
            return nacl.bindings.crypto_secretbox_open_easy(ciphertext, nonce, key)
        _check_length(key, _KEY, "Invalid key")
        _check_length(nonce, _NONCE, "Invalid nonce")
        return _open(self._secretbox_open_easy, ciphertext, nonce, key)

    def crypto_scalarmult_base(self, n: bytes, /) -> bytes:
        """The X25519 public key of the scalar ``n``."""
        # nacl.bindings passes any length on; libsodium would read 32 bytes.
        _check_length(n, _KEY, "Invalid scalar")
        q = _Key()
        _check_rc(self._scalarmult_base(q, n))
        return q.raw

    def crypto_sign_keypair(self) -> tuple[bytes, bytes]:
        """A fresh random Ed25519 key pair: ``(public, seed ‖ public)``."""
        pk, sk = _Key(), _SignSecret()
        _check_rc(self._sign_keypair(pk, sk))
        return pk.raw, sk.raw

    def crypto_sign_seed_keypair(self, seed: bytes, /) -> tuple[bytes, bytes]:
        """The Ed25519 key pair of a 32-byte seed: ``(public, seed ‖ public)``."""
        _check_length(seed, _KEY, "Invalid seed")
        pk, sk = _Key(), _SignSecret()
        _check_rc(self._sign_seed_keypair(pk, sk, seed))
        return pk.raw, sk.raw

    def crypto_sign_ed25519_pk_to_curve25519(self, public_key_bytes: bytes, /) -> bytes:
        """An Ed25519 public key as an X25519 one.

        Raises:
            nacl.exceptions.RuntimeError: not a point, or one of small order.
        """
        _check_length(public_key_bytes, _KEY, "Invalid curve public key")
        out = _Key()
        _check_rc(self._pk_to_curve25519(out, public_key_bytes))
        return out.raw

    def crypto_sign_ed25519_sk_to_curve25519(self, secret_key_bytes: bytes, /) -> bytes:
        """An Ed25519 secret key (seed ‖ public) as an X25519 scalar."""
        _check_length(secret_key_bytes, _SIGN_SECRET, "Invalid curve secret key")
        out = _Key()
        _check_rc(self._sk_to_curve25519(out, secret_key_bytes))
        return out.raw

    def randombytes(self, size: int, /) -> bytes:
        """``size`` bytes from libsodium's CSPRNG (the OS's, through ``getrandom``)."""
        if size > HOLD_GIL_UP_TO:
            return nacl.bindings.randombytes(size)
        out = ctypes.create_string_buffer(size)
        self._randombytes_buf(out, size)
        return out.raw


_Key = ctypes.c_char * _KEY
_SignSecret = ctypes.c_char * _SIGN_SECRET

_PROTOTYPES: dict[str, tuple[list[type], type | None]] = {
    "sodium_init": ([], ctypes.c_int),
    "crypto_box_keypair": ([_P, _P], ctypes.c_int),
    "crypto_box_beforenm": ([_P, _P, _P], ctypes.c_int),
    "crypto_box_easy": ([_P, _P, _ULL, _P, _P, _P], ctypes.c_int),
    "crypto_box_easy_afternm": ([_P, _P, _ULL, _P, _P], ctypes.c_int),
    "crypto_box_open_easy_afternm": ([_P, _P, _ULL, _P, _P], ctypes.c_int),
    "crypto_secretbox_easy": ([_P, _P, _ULL, _P, _P], ctypes.c_int),
    "crypto_secretbox_open_easy": ([_P, _P, _ULL, _P, _P], ctypes.c_int),
    "crypto_scalarmult_base": ([_P, _P], ctypes.c_int),
    "crypto_sign_keypair": ([_P, _P], ctypes.c_int),
    "crypto_sign_seed_keypair": ([_P, _P, _P], ctypes.c_int),
    "crypto_sign_ed25519_pk_to_curve25519": ([_P, _P], ctypes.c_int),
    "crypto_sign_ed25519_sk_to_curve25519": ([_P, _P], ctypes.c_int),
    "randombytes_buf": ([_P, ctypes.c_size_t], None),
}


def _check_length(value: bytes, expected: int, message: str) -> None:
    if len(value) != expected:
        raise exc.ValueError(message)


def _check_rc(rc: int) -> None:
    if rc != 0:
        raise exc.RuntimeError("Unexpected library error")


def _open(function: Callable[..., int], ciphertext: bytes, nonce: bytes, key: bytes) -> bytes:
    # crypto_box_open_easy_afternm and crypto_secretbox_open_easy take the same
    # arguments; both refuse a text shorter than its tag the way PyNaCl does.
    if len(ciphertext) < _MAC:
        raise exc.TypeError(f"Input ciphertext must be at least {_MAC} long")
    size = len(ciphertext) - _MAC
    out = ctypes.create_string_buffer(max(1, size))
    if function(out, ciphertext, len(ciphertext), nonce, key) != 0:
        raise exc.CryptoError("An error occurred trying to decrypt the message")
    return out.raw if size else b""


def load_gil_keeping() -> GilKeepingBindings | None:
    """:class:`GilKeepingBindings` on PyNaCl's own libsodium, or ``None`` if it
    cannot be loaded there (the reason is logged at debug level)."""
    try:
        # PyNaCl's compiled module: its file is the library to load.
        from nacl import _sodium

        return GilKeepingBindings(_sodium.__file__)
    except (ImportError, OSError, AttributeError) as error:
        _log.debug("libsodium through PyNaCl, releasing the GIL per call: %s", error)
        return None


PYNACL: Bindings = nacl.bindings
"""PyNaCl's own bindings (cffi; the GIL is released during each call)."""

GIL_KEEPING: GilKeepingBindings | None = load_gil_keeping()
"""The bindings that keep the GIL, or ``None`` where they cannot be loaded."""

bindings: Bindings = GIL_KEEPING if GIL_KEEPING is not None else PYNACL
"""What ensync's crypto calls: :data:`GIL_KEEPING` where it loaded, else :data:`PYNACL`."""


@contextlib.contextmanager
def using(chosen: Bindings) -> Iterator[None]:
    """Make ``chosen`` the :data:`bindings` of this process for a ``with`` block.

    For tests and benchmarks that compare both: it changes what every thread
    calls, and is not meant for production code.
    """
    global bindings
    previous, bindings = bindings, chosen
    try:
        yield
    finally:
        bindings = previous
