"""Memory bounded in bytes (docs/security.md, "Memory bounds").

A peer that does not read, or that floods the server with frames that each cost next to nothing
to send, must not make the server hold more than the documented bounds: outboxes are bounded in
bytes as well as in frames, a history page in bytes as well as in publications, pongs to a peer
that does not read them are not queued, and every frame of a fragmented message counts toward
the message size limit. The pure pieces (message assembly, history pages) are tested first.

What a test bounds is the server process's memory, so the servers here are ``roomcast serve``
processes (on both WebSocket implementations where the bound is not the transport's own); the
history paging, which measures no memory, runs in-process.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psutil
import pytest

from helpers import (
    LEFT,
    TIMEOUT,
    RawFrameReader,
    RoomcastServer,
    ServerFactory,
    async_wait_until,
    client_frame,
    close_code_lines,
    closing_socket,
    kernel_send_buffer_max,
    raw_ws_handshake,
    ws_connect,
)
from roomcast.closecodes import CloseCode
from roomcast.codecs.roomcast_json import HISTORY_PAGE_BYTES, history_result
from roomcast.settings import Settings
from roomcast.transport.frames import FIN, OP_CONT, OP_TEXT, WebSocketProtocolError
from roomcast.transport.messages import FRAGMENT_COST, MessageAssembler
from servers import TRANSPORTS, Peer, ServerStarter, in_server_loop

OWN = {"ROOMCAST_WS": "roomcast"}
MiB = 1 << 20

Frame = dict[str, Any]


def channel(prefix: str = "bounds") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def rss(server: RoomcastServer) -> int:
    assert server.proc is not None
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


# -- pure: message assembly ------------------------------------------------------------------------


def test_every_continuation_frame_counts_toward_the_size_limit() -> None:
    limit = 4096
    assembler = MessageAssembler(limit)
    assert assembler.frame(OP_TEXT, b"a") is None
    # Empty fragments are refused once their charge passes the limit, not never.
    allowed = (limit - 1) // FRAGMENT_COST
    for _ in range(allowed):
        assert assembler.frame(OP_CONT, b"") is None
    with pytest.raises(WebSocketProtocolError) as raised:
        assembler.frame(OP_CONT, b"")
    assert raised.value.code == CloseCode.MESSAGE_TOO_BIG


def test_a_fragmented_message_within_the_limit_is_whole() -> None:
    assembler = MessageAssembler(1 << 20)
    assert assembler.frame(OP_TEXT, "é".encode()[:1]) is None
    assert assembler.frame(OP_CONT, b"") is None
    assert assembler.frame(OP_CONT | FIN, "é".encode()[1:] + b"!") == "é!"
    assert assembler.frame(OP_TEXT | FIN, b"whole") == "whole"
    assert assembler.frame(0x2, b"\x00") is None
    assert assembler.frame(OP_CONT | FIN, b"\x01") == b"\x00\x01"


# -- pure: history pages ---------------------------------------------------------------------------


def publication(offset: int, size: int) -> bytes:
    return b'{"type":"publication","offset":%d,"data":"%s"}' % (offset, b"x" * size)


def offsets(result: bytes) -> list[int]:
    return [p["offset"] for p in orjson.loads(result)["publications"]]


def test_a_history_page_is_bounded_in_bytes() -> None:
    frames = [publication(k, 1000) for k in range(1, 101)]
    # Forwards (since): the oldest that fit; backwards (before, or neither): the newest.
    oldest = history_result("e", 100, 1, frames, max_bytes=10_000)
    newest = history_result("e", 100, 1, frames, max_bytes=10_000, keep_newest=True)
    assert offsets(oldest) == list(range(1, 10))
    assert offsets(newest) == list(range(92, 101))
    assert len(oldest) < 10_000 + 100
    # A publication larger than the cap still makes a page of one: paging always moves on.
    assert offsets(history_result("e", 2, 1, [publication(1, 5000)], max_bytes=100)) == [1]
    assert offsets(history_result("e", 0, 1, [])) == []
    # With its reply's envelope a page stays within 1 MiB, what common clients take by default.
    assert MiB - 1024 == HISTORY_PAGE_BYTES


def test_outbox_bytes_setting() -> None:
    assert Settings().outbox_bytes == 4 * MiB
    field = Settings.model_fields["outbox_bytes"]
    assert field.description is not None
    assert "4008" in field.description


# -- /ws: a client that asks for history and never reads ----------------------------------------

PUB_PAD = 60 * 1024  # data of one publication
PUBLICATIONS = 64  # a 4 MiB history: more than a page
HISTORY_REQUESTS = 64
# What one flooding connection may add to the server: its outbox (4 MiB by default), the
# transport's buffer, the history page being built, allocator slack. Without the byte bounds
# each unread reply held the whole 3.8 MiB history, 1024 of them before a cut.
RSS_BOUND = 48 * MiB

on_both_transports = pytest.mark.parametrize("ws", list(TRANSPORTS.values()), ids=list(TRANSPORTS))


def read_json(reader: RawFrameReader) -> Frame:
    opcode, payload = reader.read_frame(time.monotonic() + TIMEOUT)
    assert opcode == 1, (opcode, payload[:200])
    frame = json.loads(payload)
    assert isinstance(frame, dict)
    return frame


@on_both_transports
async def test_history_flood_without_reading_is_cut_4008(
    server_factory: ServerFactory, ws: str
) -> None:
    srv = server_factory(env={"ROOMCAST_CLOSE_TIMEOUT": "1", "ROOMCAST_WS": ws})
    ch = channel()
    async with ws_connect(srv, "/ws") as a, ws_connect(srv, "/ws") as b:
        filler, bystander = Peer(a), Peer(b)
        for k in range(PUBLICATIONS):
            await filler.ok("publish", channel=ch, data=f"{k:04d}".ljust(PUB_PAD, "h"))
        sock, initial = await asyncio.to_thread(raw_ws_handshake, srv.port, "/ws", rcvbuf=4096)
        with closing_socket(sock):
            reader = RawFrameReader(sock, initial)
            hello = await asyncio.to_thread(read_json, reader)
            before = rss(srv)
            requests = b"".join(
                client_frame(1, json.dumps({"id": k, "op": "history", "channel": ch,
                                            "limit": 1000}).encode())
                for k in range(HISTORY_REQUESTS)
            )  # fmt: skip
            await asyncio.to_thread(sock.sendall, requests)  # 6 KB of requests

            def cut() -> bool:
                grown = rss(srv) - before
                assert grown < RSS_BOUND, f"server grew by {mib(grown)} before the cut"
                return any(hello["client"] in line for line in close_code_lines(srv.log(), 4008))

            await async_wait_until(cut, 4 * TIMEOUT, "the flooder's cut (4008)")
            grown = rss(srv) - before
            assert grown < RSS_BOUND, f"server grew by {mib(grown)}"
            # The server goes on serving the others.
            page = await bystander.ok("history", channel=ch, limit=1000)
            assert 0 < len(page["publications"]) < PUBLICATIONS
            await filler.ok("publish", channel=ch, data="after")
            # The flooder reads at last: the replies it had not read, in order, then 4008.
            got, code, reason = await asyncio.to_thread(reader.frames_until_close, 4 * TIMEOUT)
        assert code == 4008, (code, reason)
        assert "bytes" in reason, reason
        replies = [json.loads(payload) for _, payload in got]
        assert [r["id"] for r in replies] == list(range(len(replies)))
        assert len(replies) < HISTORY_REQUESTS
        for r in replies:
            publications = r["result"]["publications"]
            # A page ends at the byte cap: the oldest PUB_PAD publications that fit in 1 MiB.
            assert 0 < len(publications) < PUBLICATIONS
            assert sum(len(orjson.dumps(p)) for p in publications) <= HISTORY_PAGE_BYTES


@in_server_loop
async def test_history_pages_page_on_from_the_last_offset(start_server: ServerStarter) -> None:
    # A history of 64 publications of 60 KiB (3.8 MiB), whatever the history's own byte bound.
    srv = await start_server(api_key="bounds-key", history_bytes=8 * MiB)
    ch = channel()
    async with ws_connect(srv, "/ws") as ws:
        peer = Peer(ws)
        for k in range(PUBLICATIONS):
            await peer.ok("publish", channel=ch, data=f"{k:04d}".ljust(PUB_PAD, "p"))
        # Forwards from the start: pages of fewer than `limit`, no gap, no overlap.
        seen: list[int] = []
        since = 0
        pages = 0
        while since < PUBLICATIONS:
            assert pages < PUBLICATIONS, "paging does not move on"
            page = await peer.ok("history", channel=ch, since=since, limit=1000)
            pages += 1
            got = [p["offset"] for p in page["publications"]]
            assert got
            assert got[0] == since + 1
            seen += got
            since = got[-1]
        assert seen == list(range(1, PUBLICATIONS + 1))
        assert pages > 1, "the history did not need more than one page"
        # The newest page ends at the latest offset; the HTTP API pages the same way.
        newest = await peer.ok("history", channel=ch, limit=1000)
        newest_offsets = [p["offset"] for p in newest["publications"]]
        assert newest_offsets[-1] == PUBLICATIONS
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.get(
                f"{srv.http_url}/api/history/{ch}",
                params={"limit": 1000},
                headers={"X-API-Key": "bounds-key"},
            )
        assert response.status_code == 200
        assert len(response.content) <= HISTORY_PAGE_BYTES
        assert [p["offset"] for p in response.json()["publications"]] == newest_offsets


# -- chat: a member that never reads, large messages ---------------------------------------------

CHAT_PAD = 256 * 1024
OUTBOX_FRAMES = 1024  # the default ROOMCAST_OUTBOX_SIZE
OUTBOX_BYTES = 4 * MiB  # the default ROOMCAST_OUTBOX_BYTES
# Kernel buffers, the transport's buffer and a full outbox, in messages: the cut comes by then,
# long before OUTBOX_FRAMES messages of CHAT_PAD bytes (256 MiB) were queued.
CHAT_MAX = (kernel_send_buffer_max() + OUTBOX_BYTES + 2 * MiB) // CHAT_PAD + 8


@on_both_transports
async def test_chat_member_that_never_reads_is_cut_by_bytes(
    server_factory: ServerFactory, ws: str
) -> None:
    assert CHAT_MAX < OUTBOX_FRAMES // 4
    srv = server_factory(env={"ROOMCAST_CLOSE_TIMEOUT": "1", "ROOMCAST_WS": ws})
    path = f"/ws/chat/bytes-{uuid.uuid4().hex[:8]}"
    staller, initial = await asyncio.to_thread(raw_ws_handshake, srv.port, path, rcvbuf=4096)
    with closing_socket(staller):
        async with ws_connect(srv, path, compression=None, max_size=None) as sender:
            await srv.await_stats(lambda s: s["chat_members"] == 2, what="both members joined")
            before = rss(srv)
            sent = 0
            left = False
            async with asyncio.timeout(6 * TIMEOUT):
                while not left:
                    assert sent < CHAT_MAX, f"staller not cut after {sent} messages of 256 KiB"
                    await sender.send(f"{sent:06d}:".ljust(CHAT_PAD, "c"))
                    sent += 1
                    # The sender reads its own message (and the notice, once the staller is cut).
                    while True:
                        text = await sender.recv()
                        if text == LEFT:
                            left = True
                            continue
                        assert isinstance(text, str)
                        assert text.startswith("Client says: ")
                        break
            grown = rss(srv) - before
            assert grown < RSS_BOUND, f"server grew by {mib(grown)}"
            await sender.send("after")
            assert await sender.recv() == "Client says: after"
        raw = RawFrameReader(staller, initial)
        frames, code, reason = await asyncio.to_thread(raw.frames_until_close, 4 * TIMEOUT)
    assert code == 1013, (code, reason)
    assert "bytes" in reason, reason
    assert 0 < len(frames) < sent


# -- transport: pings and fragments that cost the peer next to nothing ---------------------------


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    """roomcast's own transport (the bounds are its own)."""
    srv = RoomcastServer(tmp_path_factory.mktemp("own"), env=OWN)
    with srv:
        yield srv
    srv.assert_no_traceback()


PING = client_frame(0x9, b"p" * 125)  # 131 bytes on the wire, a 127-byte pong
PING_FLOOD = 32 * MiB
PING_BOUND = 8 * MiB


def test_ping_flood_without_reading_stays_bounded(own: RoomcastServer) -> None:
    sock, initial = raw_ws_handshake(own.port, "/ws/echo", rcvbuf=4096)
    with sock:
        before = rss(own)
        chunk = PING * (MiB // len(PING))
        sock.settimeout(4 * TIMEOUT)
        for _ in range(PING_FLOOD // len(chunk)):
            sock.sendall(chunk)
        # Most of the flood has been read (the kernel buffers hold a few MiB at most): without a
        # bound, a pong for each ping would now sit in the server's buffer.
        grown = rss(own) - before
        assert grown < PING_BOUND, f"server grew by {mib(grown)} for {mib(PING_FLOOD)} of pings"
        # The most recent ping is still answered once the peer reads.
        sock.sendall(client_frame(0x9, b"last"))
        reader = RawFrameReader(sock, initial)
        deadline = time.monotonic() + 4 * TIMEOUT
        limit = kernel_send_buffer_max() + 4 * MiB
        while True:
            opcode, payload = reader.read_frame(deadline, max_bytes=limit)
            assert opcode == 0xA, opcode
            if payload == b"last":
                break
        assert reader.total < limit
        sock.sendall(client_frame(0x8, b"\x03\xe8"))
        assert reader.frames_until_close(TIMEOUT)[1] == 1000


def test_empty_continuation_flood_closes_1009(own: RoomcastServer) -> None:
    sock, initial = raw_ws_handshake(own.port, "/ws/echo")
    with sock:
        before = rss(own)
        sock.settimeout(TIMEOUT)
        sock.sendall(client_frame(OP_TEXT, b"a", fin=False))
        # 4 MiB of empty frames, 6 bytes each: 10 times what reaches the 1 MiB limit.
        empty = client_frame(OP_CONT, b"", fin=False) * (MiB // 6)
        try:
            for _ in range(4):
                sock.sendall(empty)
        except OSError:
            pass  # closed already
        _, code, reason = RawFrameReader(sock, initial).frames_until_close(TIMEOUT)
        assert code == 1009, (code, reason)
        grown = rss(own) - before
        assert grown < PING_BOUND, f"server grew by {mib(grown)}"
        # One log line for the connection, not one per frame that followed the failure.
        peer = "{}:{}".format(*sock.getsockname())
        lines = [line for line in own.log().splitlines() if peer in line and "closed" in line]
        assert len(lines) == 1, lines
    # The server serves the next connection as before.
    sock, initial = raw_ws_handshake(own.port, "/ws/echo")
    with sock:
        sock.sendall(client_frame(OP_TEXT | FIN, b"hi"))
        reader = RawFrameReader(sock, initial)
        assert reader.read_frame(time.monotonic() + TIMEOUT) == (1, b"Echo: hi")
