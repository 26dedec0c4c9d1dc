"""Every row of the contract table in docs/endpoints.md, against in-process servers on both
WebSocket implementations."""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from helpers import (
    GOOD_TOKEN,
    LEFT,
    TIMEOUT,
    USER,
    recv,
    recv_until_closed,
    ws_connect,
)
from servers import AppServer

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")


def room_name() -> str:
    return f"room-{uuid.uuid4().hex[:12]}"


def json_reply(data: Any) -> str:
    return json.dumps(
        {"message": "Server received your JSON", "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


async def test_health(server: AppServer) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        resp = await client.get(f"{server.http_url}/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


async def test_stats_shape(server: AppServer) -> None:
    stats = await server.astats()
    for key in ("connections", "rooms", "chat_members", "writer_tasks", "asyncio_tasks"):
        assert isinstance(stats[key], int), stats
    assert stats["asyncio_tasks"] >= 1


# -- echo --------------------------------------------------------------------------------------


async def test_echo(server: AppServer) -> None:
    async with ws_connect(server, "/ws/echo") as ws:
        for text in ("Hello, FastAPI!", "", "ünïcødé 🎉", "x" * 10_000):
            await ws.send(text)
            assert await recv(ws) == f"Echo: {text}"


async def test_echo_counts_as_connection(server: AppServer) -> None:
    await server.await_stats(lambda s: s["connections"] == 0, what="no connections")
    async with ws_connect(server, "/ws/echo") as ws:
        await ws.send("hi")
        assert await recv(ws) == "Echo: hi"
        await server.await_stats(lambda s: s["connections"] == 1, what="one connection")
    await server.await_stats(lambda s: s["connections"] == 0, what="connection gone")


# -- chat --------------------------------------------------------------------------------------


async def _chat_three(server: AppServer, path: str) -> None:
    async with AsyncExitStack() as stack:
        members: list[ClientConnection] = [
            await stack.enter_async_context(ws_connect(server, path)) for _ in range(3)
        ]
        await server.await_stats(lambda s: s["chat_members"] == 3, what="3 chat members")
        await members[0].send("hello all")
        for ws in members:
            assert await recv(ws) == "Client says: hello all"
        await members[1].send("second")
        for ws in members:
            assert await recv(ws) == "Client says: second"
        await members[2].close()
        for ws in members[:2]:
            assert await recv(ws) == LEFT
        await members[1].send("after leave")
        for ws in members[:2]:
            assert await recv(ws) == "Client says: after leave"


async def test_chat_three_members(server: AppServer) -> None:
    await server.await_stats(lambda s: s["chat_members"] == 0, what="empty chat")
    await _chat_three(server, "/ws/chat")


async def test_named_room_three_members(server: AppServer) -> None:
    await server.await_stats(lambda s: s["chat_members"] == 0, what="empty chat")
    await _chat_three(server, f"/ws/chat/{room_name()}")


async def test_rooms_are_isolated(server: AppServer) -> None:
    await server.await_stats(lambda s: s["chat_members"] == 0, what="empty chat")
    room_a, room_b = room_name(), room_name()
    async with AsyncExitStack() as stack:

        async def join(path: str) -> ClientConnection:
            return await stack.enter_async_context(ws_connect(server, path))

        a1, a2 = await join(f"/ws/chat/{room_a}"), await join(f"/ws/chat/{room_a}")
        b1, b2 = await join(f"/ws/chat/{room_b}"), await join(f"/ws/chat/{room_b}")
        main = await join("/ws/chat")
        await server.await_stats(lambda s: s["chat_members"] == 5, what="5 chat members")

        await a1.send("only for a")
        assert await recv(a1) == "Client says: only for a"
        assert await recv(a2) == "Client says: only for a"
        # Markers sent afterwards must be the first thing the others see.
        await b1.send("marker b")
        assert await recv(b1) == "Client says: marker b"
        assert await recv(b2) == "Client says: marker b"
        await main.send("marker main")
        assert await recv(main) == "Client says: marker main"
        # ... and the main chat's message reaches nobody in the named rooms.
        await a2.send("marker a")
        assert await recv(a1) == "Client says: marker a"
        assert await recv(a2) == "Client says: marker a"
        await b2.send("marker b2")
        assert await recv(b1) == "Client says: marker b2"
        # A member leaving room A is announced in room A only.
        await a2.close()
        assert await recv(a1) == LEFT
        await b1.send("marker b3")
        assert await recv(b2) == "Client says: marker b2"
        assert await recv(b2) == "Client says: marker b3"
        await main.send("marker main 2")
        assert await recv(main) == "Client says: marker main 2"


@pytest.mark.parametrize(
    "room",
    ["a" * 65, "bad!name", "bad%20name", "b%C3%A4d"],
    ids=["too-long", "bang", "space", "umlaut"],
)
async def test_invalid_room_name_rejected(server: AppServer, room: str) -> None:
    """Accepted, then closed 1008 with a reason a browser can read (docs/endpoints.md)."""
    async with ws_connect(server, f"/ws/chat/{room}") as ws:
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008
    assert "room names" in info.value.rcvd.reason


async def test_longest_valid_room_name(server: AppServer) -> None:
    room = "A-z_0.9:" + "x" * 56
    assert len(room) == 64
    async with ws_connect(server, f"/ws/chat/{room}") as ws:
        await ws.send("hi")
        assert await recv(ws) == "Client says: hi"


# -- secure ------------------------------------------------------------------------------------


async def test_secure_good_token(server: AppServer) -> None:
    async with ws_connect(server, f"/ws/secure?token={GOOD_TOKEN}") as ws:
        assert await recv(ws) == f"Hello, {USER}! Welcome to the secure WebSocket."
        await ws.send("x")
        assert await recv(ws) == "You said: x"
        await ws.send("second")
        assert await recv(ws) == "You said: second"


@pytest.mark.parametrize("query", ["", "?token=", "?token=wrong-token", "?tok=secret-token"])
async def test_secure_bad_or_missing_token(server: AppServer, query: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, f"/ws/secure{query}"):
            pass
    assert info.value.response.status_code == 403


# -- stream ------------------------------------------------------------------------------------


async def test_stream_count_interval(server: AppServer) -> None:
    async with ws_connect(server, "/ws/stream?count=3&interval=0.05") as ws:
        got = [await recv(ws) for _ in range(3)]
        assert got == [f"Streaming message {i}" for i in (1, 2, 3)]
        with pytest.raises(ConnectionClosedOK) as info:
            await recv(ws)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1000


async def test_stream_ignores_client_messages(server: AppServer) -> None:
    async with ws_connect(server, "/ws/stream?count=2&interval=0.05") as ws:
        await ws.send("ignored")
        await ws.send(b"ignored too")
        got = await recv_until_closed(ws)
    assert got == ["Streaming message 1", "Streaming message 2"]
    assert ws.close_code == 1000


@pytest.mark.parametrize(
    ("query", "bound"),
    [
        ("count=0&interval=0", "count"),
        ("count=-1&interval=0", "count"),
        ("count=1001&interval=0", "count"),
        ("count=1&interval=-0.5", "interval"),
        ("count=1&interval=60.5", "interval"),
        ("count=1&interval=61", "interval"),
        ("count=1&interval=nan", "interval"),
        ("count=ten", "count"),
    ],
)
async def test_stream_out_of_range(server: AppServer, query: str, bound: str) -> None:
    """Accepted, then closed 1008 with a reason naming the bound; nothing is streamed."""
    async with ws_connect(server, f"/ws/stream?{query}") as ws:
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008
    assert bound in info.value.rcvd.reason.lower()


async def test_stream_bounds_inclusive(server: AppServer) -> None:
    async with ws_connect(server, "/ws/stream?count=1&interval=0") as ws:
        assert await recv_until_closed(ws) == ["Streaming message 1"]
    assert ws.close_code == 1000
    async with ws_connect(server, "/ws/stream?count=1000&interval=0", max_queue=None) as ws:
        got = await recv_until_closed(ws, within=4 * TIMEOUT)
    assert got == [f"Streaming message {i}" for i in range(1, 1001)]
    assert ws.close_code == 1000


# -- methods -----------------------------------------------------------------------------------


async def test_methods_text(server: AppServer) -> None:
    async with ws_connect(server, "/ws/methods_text") as ws:
        for text in ("Hello, text endpoint!", "ü 🎉", ""):
            await ws.send(text)
            reply = await recv(ws)
            assert isinstance(reply, str)
            assert reply == f"Server received: {text}"


async def test_methods_bytes(server: AppServer) -> None:
    async with ws_connect(server, "/ws/methods_bytes") as ws:
        for data in (b"Hello, bytes endpoint!", bytes(range(256)), b""):
            await ws.send(data)
            reply = await recv(ws)
            assert isinstance(reply, bytes)
            assert reply == b"Server received: " + data


@pytest.mark.parametrize(
    "data",
    [
        {"greeting": "Hello, JSON endpoint!"},
        {"nested": {"list": [1, 2.5, None, True, False, {"deep": ["x"]}]}, "empty": {}},
        {"ünï": "日本語 🎉", "quote": 'say "hi"\n', "back\\slash": "\u00e9"},
        [1, "two", {"three": 3}],
        "just a string",
        42,
        None,
    ],
)
async def test_methods_json(server: AppServer, data: Any) -> None:
    async with ws_connect(server, "/ws/methods_json") as ws:
        await ws.send(json.dumps(data))
        reply = await recv(ws)
        assert isinstance(reply, str)
        assert reply == json_reply(data)
        # Whitespace in the request does not matter.
        await ws.send(json.dumps(data, indent=4))
        assert await recv(ws) == json_reply(data)


async def test_methods_raw(server: AppServer) -> None:
    async with ws_connect(server, "/ws/methods_raw") as ws:
        await ws.send("hello raw")
        reply = await recv(ws)
        assert isinstance(reply, str)
        assert reply == "Raw echo: hello raw"
        await ws.send(b"\x00\x01bytes\xff")
        reply = await recv(ws)
        assert isinstance(reply, bytes)
        assert reply == b"Raw echo: \x00\x01bytes\xff"
        await ws.send("ü")
        assert await recv(ws) == "Raw echo: ü"


async def test_clean_close_everywhere(server: AppServer) -> None:
    """A client closing normally is not an error: the server answers the close handshake."""
    paths = [
        "/ws/echo",
        "/ws/chat",
        f"/ws/chat/{room_name()}",
        f"/ws/secure?token={GOOD_TOKEN}",
        "/ws/methods_text",
        "/ws/methods_bytes",
        "/ws/methods_json",
        "/ws/methods_raw",
        "/ws/stream?count=5&interval=1",
    ]
    for path in paths:
        async with ws_connect(server, path) as ws:
            pass
        assert ws.close_code == 1000, path
    await server.await_stats(lambda s: s["connections"] == 0, what="all closed")
