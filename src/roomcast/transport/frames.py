"""Sans-I/O WebSocket framing (RFC 6455 section 5): parse client frames, build server frames.

Nothing here touches a socket or an event loop: :class:`FrameReader` takes bytes and returns
frames, :func:`build_frame` returns bytes. Server frames are never masked (section 5.1), so one
built frame can be written to any number of connections unchanged.
"""

from __future__ import annotations

import struct
from typing import Final

from websockets.speedups import apply_mask  # C: XOR with the 4-byte mask

from roomcast.closecodes import CloseCode

__all__ = [
    "FRAMES_EXTENSION",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameReader",
    "WebSocketProtocolError",
    "build_close_payload",
    "build_frame",
    "parse_close_payload",
]

#: The ASGI extension (in ``scope["extensions"]``) through which a server takes prepared frames.
FRAMES_EXTENSION: Final = "roomcast.frames"

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_KNOWN_OPCODES: Final = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})

FIN: Final = 0x80
RSV1: Final = 0x40
RSV_ALL: Final = 0x70

_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")
_CODE: Final = struct.Struct("!H")

#: Close codes a peer may send (RFC 6455 section 7.4.1 and the IANA registry); 3000-4999 are
#: for libraries and applications. 1004, 1005, 1006 and 1015 must never appear on the wire.
_VALID_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011})
_EXTRA_CLOSE_CODES: Final = frozenset({1012, 1013, 1014})


class WebSocketProtocolError(Exception):
    """The peer broke RFC 6455; the connection is failed with :attr:`code`."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def build_frame(opcode: int, payload: bytes, *, rsv1: bool = False) -> bytes:
    """One complete, unmasked server frame (FIN set)."""
    first = FIN | opcode | (RSV1 if rsv1 else 0)
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return _HEADER_16.pack(first, 126, length) + payload
    return _HEADER_64.pack(first, 127, length) + payload


def build_close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the code, then the reason cut to fit 125 bytes.

    The cut falls on a character boundary: half a UTF-8 sequence would make the peer fail the
    connection with 1007 instead of reading the reason.
    """
    encoded = reason.encode()
    if len(encoded) > 123:
        encoded = encoded[:123].decode(errors="ignore").encode()
    return _CODE.pack(code) + encoded


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame (section 5.5.1).

    An empty payload means "no status" (1005). Raises :class:`WebSocketProtocolError` for a
    one-byte payload or a code that may not be sent (1002), or a reason that is not UTF-8 (1007).
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    (code,) = _CODE.unpack_from(payload)
    if not (code in _VALID_CLOSE_CODES or code in _EXTRA_CLOSE_CODES or 3000 <= code <= 4999):
        raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketProtocolError(
            CloseCode.INVALID_PAYLOAD, "close reason is not valid UTF-8"
        ) from None
    return code, reason


class FrameReader:
    """Splits the bytes a client sends into frames, unmasking each payload.

    :meth:`next_frame` returns ``(first_byte, payload)`` for each complete frame, or ``None``
    when more bytes are needed. A frame whose declared length is over ``max_size`` is refused
    from its header, before its payload is buffered (section 10.4).
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos:
            # Drop what was parsed before growing the buffer, so it never holds more than
            # one incomplete frame plus the latest chunk.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete frame, or ``None``; raises :class:`WebSocketProtocolError`."""
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        first = buf[pos]
        second = buf[pos + 1]
        if not second & 0x80:
            # Section 5.1: a server must close the connection on an unmasked client frame.
            raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, "client frame not masked")
        length = second & 0x7F
        header = 2
        if length == 126:
            if available < 4:
                return None
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            header = 4
        elif length == 127:
            if available < 10:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            header = 10
        opcode = first & 0x0F
        if opcode >= OP_CLOSE and length > 125:
            # Section 5.5: refused from the header, before its payload is buffered.
            raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
        if opcode not in _KNOWN_OPCODES:
            raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if length > self.max_size:
            raise WebSocketProtocolError(
                CloseCode.MESSAGE_TOO_BIG, f"frame over {self.max_size} bytes"
            )
        end = pos + header + 4 + length
        if len(buf) < end:
            return None
        mask_at = pos + header
        payload = apply_mask(buf[mask_at + 4 : end], buf[mask_at : mask_at + 4])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return first, payload
