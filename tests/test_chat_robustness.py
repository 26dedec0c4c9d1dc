"""Rooms that a slow member cannot stall, and connections that leave nothing behind."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from contextlib import AsyncExitStack

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from helpers import (
    LEFT,
    TIMEOUT,
    RawFrameReader,
    kernel_send_buffer_max,
    raw_ws_handshake,
    recv,
    ws_connect,
)
from servers import AppServer, ServerStarter

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

# -- a) a member that stops reading is dropped, the others get everything ----------------------

OUTBOX = 64
HEALTHY = 5  # healthy[0] is also the sender
PAD = 4096  # bytes per chat message
WINDOW = 16  # the sender keeps at most this many of its own messages unconfirmed
AFTER_CUT = 200  # messages sent after the staller was cut


# The staller is cut once the kernel buffers, the transport's buffer and its outbox are full;
# send at most this much before calling the room stalled.
MAX_MESSAGES = (kernel_send_buffer_max() + (8 << 20)) // PAD


def chat_message(i: int) -> str:
    head = f"{i:06d}:"
    return head + "x" * (PAD - len(head))


def index_of(text: str) -> int:
    assert text.startswith("Client says: "), text[:60]
    return int(text[len("Client says: ") :].split(":", 1)[0])


async def test_stalled_member_is_dropped(start_server: ServerStarter) -> None:
    server = await start_server(outbox_size=OUTBOX)
    path = f"/ws/chat/stall-{uuid.uuid4().hex[:8]}"
    staller, initial = await asyncio.to_thread(raw_ws_handshake, server.port, path, rcvbuf=4096)
    with staller:
        async with AsyncExitStack() as stack:
            healthy: list[ClientConnection] = [
                await stack.enter_async_context(ws_connect(server, path, compression=None))
                for _ in range(HEALTHY)
            ]
            await server.await_stats(
                lambda s: s["chat_members"] == HEALTHY + 1, what="all members joined"
            )
            received: list[list[int]] = [[] for _ in healthy]
            notices = [0] * HEALTHY
            done = [False] * HEALTHY
            sent = 0

            def take(k: int, msg: str | bytes) -> None:
                assert isinstance(msg, str)
                if msg == LEFT:
                    notices[k] += 1
                elif msg == "Client says: END":
                    done[k] = True
                else:
                    received[k].append(index_of(msg))

            async def reader(k: int) -> None:
                while not done[k]:
                    take(k, await healthy[k].recv())

            async def sender() -> None:
                nonlocal sent
                ws = healthy[0]
                cut_at = None
                while cut_at is None or sent < cut_at + AFTER_CUT:
                    if sent >= MAX_MESSAGES:
                        pytest.fail(f"staller not cut after {sent} messages of {PAD} bytes")
                    await ws.send(chat_message(sent))
                    sent += 1
                    while sent - len(received[0]) > WINDOW:
                        take(0, await ws.recv())
                    if cut_at is None and notices[0]:
                        cut_at = sent
                await ws.send("END")
                await reader(0)

            tasks = [sender()] + [reader(k) for k in range(1, HEALTHY)]
            try:
                async with asyncio.timeout(6 * TIMEOUT):
                    await asyncio.gather(*tasks)
            except TimeoutError:
                pytest.fail(
                    f"healthy members stalled: sent {sent}, received "
                    f"{[len(r) for r in received]}, notices {notices}, "
                    f"stats {await server.astats()}"
                )
            for k in range(HEALTHY):
                assert received[k] == list(range(sent)), k
            assert notices == [1] * HEALTHY
            await server.await_stats(lambda s: s["chat_members"] == HEALTHY, what="staller removed")

            # The staller now reads: what it had not read, then close 1013.
            raw = RawFrameReader(staller, initial)
            frames, code, _reason = await asyncio.to_thread(raw.frames_until_close, 4 * TIMEOUT)
            assert code == 1013
            assert all(op == 1 for op, _ in frames), {op for op, _ in frames}
            seen = [index_of(payload.decode()) for _, payload in frames]
            assert seen == list(range(len(seen))), "unread messages must stay in order"
            assert len(seen) < sent

            # The room still works for the healthy members.
            await healthy[1].send("after")
            for ws in healthy:
                assert await recv(ws) == "Client says: after"


# -- b) many members leave at once -------------------------------------------------------------

MEMBERS = 50
LEAVERS = 25


async def test_mass_leave(server: AppServer) -> None:
    await server.await_stats(lambda s: s["connections"] == 0, what="an idle server")
    async with AsyncExitStack() as stack:
        members: list[ClientConnection] = list(
            await asyncio.gather(
                *(stack.enter_async_context(ws_connect(server, "/ws/chat")) for _ in range(MEMBERS))
            )
        )
        await server.await_stats(lambda s: s["chat_members"] == MEMBERS, what="all joined")
        leavers, stayers = members[:LEAVERS], members[LEAVERS:]

        async def leave(k: int, ws: ClientConnection) -> None:
            if k % 2:
                ws.transport.abort()
            else:
                await ws.close()

        await asyncio.gather(*(leave(k, ws) for k, ws in enumerate(leavers)))
        await server.await_stats(
            lambda s: s["chat_members"] == MEMBERS - LEAVERS, what="leavers removed"
        )
        await stayers[0].send("marker")

        async def count_notices(ws: ClientConnection) -> int:
            notices = 0
            while True:
                msg = await recv(ws)
                if msg == "Client says: marker":
                    return notices
                assert msg == LEFT, msg
                notices += 1

        counts = await asyncio.gather(*(count_notices(ws) for ws in stayers))
        assert counts == [LEAVERS] * len(stayers)
        # Nothing more is queued for anyone.
        await stayers[-1].send("marker 2")
        for ws in stayers:
            assert await recv(ws) == "Client says: marker 2"
    await server.await_stats(lambda s: s["connections"] == 0, what="all gone")
    server.assert_no_traceback()


# -- c) many short connections leave nothing behind --------------------------------------------

CYCLES = 1000
CONCURRENCY = 20


async def test_connect_disconnect_cycles(server: AppServer) -> None:
    await server.await_stats(
        lambda s: s["connections"] == 0 and s["chat_members"] == 0, what="an idle server"
    )
    baseline = (await server.astats())["asyncio_tasks"]
    gate = asyncio.Semaphore(CONCURRENCY)
    rooms = [f"/ws/chat/cycle-{k}" for k in range(5)]

    async def cycle(i: int) -> None:
        kind = i % 10
        if kind < 6:
            path = "/ws/chat"
        elif kind == 6:
            path = rooms[i % len(rooms)]
        elif kind == 7:
            path = "/ws/echo"
        else:
            path = "/ws/stream?count=1000&interval=1"
        async with gate:
            ws = await ws_connect(server, path)
            try:
                if path == "/ws/echo":
                    await ws.send("x")
                    assert await recv(ws) == "Echo: x"
                elif path.startswith("/ws/stream"):
                    assert await recv(ws) == "Streaming message 1"
                elif i % 3 == 0:
                    await ws.send(f"hello {i}")
                    async with asyncio.timeout(TIMEOUT):
                        while await ws.recv() != f"Client says: hello {i}":
                            pass
            finally:
                if i % 2:
                    ws.transport.abort()
                else:
                    await ws.close()

    async with asyncio.timeout(20 * TIMEOUT):
        await asyncio.gather(*(cycle(i) for i in range(CYCLES)))

    final = await server.await_stats(
        lambda s: (
            s["connections"] == 0
            and s["chat_members"] == 0
            and s["rooms"] == 0
            and s["writer_tasks"] == 0
            and s["asyncio_tasks"] <= baseline
        ),
        within=3 * TIMEOUT,
        what=f"everything released (asyncio_tasks back to {baseline})",
    )
    assert final["asyncio_tasks"] <= baseline
    server.assert_no_traceback()


# -- d) a stream stops as soon as its client leaves --------------------------------------------


#: How soon a stream's handler must be gone once its client left.
STREAM_STOPS_WITHIN = max(1.0, TIMEOUT / 5)


@pytest.mark.parametrize("how", ["close", "abort"])
# Both intervals are well over the window: a stream that noticed only at its next send (as
# the guide's code does) would still be there when the window ends.
@pytest.mark.parametrize("interval", [3 * STREAM_STOPS_WITHIN, 4 * TIMEOUT])
async def test_stream_stops_at_once(server: AppServer, how: str, interval: float) -> None:
    await server.await_stats(lambda s: s["connections"] == 0, what="an idle server")
    async with ws_connect(server, f"/ws/stream?count=1000&interval={interval}") as ws:
        assert await recv(ws) == "Streaming message 1"
        await server.await_stats(lambda s: s["connections"] == 1, what="stream counted")
        if how == "abort":
            ws.transport.abort()
        else:
            await ws.close()
    # Well before the next message is due (the guide's code only notices on its next send).
    await server.await_stats(
        lambda s: s["connections"] == 0 and s["writer_tasks"] == 0,
        within=STREAM_STOPS_WITHIN,
        what="stream handler gone",
    )


async def test_abort_without_close_frame_on_every_endpoint(server: AppServer) -> None:
    """Clients that vanish (no close frame) are cleaned up on every endpoint."""
    await server.await_stats(lambda s: s["connections"] == 0, what="an idle server")
    paths = [
        "/ws/echo",
        "/ws/chat",
        "/ws/chat/abort-room",
        "/ws/secure?token=secret-token",
        "/ws/methods_text",
        "/ws/methods_bytes",
        "/ws/methods_json",
        "/ws/methods_raw",
    ]
    socks: list[socket.socket] = []
    try:
        for path in paths:
            sock, _ = await asyncio.to_thread(raw_ws_handshake, server.port, path)
            socks.append(sock)
        await server.await_stats(lambda s: s["connections"] == len(paths), what="all connected")
    finally:
        for sock in socks:
            # Linger 0: close sends RST, like a crashed client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    await server.await_stats(
        lambda s: s["connections"] == 0 and s["chat_members"] == 0 and s["rooms"] == 0,
        what="all cleaned up",
    )
    server.assert_no_traceback()


async def test_abrupt_chat_leave_is_announced(server: AppServer) -> None:
    await server.await_stats(lambda s: s["chat_members"] == 0, what="an empty chat")
    async with ws_connect(server, "/ws/chat") as stay, ws_connect(server, "/ws/chat") as go:
        await server.await_stats(lambda s: s["chat_members"] == 2, what="both joined")
        go.transport.abort()
        assert await recv(stay) == LEFT
        await stay.send("still")
        assert await recv(stay) == "Client says: still"
    with pytest.raises(ConnectionClosed):
        await go.recv()
