"""The transport's connection state machine, without sockets or an event loop.

Each test feeds :class:`ConnectionState` the bytes a client would send, and checks the events it
returns, the bytes it would write and the state it is left in: the closing handshake, pings and
pongs, the size and UTF-8 decisions, and keepalive given the times passed in. What only a real
socket shows (close codes on the wire, log lines, TCP closed after the handshake, timers) is in
test_transport.py; RFC 6455 as a whole is Autobahn's (test_conformance.py).
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate

from roomcast.closecodes import CloseCode
from roomcast.transport.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    build_frame,
)
from roomcast.transport.state import (
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    PONG,
    REPLY,
    CloseReceived,
    ConnectionState,
    Event,
    Failure,
)

LIMIT = 1000


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame, laid out as RFC 6455 section 5.2 says (not with build_frame)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def server_frames(data: list[bytes]) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each unmasked server frame in ``data``."""
    wire = b"".join(data)
    frames = []
    while wire:
        first, length = wire[0], wire[1]
        assert not length & 0x80, "server frames are not masked"
        header = 2
        if length == 126:
            length, header = struct.unpack("!H", wire[2:4])[0], 4
        elif length == 127:
            length, header = struct.unpack("!Q", wire[2:10])[0], 10
        frames.append((first, wire[header : header + length]))
        wire = wire[header + length :]
    return frames


def sent_close(ws: ConnectionState) -> tuple[int, str] | None:
    """The code and reason of the one close frame ``ws`` has to send (None: empty payload)."""
    frames = server_frames(ws.data_to_send())
    assert [first for first, _ in frames] == [0x80 | OP_CLOSE]
    payload = frames[0][1]
    if not payload:
        return None
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def opened(max_size: int = LIMIT, **keepalive: float | None) -> ConnectionState:
    ws = ConnectionState(max_size, **keepalive)
    ws.accept(0.0)
    return ws


def feed(ws: ConnectionState, *frames: bytes) -> list[Event]:
    """Every event ``frames`` make, as the asyncio protocol reads them."""
    ws.receive_data(b"".join(frames))
    events = []
    while (event := ws.next_event()) is not None:
        events.append(event)
    return events


# -- messages -----------------------------------------------------------------------------------


def test_messages_whole_and_fragmented() -> None:
    ws = opened()
    assert feed(ws, frame(OP_TEXT, b"hi"), frame(OP_BINARY, b"\x00\xff")) == ["hi", b"\x00\xff"]
    assert feed(ws, frame(OP_TEXT, b"sp", fin=False)) == []
    assert feed(ws, frame(OP_CONT, b"l", fin=False), frame(OP_CONT, b"it")) == ["split"]
    assert ws.data_to_send() == []
    assert ws.state is OPEN


def test_bytes_before_accept_wait_for_it() -> None:
    ws = ConnectionState(LIMIT)
    assert feed(ws, frame(OP_TEXT, b"early")) == []
    assert ws.state is CONNECTING
    assert ws.unparsed > 0
    ws.accept(0.0)
    assert feed(ws) == ["early"]
    assert ws.unparsed == 0


def test_a_frame_split_anywhere_is_read_whole() -> None:
    ws = opened()
    wire = frame(OP_TEXT, b"x" * 300)
    events: list[Event] = []
    for i in range(len(wire)):
        events += feed(ws, wire[i : i + 1])
    assert events == ["x" * 300]


def test_many_fragments_are_fine_within_the_size_limit() -> None:
    ws = opened(1 << 20)
    count = 10_000  # far beyond the 4,096-fragment cap of uvicorn's legacy backend
    frames = [frame(OP_TEXT, b"a", fin=False)]
    frames += [frame(OP_CONT, b"a", fin=False)] * (count - 2)
    frames.append(frame(OP_CONT, b"a"))
    assert feed(ws, *frames) == ["a" * count]


def test_compressed_messages_in_and_out() -> None:
    ws = ConnectionState(LIMIT)
    ws.accept(0.0, PerMessageDeflate(False, False, 15, 15))
    compressor = zlib.compressobj(wbits=-15)
    deflated = compressor.compress(b"z" * 500) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert feed(ws, frame(OP_BINARY, deflated[:-4], rsv1=True)) == [b"z" * 500]
    ((first, payload),) = server_frames([ws.data_frame(OP_TEXT, b"y" * 500)])
    assert first == 0x80 | 0x40 | OP_TEXT, "compressed: RSV1 set"
    assert zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff") == b"y" * 500


def test_data_frames_without_deflate_are_plain() -> None:
    ws = opened()
    assert ws.data_frame(OP_TEXT, b"hello") == build_frame(OP_TEXT, b"hello")
    assert ws.data_frame(OP_BINARY, b"") == build_frame(OP_BINARY, b"")


# -- the closing handshake ----------------------------------------------------------------------


def test_peer_close_with_a_code_is_echoed_without_its_reason() -> None:
    ws = opened()
    assert feed(ws, frame(OP_CLOSE, close_payload(1000, b"bye"))) == [
        CloseReceived(1000, "bye", echoed=True)
    ]
    assert ws.state is CLOSED
    assert sent_close(ws) == (1000, "")


def test_peer_close_with_an_application_code() -> None:
    ws = opened()
    assert feed(ws, frame(OP_CLOSE, close_payload(4321))) == [CloseReceived(4321, "", True)]
    assert sent_close(ws) == (4321, "")


def test_peer_close_without_a_code_gets_an_empty_close() -> None:
    ws = opened()
    assert feed(ws, frame(OP_CLOSE)) == [CloseReceived(CloseCode.NO_STATUS, "", echoed=True)]
    assert sent_close(ws) is None  # 1005 is never sent: an empty payload says it
    assert ws.state is CLOSED


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(b"\x03", CloseCode.PROTOCOL_ERROR, id="one-byte"),
        pytest.param(close_payload(999), CloseCode.PROTOCOL_ERROR, id="code-999"),
        pytest.param(close_payload(1005), CloseCode.PROTOCOL_ERROR, id="code-1005"),
        pytest.param(close_payload(1006), CloseCode.PROTOCOL_ERROR, id="code-1006"),
        pytest.param(close_payload(2999), CloseCode.PROTOCOL_ERROR, id="code-2999"),
        pytest.param(close_payload(5000), CloseCode.PROTOCOL_ERROR, id="code-5000"),
        pytest.param(close_payload(1000, b"\xff"), CloseCode.INVALID_PAYLOAD, id="reason-utf8"),
    ],
)
def test_invalid_close_payload_fails_and_drops(payload: bytes, code: CloseCode) -> None:
    ws = opened()
    (event,) = feed(ws, frame(OP_CLOSE, payload))
    assert isinstance(event, Failure)
    assert (event.code, event.first, event.sent_close, event.drop) == (code, True, True, True)
    assert ws.state is CLOSING
    assert sent_close(ws) == (code, event.reason)


def test_close_during_a_fragmented_message_ends_it() -> None:
    ws = opened()
    events = feed(ws, frame(OP_TEXT, b"half", fin=False), frame(OP_CLOSE, close_payload(1001)))
    assert events == [CloseReceived(1001, "", echoed=True)]
    assert sent_close(ws) == (1001, "")


def test_server_close_then_peer_reply() -> None:
    ws = opened()
    ws.send_close(1000, "done")
    assert ws.state is CLOSING
    assert sent_close(ws) == (1000, "done")
    # While closing: data is checked and dropped, pings go unanswered, the close completes.
    events = feed(
        ws,
        frame(OP_TEXT, b"late"),
        frame(OP_PING, b"?"),
        frame(OP_CLOSE, close_payload(1000)),
    )
    assert events == [CloseReceived(1000, "", echoed=False)]
    assert ws.state is CLOSED
    assert ws.data_to_send() == []


def test_server_close_without_status_sends_an_empty_close() -> None:
    ws = opened()
    ws.send_close(CloseCode.NO_STATUS)
    assert sent_close(ws) is None


def test_a_second_close_is_ignored() -> None:
    ws = opened()
    close = frame(OP_CLOSE, close_payload(1000))
    assert feed(ws, close, close, frame(OP_TEXT, b"after")) == [CloseReceived(1000, "", True)]
    assert sent_close(ws) == (1000, "")
    assert feed(ws, close) == []
    assert ws.data_to_send() == []
    with pytest.raises(RuntimeError):
        ws.send_close(1000)


def test_closing_twice_is_refused() -> None:
    ws = opened()
    ws.send_close(1000)
    with pytest.raises(RuntimeError):
        ws.send_close(1001)
    assert sent_close(ws) == (1000, "")


def test_abort_closes_without_a_handshake() -> None:
    ws = opened(ping_interval=1.0)
    ws.abort()
    assert ws.state is CLOSED
    assert ws.keepalive_at is None
    assert feed(ws, frame(OP_TEXT, b"x")) == []
    assert ws.data_to_send() == []


# -- protocol failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "code", "drop"),
    [
        pytest.param(struct.pack("!BB", 0x81, 2) + b"hi", 1002, True, id="unmasked"),
        pytest.param(frame(0x3, b"x"), 1002, True, id="reserved-opcode"),
        pytest.param(frame(OP_PING, b"x", fin=False), 1002, False, id="fragmented-ping"),
        pytest.param(frame(OP_PING, b"x" * 126), 1002, True, id="long-ping"),
        pytest.param(frame(OP_TEXT, b"x", rsv1=True), 1002, False, id="rsv1-without-deflate"),
        pytest.param(frame(OP_TEXT | 0x20, b"x"), 1002, False, id="rsv2"),
        pytest.param(frame(OP_CONT, b"x"), 1002, False, id="continuation-first"),
        pytest.param(
            frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002, False, id="text-in-text"
        ),
        pytest.param(frame(OP_CLOSE, close_payload(999)), 1002, True, id="close-code-999"),
        pytest.param(frame(OP_CLOSE, b"\x03"), 1002, True, id="close-one-byte"),
        pytest.param(frame(OP_CLOSE, close_payload(1000, b"\xff")), 1007, True, id="close-utf8"),
        pytest.param(frame(OP_TEXT, b"\xff\xfe"), 1007, False, id="invalid-utf8"),
        pytest.param(frame(OP_TEXT, b"x" * (LIMIT + 1)), 1009, True, id="frame-over-limit"),
    ],
)
def test_protocol_violations_get_their_close_code(wire: bytes, code: int, drop: bool) -> None:
    ws = opened()
    (event,) = feed(ws, wire)
    assert isinstance(event, Failure)
    assert (event.code, event.first, event.sent_close, event.drop) == (code, True, True, drop)
    assert sent_close(ws) == (code, event.reason)
    assert ws.state is CLOSING


def test_invalid_utf8_split_across_fragments_fails_fast() -> None:
    ws = opened()
    # The first fragment already cannot be UTF-8: failed before the message ends.
    (event,) = feed(ws, frame(OP_TEXT, b"ok \xc0\xaf", fin=False))
    assert isinstance(event, Failure)
    assert event.code == CloseCode.INVALID_PAYLOAD


def test_utf8_split_inside_a_character_is_fine() -> None:
    ws = opened()
    euro = "€".encode()
    assert feed(ws, frame(OP_TEXT, euro[:1], fin=False), frame(OP_CONT, euro[1:])) == ["€"]


def test_size_limit_is_exact() -> None:
    ws = opened()
    assert feed(ws, frame(OP_BINARY, b"b" * LIMIT)) == [b"b" * LIMIT]
    (event,) = feed(ws, frame(OP_BINARY, b"b" * (LIMIT + 1)))
    assert isinstance(event, Failure)
    assert (event.code, event.drop) == (CloseCode.MESSAGE_TOO_BIG, True)  # from the header


def test_fragments_are_bounded_by_total_size() -> None:
    ws = opened(4096)
    # 64 fragments of 100 bytes: each small, together over 4,096; the stream stays readable.
    frames = [frame(OP_TEXT, b"x" * 100, fin=False)]
    frames += [frame(OP_CONT, b"x" * 100, fin=False)] * 63
    (event,) = feed(ws, *frames)
    assert isinstance(event, Failure)
    assert (event.code, event.sent_close, event.drop) == (CloseCode.MESSAGE_TOO_BIG, True, False)


def test_after_a_failure_only_the_peer_close_counts() -> None:
    ws = opened()
    (event,) = feed(ws, frame(OP_TEXT, b"\xff"))
    assert isinstance(event, Failure)
    assert sent_close(ws) == (CloseCode.INVALID_PAYLOAD, event.reason)
    # A flood of broken frames: no second failure (one log line), nothing more to send.
    flood = [frame(OP_TEXT, b"\xff"), frame(OP_CONT, b"x"), frame(OP_TEXT, b"x", rsv1=True)] * 50
    assert feed(ws, *flood, frame(OP_PING, b"p")) == []
    assert ws.data_to_send() == []
    # The peer's close completes the handshake; our close went out already.
    assert feed(ws, frame(OP_CLOSE, close_payload(1000))) == [CloseReceived(1000, "", False)]
    assert ws.state is CLOSED
    assert ws.data_to_send() == []


def test_a_malformed_close_after_a_failure_still_drops() -> None:
    ws = opened()
    assert isinstance(feed(ws, frame(OP_CONT, b"x"))[0], Failure)
    ws.data_to_send()
    (event,) = feed(ws, frame(OP_CLOSE, b"\x03"))
    assert isinstance(event, Failure)
    assert (event.first, event.sent_close, event.drop) == (False, False, True)
    assert ws.data_to_send() == []


def test_an_unparsable_stream_fails_once() -> None:
    ws = opened()
    (event,) = feed(ws, struct.pack("!BB", 0x81, 2) + b"hi")
    assert isinstance(event, Failure)
    ws.data_to_send()
    assert feed(ws, frame(OP_CLOSE, close_payload(1000))) == []  # nothing past it is read


def test_failure_while_closing_sends_nothing_more() -> None:
    ws = opened()
    ws.send_close(1000)
    ws.data_to_send()
    # While closing, data is dropped unread (no UTF-8 check), but its place is still checked.
    assert feed(ws, frame(OP_TEXT, b"\xff")) == []
    (event,) = feed(ws, frame(OP_CONT, b"x"))
    assert isinstance(event, Failure)
    assert (event.code, event.first, event.sent_close, event.drop) == (1002, True, False, False)
    assert ws.data_to_send() == []


# -- ping and pong ------------------------------------------------------------------------------


def test_ping_gets_its_pong() -> None:
    ws = opened()
    assert feed(ws, frame(OP_PING, b"hello?")) == [REPLY]
    assert server_frames(ws.data_to_send()) == [(0x80 | OP_PONG, b"hello?")]


def test_pings_to_a_full_transport_keep_only_the_latest() -> None:
    ws = opened()
    ws.pause_writing()
    assert feed(ws, *(frame(OP_PING, b"%d" % i) for i in range(100))) == []
    assert ws.data_to_send() == []
    ws.resume_writing()
    assert server_frames(ws.data_to_send()) == [(0x80 | OP_PONG, b"99")]
    ws.resume_writing()
    assert ws.data_to_send() == [], "answered once"


def test_a_held_pong_is_dropped_once_closing() -> None:
    ws = opened()
    ws.pause_writing()
    assert feed(ws, frame(OP_PING, b"p")) == []
    ws.send_close(1000)
    ws.data_to_send()
    ws.resume_writing()
    assert ws.data_to_send() == []


def test_unsolicited_pong_is_ignored() -> None:
    ws = opened(ping_interval=10.0, ping_timeout=5.0)
    assert feed(ws, frame(OP_PONG, b"unasked")) == []
    assert ws.data_to_send() == []


# -- keepalive ----------------------------------------------------------------------------------


def sent_ping(ws: ConnectionState) -> bytes:
    ((first, payload),) = server_frames(ws.data_to_send())
    assert first == 0x80 | OP_PING
    return payload


def test_no_keepalive_without_an_interval() -> None:
    ws = opened(ping_interval=None, ping_timeout=5.0)
    assert ws.keepalive_at is None
    assert ws.keepalive(1e9) is False
    assert ws.data_to_send() == []


def test_ping_when_due_and_pong_schedules_the_next() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=5.0)
    ws.accept(100.0)
    assert ws.keepalive_at == 110.0
    assert ws.keepalive(105.0) is False
    assert ws.data_to_send() == [], "not due yet"
    assert ws.keepalive(110.0) is False
    payload = sent_ping(ws)
    assert ws.keepalive_at == 115.0  # the pong's deadline
    assert feed(ws, frame(OP_PONG, payload)) == [PONG]
    assert ws.keepalive_at is None
    assert ws.keepalive(112.0) is False
    assert ws.keepalive_at == 122.0  # an interval after the pong
    assert ws.data_to_send() == []
    assert ws.keepalive(122.0) is False
    assert sent_ping(ws) != b"", "each ping has a payload to match its pong"


def test_no_pong_in_time_means_the_peer_is_dead() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=5.0)
    ws.accept(0.0)
    ws.keepalive(10.0)
    payload = sent_ping(ws)
    # A pong that is not ours does not count.
    assert feed(ws, frame(OP_PONG, payload + b"?")) == []
    assert ws.keepalive(14.0) is False
    assert ws.keepalive(15.0) is True
    assert sent_close(ws) == (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
    assert ws.state is CLOSED
    assert ws.keepalive_at is None


def test_without_a_timeout_pings_go_out_every_interval() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=None)
    ws.accept(0.0)
    ws.keepalive(10.0)
    first = sent_ping(ws)
    assert ws.keepalive_at == 20.0
    ws.keepalive(20.0)
    sent_ping(ws)
    assert ws.keepalive_at == 30.0
    assert feed(ws, frame(OP_PONG, first)) == [], "no deadline, nothing to wait for"
    assert ws.keepalive(1e6) is False


def test_a_timer_firing_a_hair_early_counts() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=5.0)
    ws.accept(0.0)
    ws.keepalive(9.9995)  # libuv's timers count whole milliseconds
    sent_ping(ws)


def test_keepalive_stops_once_closing() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=5.0)
    ws.accept(0.0)
    ws.keepalive(10.0)
    payload = sent_ping(ws)
    ws.send_close(1000)
    ws.data_to_send()
    assert ws.keepalive_at is None
    assert ws.keepalive(100.0) is False, "no pong is owed while closing"
    assert feed(ws, frame(OP_PONG, payload)) == []
    assert ws.data_to_send() == []


def test_keepalive_stops_when_the_peer_closes() -> None:
    ws = ConnectionState(LIMIT, ping_interval=10.0, ping_timeout=5.0)
    ws.accept(0.0)
    feed(ws, frame(OP_CLOSE, close_payload(1000)))
    ws.data_to_send()
    assert ws.keepalive_at is None
    assert ws.keepalive(10.0) is False
    assert ws.data_to_send() == []
