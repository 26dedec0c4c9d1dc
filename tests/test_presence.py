"""Presence lists the clients subscribed now, never one that has left.

A client the server closes (cut for reading too slowly, its token expired, disconnected through
the API) while its ``subscribe`` still waits on the broker leaves its channels at once: the
subscription ends and its presence entry is removed. The subscribe, when the broker answers,
must not add the entry again; on a shared broker the node's heartbeat would then keep that
ghost alive for the node's whole life.

The in-process tests make the race deterministic: the node's broker is a real one (each
backend) whose chosen call waits at a gate the test opens. The last test does the same through
a whole server (in-process, on both WebSocket implementations) and a real Redis paused by
``CLIENT PAUSE ... WRITE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from helpers import TIMEOUT, async_wait_until, recv_until_closed
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401 (a fixture)
    unique_prefix,
)
from roomcast.brokers import Broker, MemoryBroker
from roomcast.brokers.redis import RedisBroker
from roomcast.connection import Connection
from roomcast.core.node import Node
from roomcast.core.session import Session
from roomcast.http.channels import ChannelRequests
from roomcast.settings import Settings
from servers import AppServer, Peer, ServerStarter, in_server_loop, peer

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]

#: The presence TTL of the in-process Redis brokers: short, so that a test can outlive it.
PRESENCE_TTL = 0.3


def channel() -> str:
    return f"presence:{uuid.uuid4().hex[:12]}"


class Gate:
    """Where a held broker call waits: ``entered`` once it is waiting, until ``opened``."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()


class GatedBroker:
    """A real broker whose ``subscribe`` / ``position`` / ``history`` / ``presence_add`` calls
    can be held at a gate.

    Everything else goes straight to the broker inside; presence removals are recorded once
    done, so that a test knows when a departure has reached the broker.
    """

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.gates: dict[str, Gate] = {}
        self.removed: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def hold(self, method: str) -> Gate:
        """Hold the next call of ``method`` until the gate opens."""
        gate = self.gates[method] = Gate()
        return gate

    async def _pass(self, method: str) -> None:
        gate = self.gates.pop(method, None)
        if gate is not None:
            gate.entered.set()
            await gate.opened.wait()

    async def subscribe(self, channel: str) -> None:
        await self._pass("subscribe")
        await self.inner.subscribe(channel)

    async def position(self, channel: str) -> Any:
        await self._pass("position")
        return await self.inner.position(channel)

    async def history(self, channel: str, **kwargs: Any) -> Any:
        await self._pass("history")
        return await self.inner.history(channel, **kwargs)

    async def presence_add(self, channel: str, client: str, entry: dict[str, Any]) -> None:
        await self._pass("presence_add")
        await self.inner.presence_add(channel, client, entry)

    async def presence_remove(self, channel: str, client: str) -> None:
        await self.inner.presence_remove(channel, client)
        self.removed.append((channel, client))


class FakeConn:
    """The ASGI side of one in-process ``/ws`` connection: what the server sent to it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.conn = Connection(
            {"type": "websocket", "path": "/ws", "headers": []},
            self._receive,
            self._send,
            max_size=1 << 20,
        )
        self.conn.opened = True

    async def _receive(self) -> dict[str, Any]:
        raise AssertionError("the node never reads a connection itself")

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def frames(self) -> list[dict[str, Any]]:
        return [orjson.loads(m["text"]) for m in self.sent if m["type"] == "websocket.send"]


class Gated:
    """A started node on a gated broker, and its ``/ws`` protocol."""

    def __init__(self, node: Node, broker: GatedBroker) -> None:
        self.node = node
        self.broker = broker
        self.requests = ChannelRequests(node)

    def attach(self, user: str) -> tuple[Session, FakeConn]:
        fake = FakeConn()
        return self.requests.attach(fake.conn, user), fake

    async def request(self, session: Session, **body: Any) -> None:
        await self.requests.handle(session, orjson.dumps(body).decode())


@pytest.fixture(params=BACKENDS)
async def gated(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Gated]:
    """A started node on a gated broker (``memory://`` or a real Redis)."""
    inner: Broker
    if request.param == "memory":
        inner = MemoryBroker(history_size=100, history_ttl=3600, history_channels=1000)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        inner = RedisBroker(
            server.url_for(unique_prefix("presence")),
            history_size=100,
            history_ttl=3600,
            presence_ttl=PRESENCE_TTL,
        )
    broker = GatedBroker(inner)
    node = Node(Settings(), broker)  # type: ignore[arg-type]
    await node.start()
    await async_wait_until(lambda: inner.available, 2 * TIMEOUT, "the broker to connect")
    try:
        yield Gated(node, broker)
    finally:
        for session in list(node.sessions.values()):
            await node.detach(session, notify=False)
        await node.stop()


def listed(entries: list[dict[str, Any]]) -> list[str]:
    return [e["client"] for e in entries]


async def leave(node: Node, session: Session, how: str) -> None:
    """Have the server close ``session`` the way ``how`` says."""
    if how == "disconnect":
        assert session.user is not None
        assert await node.disconnect_user(session.user) == 1
    else:
        node.cut(session)  # what an outbox overflow does
    assert not session.active


@pytest.mark.parametrize(
    ("held", "company"),
    [
        ("subscribe", False),
        ("position", False),
        ("position", True),
        ("history", True),
        ("presence_add", True),
    ],
    ids=[
        "subscribe-alone",
        "position-alone",
        "position-with-company",
        "history-with-company",
        "presence_add-with-company",
    ],
)
@pytest.mark.parametrize("how", ["disconnect", "cut"])
async def test_a_client_closed_while_its_subscribe_waits_stays_out_of_presence(
    gated: Gated, held: str, company: bool, how: str
) -> None:
    node, broker = gated.node, gated.broker
    ch = channel()
    watcher: Session | None = None
    watcher_conn: FakeConn | None = None
    if company:
        # Another local subscriber, who hears joins and leaves: the channel stays this node's.
        watcher, watcher_conn = gated.attach("bob")
        await gated.request(watcher, id=1, op="subscribe", channel=ch, join_leave=True)
        assert listed(await broker.presence(ch)) == [watcher.id]

    alice, _ = gated.attach("alice")
    gate = broker.hold(held)
    body: dict[str, Any] = {"id": 1, "op": "subscribe", "channel": ch}
    if held == "history":
        body["recover"] = {"offset": 0, "epoch": "gone"}
    subscribing = asyncio.create_task(gated.request(alice, **body))
    async with asyncio.timeout(TIMEOUT):
        await gate.entered.wait()

    await leave(node, alice, how)
    await async_wait_until(lambda: (ch, alice.id) in broker.removed, what="alice's departure")
    gate.opened.set()
    async with asyncio.timeout(TIMEOUT):
        await subscribing

    expected = [] if watcher is None else [watcher.id]
    assert listed(await broker.presence(ch)) == expected, "alice is listed after she left"
    assert alice.subscriptions == {}
    if isinstance(broker.inner, RedisBroker):
        assert alice.id not in broker.inner._mine.get(ch, {}), "alice kept by the heartbeat"
        # Past the TTL the heartbeat has run several times: still only who is there.
        deadline = time.monotonic() + 3 * PRESENCE_TTL
        while time.monotonic() < deadline:
            assert listed(await broker.presence(ch)) == expected, "alice came back"
            await asyncio.sleep(PRESENCE_TTL / 6)

    if watcher is not None and watcher_conn is not None:
        # A marker publication, delivered after any event alice's subscribe emitted.
        await gated.request(watcher, id=2, op="publish", channel=ch, data="marker")

        def marker_arrived() -> bool:
            return any(f.get("data") == "marker" for f in watcher_conn.frames())

        await async_wait_until(marker_arrived, what="the marker publication")
        events = [
            f["type"]
            for f in watcher_conn.frames()
            if f.get("type") in ("join", "leave") and f["info"]["client"] == alice.id
        ]
        assert "join" not in events, f"bob heard alice join after she left: {events}"


class Quiet:
    """A sink for a broker alone: deliveries are not what these tests look at."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


@pytest.mark.redis
async def test_the_heartbeat_refreshes_only_the_channels_the_node_delivers(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(
        redis_server.url_for(unique_prefix("presence")),
        history_size=100,
        history_ttl=3600,
        presence_ttl=PRESENCE_TTL,
    )
    await broker.start(Quiet())  # type: ignore[arg-type]
    try:
        gone, kept = channel(), channel()
        for ch, client in ((gone, "aaaaaaaaaaaa"), (kept, "bbbbbbbbbbbb")):
            await broker.subscribe(ch)
            entry = {"client": client, "user": None, "connected_at": "2026-01-01T00:00:00.000Z"}
            await broker.presence_add(ch, client, entry)
        # The node's last subscriber of `gone` left, but an entry of it stayed behind (as a
        # subscribe that raced the departure used to leave one): no client of this node is in
        # `gone` any more, so the heartbeat must not keep that entry alive.
        await broker.unsubscribe(gone)

        async def gone_is_empty() -> bool:
            return await broker.presence(gone) == []

        await async_wait_until(gone_is_empty, 2 * TIMEOUT, "the stale entry to go")
        assert gone not in broker._mine
        deadline = time.monotonic() + 3 * PRESENCE_TTL
        while time.monotonic() < deadline:
            assert await broker.presence(gone) == []
            assert listed(await broker.presence(kept)) == ["bbbbbbbbbbbb"]  # still refreshed
            await asyncio.sleep(PRESENCE_TTL / 6)
    finally:
        await broker.close()


class SwallowingBroker(RedisBroker):
    """A broker whose presence refresh swallows a cancellation, as redis-py 8.1 can.

    (redis-py may finish a pipeline normally although the task running it was cancelled during
    it: about one cancel in six, cancelling a pipeline of 20 HSETs at a random moment.)
    """

    refreshing: asyncio.Event

    async def _refresh_presence(self) -> None:
        self.refreshing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)  # a pipeline in flight


@pytest.mark.redis
async def test_close_stops_a_heartbeat_whose_cancellation_was_swallowed(
    redis_server: RedisServer,
) -> None:
    broker = SwallowingBroker(
        redis_server.url_for(unique_prefix("presence")),
        history_size=100,
        history_ttl=3600,
        presence_ttl=PRESENCE_TTL,
    )
    broker.refreshing = asyncio.Event()
    await broker.start(Quiet())  # type: ignore[arg-type]
    tasks = list(broker._tasks)
    async with asyncio.timeout(TIMEOUT):
        await broker.refreshing.wait()
    # The server stopping closes its broker: that must end, not wait for the heartbeat forever.
    closing = asyncio.create_task(broker.close())
    done, _ = await asyncio.wait({closing}, timeout=TIMEOUT)
    if not done:
        # Let the failure be reported: cancel the heartbeat again (it swallows one cancel per
        # refresh), a bounded number of times, so that close() and the event loop can end.
        for _ in range(100):
            pending = [task for task in tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.05)
    await closing
    assert done, "close() waited for a heartbeat whose cancellation was swallowed"


# -- a whole server and a real Redis ---------------------------------------------------------------

API_KEY = "presence-api-key"


async def api(server: AppServer, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=2 * TIMEOUT) as http:
        reply = await http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert reply.status_code == 200, (path, reply.status_code, reply.text)
    return reply.json()


async def presence_of(server: AppServer, ch: str) -> list[str]:
    return [e["client"] for e in (await api(server, "GET", f"/api/presence/{ch}"))["clients"]]


def paused_script(server: RedisServer) -> Callable[[], bool]:
    """Whether a client of ``server`` waits to run a script (held by ``CLIENT PAUSE``)."""

    def check() -> bool:
        with server.client() as conn:
            return any(
                "b" in c["flags"] and c["cmd"] in ("evalsha", "eval") for c in conn.client_list()
            )

    return check


@pytest.mark.redis
@in_server_loop
async def test_api_disconnect_during_a_subscribe_leaves_no_ghost(
    redis_server: RedisServer, start_server: ServerStarter
) -> None:
    ttl = 1
    server = await start_server(
        broker_url=redis_server.url_for(unique_prefix("presence")),
        api_key=API_KEY,
        tokens={"alice-token": "alice", "bob-token": "bob"},
        presence_ttl=ttl,
    )
    ch = channel()
    async with peer(server, "/ws?token=bob-token") as bob:
        await bob.ok("subscribe", channel=ch)
        async with peer(server, "/ws?token=alice-token") as alice:
            await subscribe_while_paused(server, redis_server, alice, ch)
        # Alice's handler ends (and /stats counts her out) only after her subscribe did.
        await server.await_stats(lambda s: s["ws_clients"] == 1, what="alice to be gone")
        assert await presence_of(server, ch) == [bob.client], "alice listed after she left"
        deadline = time.monotonic() + 2 * ttl
        while time.monotonic() < deadline:
            assert await presence_of(server, ch) == [bob.client], "alice came back"
            await asyncio.sleep(0.1)
        await bob.still_works()
    server.assert_no_traceback()


async def subscribe_while_paused(
    server: AppServer, redis_server: RedisServer, alice: Peer, ch: str
) -> None:
    """Alice subscribes while Redis holds writes; the API disconnects her meanwhile."""
    with redis_server.client() as conn:
        # Below the broker's socket timeout (5 s), so the held call completes, not fails.
        conn.execute_command("CLIENT", "PAUSE", 4000, "WRITE")
    disconnecting: asyncio.Task[Any] | None = None
    try:
        await alice.send({"id": 1, "op": "subscribe", "channel": ch})
        await async_wait_until(paused_script(redis_server), what="the subscribe to wait on Redis")
        # The node closes alice at once; the command to the other nodes waits for Redis.
        disconnecting = asyncio.create_task(
            api(server, "POST", "/api/disconnect", {"user": "alice"})
        )
        await recv_until_closed(alice.ws)
        assert alice.ws.close_code == 4001, (alice.ws.close_code, alice.ws.close_reason)
    finally:
        with redis_server.client() as conn:
            conn.execute_command("CLIENT", "UNPAUSE")
    assert (await wait_for(disconnecting))["disconnected"] == 1


async def wait_for(task: Awaitable[Any] | None) -> Any:
    assert task is not None
    async with asyncio.timeout(2 * TIMEOUT):
        return await task
