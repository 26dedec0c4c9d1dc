"""The Python client SDK (``roomcast.connect``) against in-process servers on both WebSocket
implementations.

The reconnect tests break the connection for real: a server stopped and a new one started on
the same port, a TCP proxy that resets every connection, a server that cuts a slow reader.
In each, the application reads one subscription and checks it saw every publication the server
still held, once each, in order.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

import roomcast
from helpers import GOOD_TOKEN, TIMEOUT, USER, async_wait_until
from roomcast.client import Disconnected, Presence, Publication, ServerError, Subscription
from servers import AppServer, ServerStarter, serve
from tcpproxy import TcpProxy

# In-process servers serve in the module's event loop (tests/servers.py), and so do the
# clients under test.
pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "test-api-key"
FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "request_timeout": 4 * TIMEOUT}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api_server(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, api_key=API_KEY) as srv:
        yield srv


async def api_publish(http_url: str, channel: str, data: Any) -> int:
    async with httpx.AsyncClient(base_url=http_url, timeout=TIMEOUT) as http:
        reply = await http.post(
            "/api/publish",
            json={"channel": channel, "data": data},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert reply.status_code == 200, reply.text
    offset: int = reply.json()["offset"]
    return offset


async def take(subscription: Subscription, n: int) -> list[Publication]:
    """The next ``n`` publications of ``subscription`` (presence events skipped)."""
    got: list[Publication] = []
    async with asyncio.timeout(4 * TIMEOUT):
        async for item in subscription:
            if isinstance(item, Publication):
                got.append(item)
                if len(got) == n:
                    break
    return got


async def test_operations_round_trip(api_server: AppServer) -> None:
    url = api_server.url("/ws")
    async with (
        roomcast.connect(url, token=GOOD_TOKEN, **FAST) as alice,
        roomcast.connect(url, **FAST) as bob,
    ):
        assert alice.user == USER
        assert bob.user is None
        assert alice.client_id
        assert bob.client_id
        assert alice.client_id != bob.client_id
        lobby = await alice.subscribe("sdk:lobby", join_leave=True)
        bobs = await bob.subscribe("sdk:lobby")
        joined = await asyncio.wait_for(anext(lobby), TIMEOUT)
        assert joined == Presence("sdk:lobby", "join", {"client": bob.client_id, "user": None})

        first = await bob.publish("sdk:lobby", {"text": "hi"})
        second = await alice.publish("sdk:lobby", [1, 2, 3])
        assert second == first + 1
        for sub in (lobby, bobs):
            got = await take(sub, 2)
            assert [(p.offset, p.data) for p in got] == [
                (first, {"text": "hi"}),
                (second, [1, 2, 3]),
            ]
            assert got[0].info == {"client": bob.client_id, "user": None}
            assert got[1].info == {"client": alice.client_id, "user": USER}

        clients = await bob.presence("sdk:lobby")
        assert [c["client"] for c in clients] == [alice.client_id, bob.client_id]
        history = await bob.history("sdk:lobby", limit=1)
        assert [p.offset for p in history] == [second]
        await bob.ping()

        with pytest.raises(ServerError) as caught:
            await bob.publish("not a channel", 1)
        assert caught.value.code == "bad_channel"

        await bobs.unsubscribe()
        left = await asyncio.wait_for(anext(lobby), TIMEOUT)
        assert left == Presence("sdk:lobby", "leave", {"client": bob.client_id, "user": None})
        assert [item async for item in bobs] == []  # an unsubscribed iterator ends


async def test_bad_token_is_refused_without_retrying(api_server: AppServer) -> None:
    with pytest.raises(Disconnected, match="403"):
        async with roomcast.connect(api_server.url("/ws"), token="wrong", **FAST):
            pass


async def test_disconnect_through_the_api_ends_the_client(api_server: AppServer) -> None:
    async with roomcast.connect(api_server.url("/ws"), token=GOOD_TOKEN, **FAST) as client:
        sub = await client.subscribe("sdk:kick")
        async with httpx.AsyncClient(base_url=api_server.http_url, timeout=TIMEOUT) as http:
            reply = await http.post(
                "/api/disconnect", json={"user": USER}, headers={"X-API-Key": API_KEY}
            )
        assert reply.json()["disconnected"] >= 1
        with pytest.raises(Disconnected, match="4001"):
            await asyncio.wait_for(anext(sub), TIMEOUT)
        assert client.state == "closed"
        assert client.connections == 1  # it did not come back


async def test_recovers_through_dropped_connections(api_server: AppServer) -> None:
    """The network fails three times; publications made meanwhile arrive once each, in order."""
    async with (
        TcpProxy(api_server.port) as proxy,
        roomcast.connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
    ):
        sub = await client.subscribe("sdk:flaky")
        sent: list[int] = []
        for round_ in range(3):
            for i in range(10):
                sent.append(await api_publish(api_server.http_url, "sdk:flaky", [round_, i]))
            proxy.down = True
            proxy.cut()
            # Published while the client cannot connect: only recovery can deliver these.
            for i in range(10, 20):
                sent.append(await api_publish(api_server.http_url, "sdk:flaky", [round_, i]))
            proxy.down = False
        got = await take(sub, len(sent))
        assert [p.offset for p in got] == sent == list(range(1, 61))
        assert [p.data for p in got] == [[r, i] for r in range(3) for i in range(20)]
        assert client.connections == 4
        assert sub.recoveries == 3
        assert sub.gaps == 0
        # Nothing more is pending: the next one is the next publication, not a duplicate.
        after = await api_publish(api_server.http_url, "sdk:flaky", "last")
        assert [p.offset for p in await take(sub, 1)] == [after]


async def test_reconnects_through_a_server_restart(ws_impl: str) -> None:
    """The memory broker's history dies with the server: the client gets all of the new one."""
    async with AsyncExitStack() as first_life:
        first = await first_life.enter_async_context(serve(ws_impl, api_key=API_KEY))
        port = first.port
        async with roomcast.connect(first.url("/ws"), **FAST) as client:
            sub = await client.subscribe("sdk:restart")
            before = [await api_publish(first.http_url, "sdk:restart", f"a{i}") for i in range(20)]
            assert [p.data for p in await take(sub, 20)] == [f"a{i}" for i in range(20)]
            assert before == list(range(1, 21))

            await first_life.aclose()  # the first server stops; the client stays
            async with serve(ws_impl, port=port, api_key=API_KEY) as second:
                # Published on the new server, maybe before the client is back: it must get them.
                during = [
                    await api_publish(second.http_url, "sdk:restart", f"b{i}") for i in range(5)
                ]
                await async_wait_until(lambda: client.connections == 2, what="the reconnect")
                after = [
                    await api_publish(second.http_url, "sdk:restart", f"c{i}") for i in range(5)
                ]
                got = await take(sub, 10)
                assert [p.offset for p in got] == during + after == list(range(1, 11))
                assert [p.data for p in got] == [f"b{i}" for i in range(5)] + [
                    f"c{i}" for i in range(5)
                ]
                # A new epoch: what the old server held is gone, and it says so.
                assert sub.gaps == 1


async def test_cut_for_reading_slowly_then_recovers(start_server: ServerStarter) -> None:
    """An application that stops reading gets its connection cut (4008), then catches up."""
    srv = await start_server(api_key=API_KEY, outbox_size=64, history_size=64)
    # Random text: uvicorn's WebSocket protocol compresses (permessage-deflate), and "x" * n
    # would shrink to nothing and never fill a buffer.
    payload = secrets.token_urlsafe(12_000)
    async with roomcast.connect(srv.url("/ws"), max_queue=8, **FAST) as client:
        sub = await client.subscribe("sdk:slow")
        # Nobody reads `sub`: the client's queue fills, it stops reading the socket, the kernel
        # buffers fill, then the server's outbox; the server cuts it.
        total = 0
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=TIMEOUT) as http:
            for _ in range(2000):
                reply = await http.post(
                    "/api/publish",
                    json={"channel": "sdk:slow", "data": payload},
                    headers={"X-API-Key": API_KEY},
                )
                total = reply.json()["offset"]
                if "cut 4008" in srv.log():
                    break
        assert "cut 4008" in srv.log(), "the server never cut the slow reader"
        # Now read everything: offsets strictly increase (no duplicate), and every publication
        # the history still holds (the last 64) is there.
        seen: list[int] = []
        try:
            async with asyncio.timeout(4 * TIMEOUT):
                while not seen or seen[-1] < total:
                    item = await anext(sub)
                    assert isinstance(item, Publication)
                    seen.append(item.offset)
        except TimeoutError:
            pytest.fail(
                f"caught up to {seen[-1] if seen else None} of {total} "
                f"({len(seen)} read, {client.connections} connections, state {client.state})"
            )
        assert seen == sorted(set(seen))
        assert set(range(total - 63, total + 1)) <= set(seen)
        assert client.connections >= 2


async def test_requests_wait_for_the_reconnect(api_server: AppServer) -> None:
    async with (
        TcpProxy(api_server.port) as proxy,
        roomcast.connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
    ):
        proxy.down = True
        proxy.cut()
        await async_wait_until(lambda: client.state == "reconnecting", what="the drop")
        publish = asyncio.ensure_future(client.publish("sdk:wait", "queued"))
        await asyncio.sleep(0.2)
        assert not publish.done()
        proxy.down = False
        offset = await asyncio.wait_for(publish, 4 * TIMEOUT)
        history = await client.history("sdk:wait")
        assert [(p.offset, p.data) for p in history] == [(offset, "queued")]


async def test_token_function_refreshes_before_expiry(start_server: ServerStarter) -> None:
    """With ``token=`` a function, the client answers the server's ``refresh`` push with a
    fresh token (``auth``): the connection outlives the first token's ``exp``."""
    secret = secrets.token_hex(16)
    server = await start_server(jwt_secret=secret, refresh_ahead=1.5)
    issued: list[float] = []

    async def fresh_token() -> str:
        exp = time.time() + 2.5
        issued.append(exp)
        claims = {"sub": "carol", "exp": int(exp) + 1, "subscribe": ["*"], "publish": ["*"]}
        return jwt.encode(claims, secret, algorithm="HS256")

    async with roomcast.connect(server.url("/ws"), token=fresh_token) as client:
        assert client.user == "carol"
        first_exp = issued[0]
        await asyncio.sleep(max(0.0, first_exp + 1.5 - time.time()))
        await client.ping()  # still the first connection, past the first token's expiry
        assert client.connections == 1
        assert len(issued) >= 2
