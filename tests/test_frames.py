"""The sans-I/O frame layer: property tests of the parser and builder (no sockets)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.closecodes import CloseCode
from roomcast.transport.frames import FrameReader, WebSocketProtocolError, build_frame
from roomcast.transport.handshake import HandshakeError, accept_key, parse_upgrade_request

FRAMES = st.lists(
    st.tuples(
        st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]),
        st.binary(max_size=70_000),
        st.booleans(),
    ),
    max_size=6,
)


def masked(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A client frame as RFC 6455 section 5.2 lays it out (independent of build_frame)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0xFE, n)
    else:
        header = struct.pack("!BBQ", first, 0xFF, n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@settings(max_examples=60, deadline=None)
@given(frames=FRAMES, cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=30))
def test_reader_returns_every_frame_however_the_bytes_arrive(
    frames: list[tuple[int, bytes, bool]], cuts: list[int]
) -> None:
    wire = b"".join(masked(op, data, fin) for op, data, fin in frames)
    reader = FrameReader(max_size=1 << 20)
    got: list[tuple[int, bytes]] = []
    position = 0
    for size in [*cuts, len(wire)]:
        reader.feed(wire[position : position + size])
        position += size
        while (frame := reader.next_frame()) is not None:
            got.append(frame)
    expected = [((0x80 if fin else 0) | op, data) for op, data, fin in frames]
    assert got == expected
    assert reader.buffered == 0


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_build_frame_lengths(length: int) -> None:
    frame = build_frame(0x2, b"x" * length)
    assert frame[0] == 0x82
    assert not frame[1] & 0x80, "server frames are not masked"
    if length < 126:
        assert (frame[1], len(frame)) == (length, 2 + length)
    elif length < 65536:
        assert struct.unpack("!H", frame[2:4])[0] == length
    else:
        assert struct.unpack("!Q", frame[2:10])[0] == length


def test_reader_refuses_an_oversize_frame_from_its_header() -> None:
    reader = FrameReader(max_size=1000)
    reader.feed(struct.pack("!BBQ", 0x82, 0xFF, 1 << 40))  # no payload needed to refuse it
    with pytest.raises(WebSocketProtocolError) as info:
        reader.next_frame()
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_accept_key_matches_the_rfc_example() -> None:
    # RFC 6455 section 1.3
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade", 405),
        (b"GET / HTTP/1.1\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13", 426),
        (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            426,
        ),
        (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short",
            400,
        ),
    ],
)
def test_bad_upgrade_requests(head: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_upgrade_request(head)
    assert info.value.status == status
