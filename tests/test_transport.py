"""roomcast's own WebSocket transport: the hardening its protocol class adds over uvicorn's.

Every server here runs with ROOMCAST_WS=roomcast, whatever the suite-wide implementation is,
and clients speak raw frames over a socket so they can break the rules on purpose. These tests
check what only a real connection shows (close frames on the wire, log lines, memory, timers,
TCP closed after the handshake); which close code each broken frame earns, and the closing,
ping and keepalive decisions, are unit tests of the state machine in test_transport_state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import psutil
import pytest

from helpers import (
    HOST,
    TIMEOUT,
    RawFrameReader,
    RoomcastServer,
    ServerFactory,
    client_frame,
    raw_ws_handshake,
    ws_connect,
)

OWN = {"ROOMCAST_WS": "roomcast"}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    srv = RoomcastServer(tmp_path_factory.mktemp("own"), env=OWN)
    with srv:
        yield srv
    srv.assert_no_traceback()


def close_of(sock: socket.socket, initial: bytes = b"") -> tuple[int | None, str]:
    _, code, reason = RawFrameReader(sock, initial).frames_until_close(TIMEOUT)
    return code, reason


def peer_lines(server: RoomcastServer, sock: socket.socket, code: int) -> list[str]:
    """Server log lines about this client's connection that carry ``code``."""
    peer = "{}:{}".format(*sock.getsockname())
    return [line for line in server.log().splitlines() if peer in line and str(code) in line]


def test_invalid_utf8_closes_1007_with_one_log_line(own: RoomcastServer) -> None:
    sock, rest = raw_ws_handshake(own.port, "/ws/echo")
    with sock:
        # A flood of invalid frames: the first one ends it, and only one line is logged.
        sock.sendall(client_frame(0x1, b"\xff\xfe invalid") * 50)
        code, _ = close_of(sock, rest)
        assert code == 1007
        assert len(peer_lines(own, sock, 1007)) == 1
    assert "Traceback" not in own.log()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-9)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_compressed_messages_round_trip(own: RoomcastServer) -> None:
    headers: dict[str, str] = {}
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    sock, rest = raw_ws_handshake(
        own.port, "/ws/methods_raw", request_headers=[offer], response_headers=headers
    )
    with sock:
        assert headers.get("sec-websocket-extensions", "").startswith("permessage-deflate")
        sock.sendall(client_frame(0x2, _deflate(b"z" * 5000), rsv1=True))
        opcode, payload = RawFrameReader(sock, rest).read_frame(time.monotonic() + TIMEOUT)
        assert opcode == 0x2
        # the reply may be compressed (RSV1): inflate it the way a client would
        inflated = zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")
        assert inflated == b"Raw echo: " + b"z" * 5000


def test_deflate_bomb_is_refused_without_inflating_it(own: RoomcastServer) -> None:
    assert own.proc is not None
    server_process = psutil.Process(own.proc.pid)
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    bomb = _deflate(b"\x00" * (32 << 20))  # 32 MiB of zeros in ~32 KiB
    assert len(bomb) < 64 << 10
    before = server_process.memory_info().rss
    socks = []
    try:
        for _ in range(4):
            sock, rest = raw_ws_handshake(own.port, "/ws/methods_bytes", request_headers=[offer])
            socks.append(sock)
            sock.sendall(client_frame(0x2, bomb, rsv1=True))
            code, _ = close_of(sock, rest)
            assert code == 1009
        grown = server_process.memory_info().rss - before
        assert grown < 10 << 20, f"server grew by {grown / 2**20:.1f} MiB"
    finally:
        for sock in socks:
            sock.close()


def test_ping_gets_pong_and_close_is_echoed(own: RoomcastServer) -> None:
    sock, rest = raw_ws_handshake(own.port, "/ws/echo")
    with sock:
        reader = RawFrameReader(sock, rest)
        sock.sendall(client_frame(0x9, b"hello?"))
        assert reader.read_frame(time.monotonic() + TIMEOUT) == (0xA, b"hello?")
        sock.sendall(client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
        _, code, _ = reader.frames_until_close(TIMEOUT)
        assert code == 1000
        sock.settimeout(TIMEOUT)
        assert sock.recv(1) == b"", "the server closes TCP after the closing handshake"


def test_slow_request_head_is_dropped(server_factory: ServerFactory) -> None:
    server = server_factory(env={**OWN, "ROOMCAST_HANDSHAKE_TIMEOUT": "1"})
    start = time.monotonic()
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
        request = f"GET /ws/echo HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        dropped = False
        for byte in request.encode():
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
            except OSError:
                dropped = True
                break
            if time.monotonic() - start > 1 + TIMEOUT:
                break
        if not dropped:
            sock.settimeout(TIMEOUT)
            try:
                dropped = sock.recv(1) == b""
            except ConnectionResetError:
                dropped = True
    elapsed = time.monotonic() - start
    assert dropped, "a 1-byte-per-0.2s request head was not dropped"
    assert 0.9 <= elapsed <= 1 + TIMEOUT
    # ... while a normal handshake is untouched by the deadline
    sock2, _ = raw_ws_handshake(server.port, "/ws/echo")
    sock2.close()


CLOSE_TIMEOUT = 1.0


def test_close_handshake_is_bounded(server_factory: ServerFactory) -> None:
    server = server_factory(env={**OWN, "ROOMCAST_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT)})
    sock, rest = raw_ws_handshake(server.port, "/ws/stream?count=1&interval=0")
    with sock:
        frames, code, _ = RawFrameReader(sock, rest).frames_until_close(TIMEOUT)
        # The server sent its close just now (right after the one message).
        closed = time.monotonic()
        assert frames == [(0x1, b"Streaming message 1")]
        assert code == 1000
        # We never answer the close: the server drops the connection after ITS close timeout,
        # the configured 1 s, not the 5 s default.
        sock.settimeout(1 + TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        dropped = time.monotonic() - closed
        assert CLOSE_TIMEOUT - 0.3 <= dropped <= CLOSE_TIMEOUT + 2.0, dropped


async def test_fast_path_and_plain_asgi_rooms_agree(server_factory: ServerFactory) -> None:
    """Chat on roomcast's transport and on uvicorn's: the same messages, in the same order."""
    for ws in ("roomcast", "websockets-sansio"):
        server = server_factory(env={"ROOMCAST_WS": ws})
        async with (
            ws_connect(server, "/ws/chat/agree") as a,
            ws_connect(server, "/ws/chat/agree") as b,
        ):
            for i in range(50):
                await a.send(f"m{i}")
            expected = [f"Client says: m{i}" for i in range(50)]
            for ws_client in (a, b):
                got = [await asyncio.wait_for(ws_client.recv(), TIMEOUT) for _ in range(50)]
                assert got == expected
