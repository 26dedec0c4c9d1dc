"""Sans-I/O message assembly (RFC 6455 section 5.4, RFC 7692): data frames in, messages out.

Fragments are joined, compressed messages inflated, text checked as UTF-8 fragment by
fragment, and the total size bounded however the message is split: every continuation frame
counts :data:`FRAGMENT_COST` bytes beyond its payload, so a run of empty continuation frames
reaches the limit too. Every violation raises
:class:`~roomcast.transport.frames.WebSocketProtocolError` with its close code.
"""

from __future__ import annotations

import codecs
from typing import Final

from websockets.exceptions import PayloadTooBig
from websockets.exceptions import ProtocolError as WebSocketsProtocolError
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from roomcast.closecodes import CloseCode
from roomcast.transport.frames import (
    FIN,
    OP_BINARY,
    OP_CONT,
    OP_TEXT,
    RSV1,
    WebSocketProtocolError,
)

__all__ = ["FRAGMENT_COST", "MessageAssembler"]

#: What each continuation frame adds to its message's size beyond its payload. An empty frame
#: costs its sender 6 bytes and the server a parse and a decode step; counted as nothing, an
#: endless run of them grew a message forever without reaching the limit. At 16 bytes a message
#: has at most ``max_size / 16`` fragments (65,536 at 1 MiB), and one split into fragments of
#: 1 KiB or more loses under 2% of its limit.
FRAGMENT_COST: Final = 16

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class MessageAssembler:
    """Builds whole messages from a connection's data frames, in order."""

    __slots__ = ("_compressed", "_data", "_decoder", "_opcode", "_size", "deflate", "max_size")

    def __init__(self, max_size: int, deflate: PerMessageDeflate | None = None) -> None:
        self.max_size = max_size
        #: The negotiated permessage-deflate extension, if any.
        self.deflate = deflate
        self._opcode = 0
        #: The fragments so far, joined: the memory a message in progress holds is its size,
        #: with no per-fragment object (text is decoded once, when the message is whole).
        self._data = bytearray()
        self._size = 0
        self._compressed = False
        self._decoder: codecs.IncrementalDecoder | None = None

    def reset(self) -> None:
        """Forget the message in progress (after a failure)."""
        self._opcode = 0
        if self._data:
            self._data = bytearray()  # not clear(): that would keep its capacity
        self._size = 0
        self._compressed = False
        self._decoder = None

    def frame(self, first: int, payload: bytes, *, keep: bool = True) -> str | bytes | None:
        """Feed one data frame; returns the message it completes, else ``None``.

        ``first`` is the frame's first byte (FIN, RSV1, opcode). With ``keep=False`` (a closing
        connection) the frame's place in the stream is still checked but its data is dropped.
        """
        opcode = first & 0x0F
        if opcode == OP_CONT:
            if not self._opcode:
                raise WebSocketProtocolError(
                    CloseCode.PROTOCOL_ERROR, "continuation frame outside a message"
                )
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode:
                raise WebSocketProtocolError(
                    CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one"
                )
            self._opcode = opcode
            self._compressed = bool(first & RSV1)
        else:
            raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
        fin = bool(first & FIN)
        if not keep:
            if fin:
                self.reset()
            return None
        if opcode == OP_CONT:
            # Counted before the payload: a fragment's cost to the server is not its size
            # alone (see FRAGMENT_COST), and nothing is inflated past the budget it leaves.
            self._size += FRAGMENT_COST
        if self._compressed:
            payload = self._inflate(opcode, first, payload)
        self._size += len(payload)
        if self._size > self.max_size:
            raise WebSocketProtocolError(
                CloseCode.MESSAGE_TOO_BIG, f"message over {self.max_size} bytes"
            )
        if self._opcode == OP_TEXT:
            return self._text(payload, fin)
        data = self._data
        if fin and not data:
            self.reset()
            return payload  # the common case: one frame, one message
        data += payload
        if not fin:
            return None
        whole = bytes(data)
        self.reset()
        return whole

    def _text(self, payload: bytes, fin: bool) -> str | None:
        decoder = self._decoder
        data = self._data
        try:
            if fin and decoder is None:
                text = payload.decode()  # the common case: one frame, one message
            else:
                if decoder is None:
                    decoder = self._decoder = _utf8_decoder()
                # Decoding each fragment as it comes fails fast on invalid UTF-8 (Autobahn 6.x);
                # the bytes are kept, not the pieces of text, and decoded once at the end.
                decoder.decode(payload, fin)
                data += payload
                if not fin:
                    return None
                text = data.decode()
        except UnicodeDecodeError:
            raise WebSocketProtocolError(
                CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8"
            ) from None
        self.reset()
        return text

    def _inflate(self, opcode: int, first: int, payload: bytes) -> bytes:
        deflate = self.deflate
        if deflate is None:
            raise WebSocketProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        frame = Frame(Opcode(opcode), payload, bool(first & FIN), bool(first & RSV1))
        try:
            # Inflate at most what the message may still grow by: a small compressed frame
            # that expands to gigabytes stops at the limit (RFC 7692 section 8.2, "bombs").
            # (zlib reads a max_length of 0 as "no limit", hence at least 1.)
            budget = max(1, self.max_size - self._size)
            return bytes(deflate.decode(frame, max_size=budget).data)
        except PayloadTooBig:
            raise WebSocketProtocolError(
                CloseCode.MESSAGE_TOO_BIG, f"message over {self.max_size} bytes"
            ) from None
        except (WebSocketsProtocolError, ValueError) as error:
            raise WebSocketProtocolError(
                CloseCode.PROTOCOL_ERROR, f"bad compressed data: {error}"
            ) from None
