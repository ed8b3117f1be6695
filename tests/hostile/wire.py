"""Hand-made bytes: protobuf fields, HTTP/2 + gRPC framing, WebSocket frames.

Well-behaved libraries refuse to produce most of what the hostile tests send
(invalid UTF-8 in a string field, a frame header that promises 2**63 bytes,
an unmasked client frame), so it is built here byte by byte. Nothing in this
module validates anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Self

from tests.support.timing import seconds

__all__ = [
    "H2",
    "PREFACE",
    "RawSocket",
    "RawWebSocket",
    "WsFrame",
    "WsOp",
    "grpc_message",
    "grpc_request_headers",
    "h2_frame",
    "pb_len",
    "pb_tag",
    "pb_varint",
    "varint",
    "ws_frame",
]

# ---------------------------------------------------------------------------
# protobuf


def varint(value: int) -> bytes:
    """Base-128 varint; negative values as 64-bit two's complement (as int64 is
    encoded), values of 2**64 and more as the longer, invalid encodings."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def pb_tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def pb_varint(field: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return pb_tag(field, 0) + varint(value)


def pb_len(field: int, data: bytes, declared: int | None = None) -> bytes:
    """A length-delimited field (wire type 2); ``declared`` overrides the length."""
    return pb_tag(field, 2) + varint(len(data) if declared is None else declared) + data


# ---------------------------------------------------------------------------
# HTTP/2 and gRPC

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2:
    """Frame types and flags (RFC 9113 §6)."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8


def h2_frame(
    kind: int, flags: int, stream: int, payload: bytes, length: int | None = None
) -> bytes:
    """One HTTP/2 frame; ``length`` overrides the 24-bit length field."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def grpc_request_headers(
    path: str, authority: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """The HPACK block of a gRPC request for ``path`` (``/package.Service/Method``)."""
    fields = (
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    )
    return b"".join(_hpack_literal(name, value) for name, value in fields)


def grpc_message(body: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    """A length-prefixed gRPC message; ``declared`` overrides the 32-bit length."""
    size = len(body) if declared is None else declared
    return bytes([1 if compressed else 0]) + struct.pack(">I", size) + body


# ---------------------------------------------------------------------------
# sockets


class RawSocket:
    """A TCP connection that writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Self:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 22), seconds(10)
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; ``False`` if the peer has already closed the connection."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), seconds(10))
        except (ConnectionError, TimeoutError):
            return False
        return True

    async def read_some(self, timeout_s: float = 0.5) -> bytes | None:
        """What arrives within ``timeout_s`` (b"" at EOF, None if nothing came)."""
        try:
            return await asyncio.wait_for(self.reader.read(1 << 16), timeout_s)
        except TimeoutError:
            return None
        except ConnectionError:
            return b""

    async def read_until_closed(self, timeout_s: float) -> bool:
        """Drain until the peer closes; ``True`` if it did within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return False
            chunk = await self.read_some(left)
            if chunk == b"":
                return True

    def abort(self) -> None:
        """Drop the connection with a TCP RST: no FIN, no closing handshake."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close with a FIN."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), seconds(5))


# ---------------------------------------------------------------------------
# WebSocket


class WsOp:
    """Opcodes (RFC 6455 §5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    declared: int | None = None,
) -> bytes:
    """One client frame; ``declared`` overrides the payload length in the header
    (the payload is still masked and appended as given)."""
    size = len(payload) if declared is None else declared
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0xF])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head.append(mask_bit | size)
    elif size < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack(">H", size)
    else:
        head.append(mask_bit | 127)
        head += struct.pack(">Q", size)
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if len(payload) < 4096 else None
    if body is None:  # large payloads: mask by whole-number arithmetic, not per byte
        repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
        body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            len(payload), "big"
        )
    return bytes(head) + key + body


@dataclass(frozen=True, slots=True)
class WsFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != WsOp.CLOSE or len(self.payload) < 2:
            return None
        code: int = struct.unpack(">H", self.payload[:2])[0]
        return code

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


class RawWebSocket(RawSocket):
    """A WebSocket client that frames by hand (see :func:`ws_frame`).

    ``close_received`` is the code of the server's close frame, once read.
    """

    close_received: int | None = None

    @classmethod
    async def connect(cls, port: int, path: str = "/message") -> Self:
        """Open a connection and complete the opening handshake."""
        ws = await cls.open(port)
        await ws.send(ws.handshake(port, path))
        head = await asyncio.wait_for(ws.reader.readuntil(b"\r\n\r\n"), seconds(10))
        if not head.startswith(b"HTTP/1.1 101"):
            await ws.close()
            raise AssertionError(f"WebSocket upgrade refused: {head[:200]!r}")
        return ws

    @staticmethod
    def handshake(port: int, path: str = "/message") -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    async def send_text(self, text: str) -> bool:
        return await self.send(ws_frame(WsOp.TEXT, text.encode()))

    async def read_frame(self, timeout_s: float = 5.0) -> WsFrame | None:
        """The next server frame, or None at EOF / timeout."""
        try:
            return await asyncio.wait_for(self._read_frame(), seconds(timeout_s))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _read_frame(self) -> WsFrame:
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
        if second & 0x80:
            await self.reader.readexactly(4)  # servers do not mask; skip a key anyway
        return WsFrame(first & 0xF, await self.reader.readexactly(size))

    async def next_text(self, timeout_s: float = 5.0) -> str | None:
        """The next text frame (pings answered, pongs skipped); None if the
        connection closed or nothing came in time."""
        while True:
            frame = await self.read_frame(timeout_s)
            if frame is None:
                return None
            if frame.opcode == WsOp.CLOSE:
                self.close_received = frame.close_code
                return None
            if frame.opcode == WsOp.PING:
                await self.send(ws_frame(WsOp.PONG, frame.payload))
                continue
            if frame.opcode == WsOp.TEXT:
                return frame.text

    async def close_code(self, timeout_s: float = 5.0) -> int | None:
        """Read until the server's close frame; its code (None: EOF or timeout first)."""
        while True:
            frame = await self.read_frame(timeout_s)
            if frame is None:
                return None
            if frame.opcode == WsOp.CLOSE:
                return frame.close_code
