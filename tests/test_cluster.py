"""Scale-out: roomcast nodes sharing one real ``redis-server``.

Three nodes on three ports form one cluster: a `/ws` client of any node sees the channels,
offsets, presence, history and HTTP API of all of them, and the guide's chat rooms span them.
The nodes are in-process servers (on each WebSocket implementation): what they share goes
through Redis alone. Then one ``roomcast serve --workers 4`` process, whose workers share the
broker the same way.

The `/ws` client used here is the suite's ``Peer`` (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection

from helpers import (
    GOOD_TOKEN,
    HOST,
    LEFT,
    TIMEOUT,
    USER,
    RoomcastServer,
    async_wait_until,
    free_port,
    recv,
    recv_until_closed,
    wait_until,
    ws_connect,
)
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401 (a fixture)
    unique_prefix,
)
from servers import AppServer, Peer, channel, in_server_loop, peer, publication, serve
from tcpproxy import TcpProxy

pytestmark = pytest.mark.redis

KEY = "cluster-api-key"
TOKENS = {GOOD_TOKEN: USER, "alice-token": "alice", "bob-token": "bob"}
API_INFO = {"client": None, "user": None}
SAYS = "Client says: "


async def await_ready(server: AppServer, within: float = 2 * TIMEOUT) -> None:
    """Wait until ``/readyz`` says the node reaches its broker."""

    async def ready() -> bool:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return (await http.get(f"{server.http_url}/readyz")).status_code == 200

    await async_wait_until(ready, within, f"{server.http_url}/readyz to answer 200")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(ws_impl: str, redis_server: RedisServer) -> AsyncIterator[list[AppServer]]:
    """Three nodes (A, B, C) on one Redis, with the HTTP API on and three users' tokens."""
    broker = redis_server.url_for(unique_prefix("cluster"))
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                serve(ws_impl, broker_url=broker, api_key=KEY, tokens=TOKENS)
            )
            for _ in "ABC"
        ]
        for node in nodes:
            await await_ready(node)
        yield nodes


async def api(server: AppServer, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
        reply = await http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
    assert reply.status_code == 200, (path, reply.status_code, reply.text)
    return reply.json()


@asynccontextmanager
async def peers(
    servers: Sequence[AppServer], tokens: Sequence[str | None] = ()
) -> AsyncIterator[list[Peer]]:
    """One `/ws` peer per server (``tokens[i]`` for the i-th, if given)."""
    async with AsyncExitStack() as stack:
        opened = []
        for i, server in enumerate(servers):
            token = tokens[i] if i < len(tokens) else None
            path = f"/ws?token={token}" if token else "/ws"
            opened.append(await stack.enter_async_context(peer(server, path)))
        yield opened


# -- channels across nodes -----------------------------------------------------------------------


@in_server_loop
async def test_a_publication_reaches_subscribers_on_every_node(
    cluster: list[AppServer],
) -> None:
    ch = channel("cl")
    a, b, c = cluster
    async with peers([a, a, b, c]) as (pub, *subs):
        epochs = {(await s.ok("subscribe", channel=ch))["epoch"] for s in subs}
        assert len(epochs) == 1
        result = await pub.ok("publish", channel=ch, data={"text": "hi"})
        assert result == {"epoch": epochs.pop(), "offset": 1}
        expected = publication(ch, 1, {"text": "hi"}, pub.info)
        for sub in subs:
            assert await sub.publications(1) == [expected]
        for sub in subs:
            await sub.still_works()


@in_server_loop
async def test_offsets_are_cluster_wide(cluster: list[AppServer]) -> None:
    ch = channel("cl")
    n = 30
    async with peers(cluster) as pubs, peers(cluster) as subs:
        for sub in subs:
            await sub.ok("subscribe", channel=ch)
        offsets = []
        for i in range(n):
            offsets.append((await pubs[i % 3].ok("publish", channel=ch, data=i))["offset"])
        assert offsets == list(range(1, n + 1))
        expected = [publication(ch, i + 1, i, pubs[i % 3].info) for i in range(n)]
        for sub in subs:
            assert await sub.publications(n) == expected
            await sub.still_works()


@in_server_loop
async def test_presence_lists_the_members_of_every_node(cluster: list[AppServer]) -> None:
    ch = channel("cl")
    async with peers(cluster, tokens=["alice-token", "bob-token", None]) as subs:
        for sub in subs:
            await sub.ok("subscribe", channel=ch)
        expected = [(s.client, s.hello["user"]) for s in subs]
        assert [user for _, user in expected] == ["alice", "bob", None]
        for node, sub in zip(cluster, subs, strict=True):
            clients = (await sub.ok("presence", channel=ch))["clients"]
            assert [(e["client"], e["user"]) for e in clients] == expected
            assert all(set(e) == {"client", "user", "connected_at"} for e in clients)
            assert await api(node, "GET", f"/api/presence/{ch}") == {"clients": clients}
            listed = (await api(node, "GET", "/api/channels"))["channels"]
            assert {"channel": ch, "subscribers": 3} in listed
        await subs[1].ok("unsubscribe", channel=ch)
        for sub in (subs[0], subs[2]):
            clients = (await sub.ok("presence", channel=ch))["clients"]
            assert [e["client"] for e in clients] == [subs[0].client, subs[2].client]


@in_server_loop
async def test_join_and_leave_cross_nodes(cluster: list[AppServer]) -> None:
    ch = channel("cl")
    a, b, c = cluster
    async with peer(a) as watcher, peer(b, "/ws?token=bob-token") as bob:
        await watcher.ok("subscribe", channel=ch, join_leave=True)
        await bob.ok("subscribe", channel=ch)
        bob_info = {"client": bob.client, "user": "bob"}
        assert await watcher.push() == {"type": "join", "channel": ch, "info": bob_info}
        await bob.ok("unsubscribe", channel=ch)
        assert await watcher.push() == {"type": "leave", "channel": ch, "info": bob_info}

        async with peer(c) as carol:
            await carol.ok("subscribe", channel=ch)
            carol_info = {"client": carol.client, "user": None}
            assert await watcher.push() == {"type": "join", "channel": ch, "info": carol_info}
            carol.ws.transport.abort()  # gone without a close frame
        assert await watcher.push() == {"type": "leave", "channel": ch, "info": carol_info}
        await watcher.still_works()


@in_server_loop
async def test_recover_on_another_node(cluster: list[AppServer]) -> None:
    ch = channel("cl")
    a, b, c = cluster
    async with peer(c) as pub:
        sent = []

        async def publish(k: int) -> None:
            for _ in range(k):
                data = {"k": len(sent)}
                offset = (await pub.ok("publish", channel=ch, data=data))["offset"]
                assert offset == len(sent) + 1
                sent.append(publication(ch, offset, data, pub.info))

        async with peer(a) as sub:
            epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
            await publish(3)
            assert await sub.publications(3) == sent
        await publish(12)  # missed while away
        async with peer(b) as back:
            result = await back.ok("subscribe", channel=ch, recover={"offset": 3, "epoch": epoch})
            assert result == {"epoch": epoch, "offset": 15, "recovered": True, "replayed": 12}
            assert await back.publications(12) == sent[3:]
            await publish(5)  # then the live ones, with no gap
            assert await back.publications(5) == sent[15:]
            await back.still_works()
            for node in (a, b):
                history = await api(node, "GET", f"/api/history/{ch}?limit=1000")
                assert history == {"epoch": epoch, "offset": 20, "start": 1, "publications": sent}


@in_server_loop
async def test_http_api_publish_reaches_other_nodes(cluster: list[AppServer]) -> None:
    first, second = channel("cl"), channel("cl")
    a, b, c = cluster
    async with peers([b, c]) as subs:
        for sub in subs:
            await sub.ok("subscribe", channel=first)
        await subs[0].ok("subscribe", channel=second)
        result = await api(a, "POST", "/api/publish", {"channel": first, "data": {"from": "api"}})
        assert result["offset"] == 1
        for sub in subs:
            assert await sub.publications(1) == [publication(first, 1, {"from": "api"}, API_INFO)]
        broadcast = await api(
            c, "POST", "/api/broadcast", {"channels": [first, second], "data": "both"}
        )
        assert [(r["channel"], r["offset"]) for r in broadcast["results"]] == [
            (first, 2),
            (second, 1),
        ]
        got = await subs[0].publications(2)
        assert sorted(got, key=lambda f: f["channel"] == second) == [
            publication(first, 2, "both", API_INFO),
            publication(second, 1, "both", API_INFO),
        ]
        assert await subs[1].publications(1) == [publication(first, 2, "both", API_INFO)]
        for sub in subs:
            await sub.still_works()


@in_server_loop
async def test_http_api_disconnect_closes_the_user_on_every_node(
    cluster: list[AppServer],
) -> None:
    ch = channel("cl")
    a, b, c = cluster
    async with peers([b, c, b], tokens=["alice-token", "alice-token", "bob-token"]) as people:
        for p in people:
            await p.ok("subscribe", channel=ch)
        alices, bob = people[:2], people[2]
        result = await api(a, "POST", "/api/disconnect", {"user": "alice"})
        # The count is what node A closed itself (it has none of alice's connections); the
        # command reaches B and C through the broker.
        assert isinstance(result["disconnected"], int)
        for alice in alices:
            await recv_until_closed(alice.ws)
            assert alice.ws.close_code == 4001, (alice.ws.close_code, alice.ws.close_reason)

        async def only_bob() -> bool:
            clients = (await bob.ok("presence", channel=ch))["clients"]
            return [e["client"] for e in clients] == [bob.client]

        await async_wait_until(only_bob, what="alice to leave presence")
        await bob.still_works()


# -- the guide's chat across nodes ---------------------------------------------------------------


class Member:
    """A `/ws/chat` connection and what it received, in order."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.got: list[str] = []

    async def read_until(self, text: str, within: float = 2 * TIMEOUT) -> None:
        """Read until ``text`` arrives (kept in :attr:`got` like everything before it)."""
        async with asyncio.timeout(within):
            while text not in self.got:
                message = await recv(self.ws, within)
                assert isinstance(message, str), message
                self.got.append(message)


async def join_chat(stack: AsyncExitStack, server: AppServer, path: str, name: str) -> Member:
    ws = await stack.enter_async_context(ws_connect(server, path))
    return Member(ws, name)


async def everyone_hears_everyone(members: Sequence[Member], tag: str) -> None:
    """Each member says one thing; every member gets every message exactly once."""
    expected = Counter(f"{SAYS}msg-{tag}-{m.name}" for m in members)
    for member in members:
        await member.ws.send(f"msg-{tag}-{member.name}")
    for member in members:
        for text in expected:
            await member.read_until(text)
    # An end marker, sent once everyone has everything: a duplicate would come before it.
    await members[0].ws.send(f"end-{tag}")
    for member in members:
        await member.read_until(f"{SAYS}end-{tag}")
        got = Counter(m for m in member.got if m.startswith(f"{SAYS}msg-{tag}-"))
        assert got == expected, f"{member.name} got {got}"


async def one_leave_notice_each(gone: Member, members: Sequence[Member], tag: str) -> None:
    """``gone`` leaves; each of ``members`` gets exactly one leave notice."""
    marks = [len(m.got) for m in members]
    await gone.ws.close()
    for member, mark in zip(members, marks, strict=True):
        async with asyncio.timeout(2 * TIMEOUT):
            while LEFT not in member.got[mark:]:
                member.got.append(str(await recv(member.ws, 2 * TIMEOUT)))
    await members[-1].ws.send(f"end-{tag}")
    for member, mark in zip(members, marks, strict=True):
        await member.read_until(f"{SAYS}end-{tag}")
        notices = member.got[mark:].count(LEFT)
        assert notices == 1, f"{member.name} got {notices} leave notices: {member.got[mark:]}"


@in_server_loop
async def test_guide_chat_across_nodes(cluster: list[AppServer]) -> None:
    a, b, _ = cluster
    async with AsyncExitStack() as stack:
        members = [
            await join_chat(stack, server, "/ws/chat", name)
            for server, name in ((a, "a1"), (b, "b1"), (a, "a2"), (b, "b2"))
        ]
        # No warm-up: a member's node hears the room before its handshake completes.
        await everyone_hears_everyone(members, "r1")
        # A member of node A leaves: the three others, on both nodes, are told once.
        await one_leave_notice_each(members[0], members[1:], "l1")
        # Then one of node B.
        await one_leave_notice_each(members[1], members[2:], "l2")
        await everyone_hears_everyone(members[2:], "r2")


class SlowLink(TcpProxy):
    """A proxy that holds every chunk for ``delay`` seconds: a slow network to Redis."""

    def __init__(self, target: int, delay: float) -> None:
        super().__init__(target)
        self.delay = delay

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()


@in_server_loop
async def test_a_chat_member_hears_the_room_as_soon_as_it_is_in(
    cluster: list[AppServer], redis_server: RedisServer, ws_impl: str
) -> None:
    """A node with a slow link to Redis still lets a chat member in only once it hears the room.

    Whatever is said on another node right after the handshake reaches the new member.
    """
    a = cluster[0]
    url = urlsplit(a.settings.broker_url)
    async with (
        SlowLink(redis_server.port, delay=0.1) as link,
        serve(
            ws_impl,
            broker_url=f"redis://{HOST}:{link.port}?{url.query}",
            api_key=KEY,
            tokens=TOKENS,
        ) as slow,
    ):
        await await_ready(slow, 4 * TIMEOUT)
        for round_ in range(2):
            room = f"/ws/chat/fresh-{round_}-{secrets.token_hex(4)}"
            async with ws_connect(a, room) as talker, ws_connect(slow, room) as newcomer:
                await talker.send("right away")  # the moment the slow node let it in
                for ws in (talker, newcomer):
                    assert await recv(ws, 2 * TIMEOUT) == f"{SAYS}right away"


# -- several workers -----------------------------------------------------------------------------

WORKERS = 4
CHATTERS = 12
GUIDE_PORT = 8000  # the guide's client scripts hard-code it
QUICK_GUIDE_SCRIPTS = {
    "echo_client.py": ["Response received: Echo: Hello, FastAPI!"],
    "json_client.py": [
        'JSON endpoint response: {"message":"Server received your JSON",'
        '"data":{"greeting":"Hello, JSON endpoint!"}}'
    ],
}


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def worker_pids(server: RoomcastServer) -> list[int]:
    """The worker processes (uvicorn spawns them; multiprocessing's resource tracker is not one)."""
    assert server.proc is not None
    pids = []
    for child in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                pids.append(child.pid)
    return pids


def connections_per_worker(server: RoomcastServer) -> dict[int, int]:
    """How many established TCP connections on the server's port each worker holds."""
    counts = {}
    for pid in worker_pids(server):
        with contextlib.suppress(psutil.Error):
            counts[pid] = sum(
                1
                for conn in psutil.Process(pid).net_connections(kind="tcp")
                if conn.laddr
                and conn.laddr.port == server.port
                and conn.status == psutil.CONN_ESTABLISHED
            )
    return counts


@pytest.fixture(scope="module")
def workers(
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RoomcastServer]:
    """``roomcast serve --workers 4 --broker redis://...``, on the guide's port if it is free."""
    port = GUIDE_PORT if port_free(GUIDE_PORT) else free_port()
    server = RoomcastServer(
        tmp_path_factory.mktemp("workers"),
        port=port,
        extra_args=[
            "--workers",
            str(WORKERS),
            "--broker",
            redis_server.url_for(unique_prefix("workers")),
        ],
        startup_timeout=6 * TIMEOUT,
    )
    with server:
        # /health answers once one worker is up; wait for all of them.
        wait_until(
            lambda: server.log().count("Application startup complete.") == WORKERS,
            4 * TIMEOUT,
            "every worker to start",
        )
        assert len(worker_pids(server)) == WORKERS
        yield server
    server.assert_no_traceback()


async def test_guide_chat_with_workers(workers: RoomcastServer) -> None:
    async with AsyncExitStack() as stack:
        members = [await join_chat(stack, workers, "/ws/chat", f"m{i}") for i in range(CHATTERS)]
        spread = connections_per_worker(workers)
        assert sum(spread.values()) == CHATTERS, spread
        # The kernel hands connections to whichever worker accepts first; with a dozen of
        # them at least two workers take part (else this test would prove nothing).
        assert sum(1 for n in spread.values() if n) >= 2, spread
        await everyone_hears_everyone(members, "r1")
        await one_leave_notice_each(members[0], members[1:], "l1")
        await everyone_hears_everyone(members[1:], "r2")


async def test_secure_token_works_on_every_worker(workers: RoomcastServer) -> None:
    async with AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(ws_connect(workers, f"/ws/secure?token={GOOD_TOKEN}"))
            for _ in range(CHATTERS)
        ]
        spread = connections_per_worker(workers)
        assert sum(1 for n in spread.values() if n) >= 2, spread
        for i, ws in enumerate(conns):
            assert await recv(ws) == f"Hello, {USER}! Welcome to the secure WebSocket."
            await ws.send(f"ping {i}")
            assert await recv(ws) == f"You said: ping {i}"
    assert GOOD_TOKEN not in workers.log(), "the token reached the log"


@pytest.mark.parametrize("script", sorted(QUICK_GUIDE_SCRIPTS))
def test_guide_client_scripts_with_workers(workers: RoomcastServer, script: str) -> None:
    if workers.port != GUIDE_PORT:
        message = f"the guide's client scripts hard-code port {GUIDE_PORT}, which is busy"
        if os.environ.get("CI"):
            pytest.fail(message + "; free the port for CI")
        pytest.skip(message)
    clients = Path(__file__).parent / "guide_clients"
    result = subprocess.run(
        [sys.executable, str(clients / script)],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=clients,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == QUICK_GUIDE_SCRIPTS[script], result.stderr


async def test_workers_share_channels(workers: RoomcastServer) -> None:
    """`/ws` across workers: every subscriber, whichever worker it landed on, gets it all."""
    ch = channel("wk")
    async with peers([workers] * 8) as subs:
        for sub in subs:
            await sub.ok("subscribe", channel=ch)
        spread = connections_per_worker(workers)
        assert sum(1 for n in spread.values() if n) >= 2, spread
        sent = []
        for i, sub in enumerate(subs):
            offset = (await sub.ok("publish", channel=ch, data=i))["offset"]
            sent.append(publication(ch, offset, i, sub.info))
        assert [f["offset"] for f in sent] == list(range(1, 9))
        for sub in subs:
            assert await sub.publications(8) == sent
        clients = (await subs[0].ok("presence", channel=ch))["clients"]
        assert [e["client"] for e in clients] == [s.client for s in subs]
