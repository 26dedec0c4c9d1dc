"""Bad input ends one connection with a clear close code, one log line, and nothing else.

Each case here fails on the guide's original code (which raises inside the handler and closes
with 1011 or a traceback, or has no size limit at all).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from helpers import (
    GOOD_TOKEN,
    LEFT,
    TIMEOUT,
    async_wait_until,
    close_code_lines,
    recv,
    recv_until_closed,
    ws_connect,
)
from servers import AppServer, serve

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

SMALL_LIMIT = 65536
DEFAULT_LIMIT = 1048576


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def small_server(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, max_message_size=SMALL_LIMIT) as srv:
        yield srv


def unique_room() -> str:
    return f"/ws/chat/by-{uuid.uuid4().hex[:12]}"


@dataclass
class Bystanders:
    echo: ClientConnection
    member: ClientConnection

    async def still_work(self) -> None:
        await self.echo.send("still here")
        assert await recv(self.echo) == "Echo: still here"
        await self.member.send("still here")
        assert await recv(self.member) == "Client says: still here"


@asynccontextmanager
async def bystanders(server: AppServer, chat_path: str) -> AsyncIterator[Bystanders]:
    await server.await_stats(lambda s: s["connections"] == 0, what="an idle server")
    async with (
        ws_connect(server, "/ws/echo") as echo,
        ws_connect(server, chat_path) as member,
    ):
        await server.await_stats(lambda s: s["connections"] == 2, what="two bystanders")
        yield Bystanders(echo, member)


async def provoke(
    server: AppServer,
    path: str,
    payload: str | bytes,
    code: int,
    *,
    same_room: bool = False,
    greeting: bool = False,
    **connect_kwargs: Any,
) -> str:
    """Connect to ``path`` beside two bystanders, send ``payload``, expect close ``code``.

    Returns the close reason. Checks the log line, the traceback-free log and the bystanders.
    """
    chat_path = path if same_room else unique_room()
    async with bystanders(server, chat_path) as by:
        offset = server.log_offset()
        async with ws_connect(server, path, **connect_kwargs) as bad:
            if greeting:
                assert (await recv(bad)).startswith("Hello, ")
            if same_room:
                await server.await_stats(lambda s: s["chat_members"] == 2, what="bad one joined")
            # A server that refuses a big message early may close while we are still sending.
            with contextlib.suppress(ConnectionClosed):
                await bad.send(payload)
            leftovers = await recv_until_closed(bad, within=2 * TIMEOUT)
        assert leftovers == []
        assert bad.close_code == code, (bad.close_code, bad.close_reason)
        reason = bad.close_reason or ""

        # The bad connection is gone, the server logged it once, the others carry on.
        await server.await_stats(lambda s: s["connections"] == 2, what="bad connection gone")
        await async_wait_until(
            lambda: close_code_lines(server.log_since(offset), code),
            what=f"a log line with conn= and {code}",
        )
        if same_room:
            assert await recv(by.member) == LEFT
            await server.await_stats(lambda s: s["chat_members"] == 1, what="bad one removed")
        await by.still_work()
        lines = close_code_lines(server.log_since(offset), code)
        assert len(lines) == 1, lines
        assert "Traceback" not in server.log()
    return reason


# -- wrong frame type: 1003 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/ws/echo", "/ws/methods_text", "/ws/methods_json", "/ws/chat", "chat-room"],
)
async def test_bytes_on_text_endpoint(server: AppServer, path: str) -> None:
    if path == "chat-room":
        path = unique_room()
    reason = await provoke(
        server, path, b"\x00binary\xff", 1003, same_room=path.startswith("/ws/chat")
    )
    assert "text" in reason.lower(), reason


async def test_bytes_on_secure(server: AppServer) -> None:
    reason = await provoke(server, f"/ws/secure?token={GOOD_TOKEN}", b"binary", 1003, greeting=True)
    assert "text" in reason.lower(), reason


async def test_text_on_methods_bytes(server: AppServer) -> None:
    reason = await provoke(server, "/ws/methods_bytes", "some text", 1003)
    assert "binary" in reason.lower() or "bytes" in reason.lower(), reason


# -- invalid JSON: 1007 ------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["{not json", "[1, 2", "", "{'single': 1}"])
async def test_invalid_json(server: AppServer, payload: str) -> None:
    reason = await provoke(server, "/ws/methods_json", payload, 1007)
    assert reason.strip(), "1007 must carry the parser's reason"


# -- too big: 1009 -----------------------------------------------------------------------------

BIG_CASES = [
    ("/ws/echo", "text"),
    ("/ws/methods_bytes", "bytes"),
    ("/ws/methods_raw", "bytes"),
    ("/ws/methods_raw", "text"),
    ("/ws/chat", "text"),
]


def sized(kind: str, size: int) -> str | bytes:
    return b"b" * size if kind == "bytes" else "t" * size


def expected_reply(path: str, payload: str | bytes) -> str | bytes:
    if path == "/ws/echo":
        return f"Echo: {payload!s}"
    if path == "/ws/methods_bytes":
        assert isinstance(payload, bytes)
        return b"Server received: " + payload
    if path == "/ws/methods_raw":
        return b"Raw echo: " + payload if isinstance(payload, bytes) else f"Raw echo: {payload}"
    return f"Client says: {payload!s}"


@pytest.mark.parametrize(("path", "kind"), BIG_CASES)
async def test_one_byte_over_limit(small_server: AppServer, path: str, kind: str) -> None:
    await provoke(
        small_server,
        path,
        sized(kind, SMALL_LIMIT + 1),
        1009,
        same_room=path == "/ws/chat",
        compression=None,
    )


async def test_over_limit_compressed(small_server: AppServer) -> None:
    """The limit applies to the message, not to its compressed size on the wire."""
    await provoke(small_server, "/ws/echo", "z" * (SMALL_LIMIT + 1), 1009)


@pytest.mark.parametrize(("path", "kind"), BIG_CASES)
async def test_exactly_at_limit_accepted(small_server: AppServer, path: str, kind: str) -> None:
    payload = sized(kind, SMALL_LIMIT)
    async with ws_connect(small_server, path, max_size=None, compression=None) as ws:
        await ws.send(payload)
        assert await recv(ws) == expected_reply(path, payload)
        await ws.send(payload[:10])
        assert await recv(ws) == expected_reply(path, payload[:10])


async def test_default_limit_one_byte_over(server: AppServer) -> None:
    await provoke(server, "/ws/echo", "d" * (DEFAULT_LIMIT + 1), 1009, compression=None)


async def test_default_limit_exactly_accepted(server: AppServer) -> None:
    payload = "d" * DEFAULT_LIMIT
    async with ws_connect(server, "/ws/echo", max_size=None, compression=None) as ws:
        await ws.send(payload)
        assert await recv(ws, within=2 * TIMEOUT) == f"Echo: {payload}"
