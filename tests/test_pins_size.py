"""The message-size bound at each layer, at its exact boundary (``max_size`` in, one byte over out).

- :class:`MessageAssembler` (roomcast's transport): the total of a fragmented or compressed
  message, whatever its split (each continuation frame counting ``FRAGMENT_COST`` more), and
  an inflated message that would grow past the bound.
- :meth:`Connection.receive` (any ASGI server that does not enforce the bound itself): text by
  its UTF-8 length, bytes by their length.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.errors import MessageTooBig
from roomcast.transport.frames import (
    FIN,
    OP_BINARY,
    OP_CONT,
    OP_TEXT,
    RSV1,
    FrameReader,
    WebSocketProtocolError,
)
from roomcast.transport.messages import FRAGMENT_COST, MessageAssembler

LIMIT = 10
#: The assembler's bound: room for fragments, each continuation counting FRAGMENT_COST more.
BOUND = 100


def too_big(call: Any, *args: Any) -> None:
    with pytest.raises(WebSocketProtocolError) as error:
        call(*args)
    assert error.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_assembler_one_frame_at_the_bound(opcode: int) -> None:
    assembler = MessageAssembler(BOUND)
    assert len(assembler.frame(FIN | opcode, b"x" * BOUND) or "") == BOUND
    too_big(assembler.frame, FIN | opcode, b"x" * (BOUND + 1))


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("split", [1, 40, 83])
def test_assembler_fragments_add_up(opcode: int, split: int) -> None:
    """The bound is on the message: fragments that each fit but add up past it are refused."""
    rest = BOUND - split - FRAGMENT_COST
    assembler = MessageAssembler(BOUND)
    assert assembler.frame(opcode, b"a" * split) is None
    whole = assembler.frame(FIN | OP_CONT, b"b" * rest)
    assert whole is not None
    assert len(whole) == split + rest
    # The next message starts from 0 again.
    assert assembler.frame(opcode, b"a" * split) is None
    too_big(assembler.frame, FIN | OP_CONT, b"b" * (rest + 1))


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_assembler_inflated_size_is_bounded() -> None:
    """A compressed frame is judged by what it inflates to (RFC 7692 section 8.2)."""
    assembler = MessageAssembler(BOUND, PerMessageDeflate(False, False, 15, 15))
    assert assembler.frame(FIN | RSV1 | OP_BINARY, deflated(b"z" * BOUND)) == b"z" * BOUND
    too_big(assembler.frame, FIN | RSV1 | OP_BINARY, deflated(b"z" * (BOUND + 1)))


def test_assembler_inflated_fragments_share_one_budget() -> None:
    first_size = 60
    fits = BOUND - first_size - FRAGMENT_COST
    for second_size, ok in ((fits, True), (fits + 1, False)):
        assembler = MessageAssembler(BOUND, PerMessageDeflate(False, False, 15, 15))
        compressor = zlib.compressobj(wbits=-15)
        first = compressor.compress(b"q" * first_size) + compressor.flush(zlib.Z_SYNC_FLUSH)
        second = compressor.compress(b"q" * second_size) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert assembler.frame(RSV1 | OP_BINARY, first) is None
        if ok:
            whole = assembler.frame(FIN | OP_CONT, second[:-4])
            assert whole == b"q" * (first_size + second_size)
        else:
            too_big(assembler.frame, FIN | OP_CONT, second[:-4])


def connection(*messages: dict[str, Any]) -> Connection:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent")

    return Connection({"type": "websocket", "path": "/ws/echo"}, receive, send, LIMIT)


@pytest.mark.parametrize(
    ("text", "fits"),
    [
        ("x" * LIMIT, True),
        ("x" * (LIMIT + 1), False),
        ("é" * 5, True),  # 10 bytes
        ("é" * 5 + "x", False),  # 11 bytes, 6 characters
        ("😀" * 2 + "xx", True),  # 10 bytes, 4 characters (4 * 4 > LIMIT, but it fits)
        ("😀" * 3, False),  # 12 bytes, 3 characters
        ("xyz", True),
    ],
)
async def test_connection_text_by_its_utf8_length(text: str, fits: bool) -> None:
    conn = connection({"type": "websocket.receive", "text": text})
    if fits:
        assert await conn.receive() == text
    else:
        with pytest.raises(MessageTooBig):
            await conn.receive()


@pytest.mark.parametrize(("size", "fits"), [(0, True), (LIMIT, True), (LIMIT + 1, False)])
async def test_connection_bytes_by_their_length(size: int, fits: bool) -> None:
    conn = connection({"type": "websocket.receive", "bytes": b"b" * size})
    if fits:
        assert await conn.receive() == b"b" * size
    else:
        with pytest.raises(MessageTooBig):
            await conn.receive()


# -- the frame reader: the size a frame header declares, before its payload is read ---------------


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (masked with a zero key, so the payload reads as is)."""
    first = (FIN if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def read_one(reader: FrameReader, data: bytes) -> tuple[int, bytes] | None:
    reader.feed(data)
    return reader.next_frame()


@pytest.mark.parametrize("size", [BOUND, 200, 70_000])
def test_reader_takes_a_frame_of_exactly_max_size(size: int) -> None:
    frame = read_one(FrameReader(size), masked(OP_BINARY, b"x" * size))
    assert frame is not None
    assert len(frame[1]) == size
    with pytest.raises(WebSocketProtocolError) as error:
        read_one(FrameReader(size), masked(OP_BINARY, b"x" * (size + 1)))
    assert error.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("opcode", [0x8, 0x9, 0xA])  # close, ping, pong
def test_reader_control_frames_at_most_125_bytes(opcode: int) -> None:
    payload = b"\x03\xe8" + b"x" * 123 if opcode == 0x8 else b"x" * 125
    frame = read_one(FrameReader(1 << 20), masked(opcode, payload))
    assert frame is not None
    assert len(frame[1]) == 125
    with pytest.raises(WebSocketProtocolError) as error:
        read_one(FrameReader(1 << 20), masked(opcode, payload + b"x"))
    assert error.value.code == CloseCode.PROTOCOL_ERROR
    # Refused from the header alone: the payload need not have arrived.
    with pytest.raises(WebSocketProtocolError):
        read_one(FrameReader(1 << 20), masked(opcode, payload + b"x")[:8])


class Recording(PerMessageDeflate):
    """permessage-deflate that records the inflate budget each frame got."""

    budgets: list[int | None]

    def decode(self, frame: Any, *, max_size: int | None = None) -> Any:
        self.budgets.append(max_size)
        return super().decode(frame, max_size=max_size)


def test_inflate_budget_is_what_the_message_may_still_grow_by() -> None:
    """A compressed frame is inflated only up to the room the message has left (a bomb stops
    at the limit instead of after it)."""
    deflate = Recording(False, False, 15, 15)
    deflate.budgets = []
    assembler = MessageAssembler(BOUND, deflate)
    compressor = zlib.compressobj(wbits=-15)
    first = compressor.compress(b"q" * 60) + compressor.flush(zlib.Z_SYNC_FLUSH)
    second = compressor.compress(b"q" * 10) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert assembler.frame(RSV1 | OP_BINARY, first) is None
    assert assembler.frame(FIN | OP_CONT, second[:-4]) == b"q" * 70
    assert deflate.budgets == [BOUND, BOUND - 60 - FRAGMENT_COST]
