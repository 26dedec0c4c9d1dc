"""Failures of a real cluster: Redis killed and restarted empty, a node killed, history lost.

Three ``roomcast serve`` nodes share a ``redis-server`` of the test's own, which the tests kill
with SIGKILL; then each test runs again on a Redis Cluster (``fresh_redis[cluster]``), all of
whose nodes it kills instead. Redis runs without persistence, so a restart loses every
channel's history: each channel starts a new stream (a new epoch) at its next use, and the
subscribers of the old one are closed with 1012 and recover (``recovered: false``, everything
the new stream holds).

What "every message the history still holds" means in (a): at the end, the channel's history
(``ROOMCAST_HISTORY_SIZE`` is larger than everything published, so nothing is trimmed) is the
whole final epoch, offsets 1..N. Every subscriber's stream of publications, from its last
restart at offset 1 on, must be exactly that: the same offsets and data, in order, no
duplicate. Before it, the subscriber saw a prefix 1..k of the lost epoch, with no gap nor
duplicate. And every publication acknowledged in the final epoch is in that history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

import roomcast
from helpers import (
    TIMEOUT,
    RoomcastServer,
    async_wait_until,
    recv,
    wait_until,
    ws_connect,
)
from redis_cluster_fixtures import (
    fresh_redis_or_cluster_fixture,  # noqa: F401 (a fixture: fresh_redis, on each)
    redis_cluster_fixture,  # noqa: F401 (a fixture)
)
from redis_server import RedisServer
from roomcast.client import Publication
from tcpproxy import TcpProxy
from test_protocol import Peer, channel, peer

pytestmark = pytest.mark.redis

KEY = "chaos-api-key"
FAST = {"backoff_min": 0.05, "backoff_max": 0.5, "request_timeout": 4 * TIMEOUT}

TOTAL = 10_000
HISTORY = 20_000
SUBSCRIBERS_PER_NODE = 2
KILL_AFTER = 3_000  # acknowledged publications before Redis is killed
OUTAGE = 1.5  # seconds Redis stays down once every node noticed
PRESENCE_TTL = 3.0


def start_nodes(tmp_path: Path, redis: RedisServer, n: int = 3, **env: str) -> list[RoomcastServer]:
    # Publishers never subscribe: under a loaded machine a run may outlast the deadline of an
    # anonymous connection that has not subscribed (ROOMCAST_AUTH_TIMEOUT, 10 s), which is not
    # what these tests are about.
    base = {
        "ROOMCAST_BROKER_URL": redis.url,
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_AUTH_TIMEOUT": "600",
        **env,
    }
    nodes = []
    try:
        for i in range(n):
            nodes.append(RoomcastServer(tmp_path / f"node{i}", env=base).start())
        for node in nodes:
            wait_until(lambda n=node: ready(n) == 200, 2 * TIMEOUT, "the node to be ready")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def ready(node: RoomcastServer) -> int:
    """The status of ``/readyz`` (0: no answer)."""
    try:
        return httpx.get(f"{node.http_url}/readyz", timeout=TIMEOUT).status_code
    except httpx.HTTPError:
        return 0


async def readyz_is(node: RoomcastServer, status: int) -> bool:
    """Whether ``/readyz`` answers ``status`` now."""
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return (await http.get(f"{node.http_url}/readyz")).status_code == status
    except httpx.HTTPError:
        return False


@pytest.fixture
def nodes(tmp_path: Path, fresh_redis: RedisServer) -> Iterator[list[RoomcastServer]]:
    """Three nodes on the test's own Redis; a history big enough for the whole test."""
    started = start_nodes(
        tmp_path,
        fresh_redis,
        ROOMCAST_HISTORY_SIZE=str(HISTORY),
        ROOMCAST_PRESENCE_TTL=str(PRESENCE_TTL),
    )
    try:
        yield started
    finally:
        for node in started:
            node.stop()
    for node in started:
        node.assert_no_traceback()


async def api_publish(node: RoomcastServer, ch: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        reply = await http.post(
            "/api/publish", json={"channel": ch, "data": data}, headers={"X-API-Key": KEY}
        )
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def whole_history(node: RoomcastServer, ch: str) -> dict[str, Any]:
    """The channel's history, walked forwards in pages of 1000."""
    pages: list[dict[str, Any]] = []
    since = 0
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        for _ in range(HISTORY // 1000 + 2):
            reply = await http.get(
                f"/api/history/{ch}",
                params={"since": since, "limit": 1000},
                headers={"X-API-Key": KEY},
            )
            assert reply.status_code == 200, reply.text
            page = reply.json()
            assert not pages or page["epoch"] == pages[0]["epoch"], "the epoch changed"
            pages.append(page)
            if not page["publications"]:
                break
            since = page["publications"][-1]["offset"]
    publications = [p for page in pages for p in page["publications"]]
    last = pages[-1]
    return {
        "epoch": last["epoch"],
        "offset": last["offset"],
        "start": last["start"],
        "all": publications,
    }


# -- a) Redis killed and restarted under load ----------------------------------------------------


class Publisher:
    """Publishes ``count`` messages through one node's `/ws`, a window of them in flight.

    ``unavailable`` replies are retried after a short sleep; every acknowledgement is kept as
    ``acked[(epoch, offset)] = data``.
    """

    WINDOW = 16

    def __init__(self, node: RoomcastServer, ch: str, index: int, count: int) -> None:
        self.node = node
        self.ch = ch
        self.index = index
        self.count = count
        self.acked: dict[tuple[str, int], Any] = {}
        self.unavailable = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.count):
            todo.put_nowait(i)
        slots = asyncio.Semaphore(self.WINDOW)
        in_flight: dict[int, int] = {}
        ids = itertools.count(1)
        async with ws_connect(self.node, "/ws") as ws:
            assert json.loads(await recv(ws))["type"] == "connected"

            async def send() -> None:
                while True:
                    seq = await todo.get()
                    await slots.acquire()
                    rid = next(ids)
                    in_flight[rid] = seq
                    data = {"p": self.index, "i": seq}
                    await ws.send(
                        json.dumps({"id": rid, "op": "publish", "channel": self.ch, "data": data})
                    )

            sender = asyncio.create_task(send())
            try:
                while len(self.acked) < self.count:
                    frame = json.loads(await ws.recv())
                    seq = in_flight.pop(frame["id"])
                    slots.release()
                    if frame["ok"]:
                        result = frame["result"]
                        self.acked[(result["epoch"], result["offset"])] = {
                            "p": self.index,
                            "i": seq,
                        }
                    elif frame["error"]["code"] == "unavailable":
                        self.unavailable += 1
                        loop.call_later(0.1, todo.put_nowait, seq)
                    else:
                        raise AssertionError(f"publish failed: {frame}")
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender


class Subscriber:
    """A ``roomcast.connect`` client reading one channel; keeps (offset, data) in order."""

    def __init__(self, node: RoomcastServer, ch: str) -> None:
        self.client = roomcast.connect(node.url("/ws"), **FAST)
        self.ch = ch
        self.got: list[tuple[int, Any]] = []
        self.task: asyncio.Task[None] | None = None
        self.ended = False

    async def start(self) -> None:
        await self.client.start()
        self.subscription = await self.client.subscribe(self.ch)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.subscription:
            if isinstance(item, Publication):
                self.got.append((item.offset, item.data))
        self.ended = True

    def caught_up(self, top: int) -> bool:
        # The SDK ends a subscription whose resubscribe got an error (see
        # test_sdk_resubscribes_after_an_unavailable_reply): say so rather than time out.
        assert not self.ended, f"the SDK ended the subscription: {self.client.error}"
        return bool(self.got) and self.got[-1][0] == top

    async def close(self) -> None:
        await self.client.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def runs(got: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """``got`` cut wherever the offsets go back: one run per stream the subscriber followed."""
    cut: list[list[tuple[int, Any]]] = []
    for item in got:
        if not cut or item[0] <= cut[-1][-1][0]:
            cut.append([])
        cut[-1].append(item)
    return cut


async def test_redis_killed_and_restarted_under_load(
    nodes: list[RoomcastServer],
    fresh_redis: RedisServer,
) -> None:
    ch = channel("chaos")
    subscribers = [Subscriber(node, ch) for node in nodes for _ in range(SUBSCRIBERS_PER_NODE)]
    publishers = [
        Publisher(node, ch, i, TOTAL // 3 + (1 if i < TOTAL % 3 else 0))
        for i, node in enumerate(nodes)
    ]
    assert sum(p.count for p in publishers) == TOTAL
    logs = [node.log_offset() for node in nodes]
    tasks: list[asyncio.Task[None]] = []
    try:
        for subscriber in subscribers:
            await subscriber.start()
        tasks = [asyncio.create_task(p.run()) for p in publishers]

        def acked() -> int:
            for task in tasks:
                if task.done():
                    task.result()  # a failed publisher fails the test now
            return sum(len(p.acked) for p in publishers)

        await async_wait_until(lambda: acked() >= KILL_AFTER, 6 * TIMEOUT, "publications")
        clients = [(await node.astats())["ws_clients"] for node in nodes]
        assert clients == [SUBSCRIBERS_PER_NODE + 1] * 3  # the subscribers and the publisher

        fresh_redis.kill()
        killed = time.monotonic()
        for node in nodes:
            await async_wait_until(lambda n=node: readyz_is(n, 503), TIMEOUT, "/readyz to turn 503")
        assert time.monotonic() - killed < 5
        assert acked() < TOTAL, "the publishers finished before Redis went down"
        # While Redis is down every node keeps its clients (publishers get `unavailable`).
        outage_ends = time.monotonic() + OUTAGE
        while time.monotonic() < outage_ends:
            assert [(await node.astats())["ws_clients"] for node in nodes] == clients
            await asyncio.sleep(0.1)
        assert sum(p.unavailable for p in publishers) > 0

        await asyncio.to_thread(fresh_redis.restart)
        for node in nodes:
            # The node's listener retries with a backoff of up to 5 s (plus jitter).
            await async_wait_until(
                lambda n=node: readyz_is(n, 200), 3 * TIMEOUT, "/readyz to turn 200 again"
            )
        async with asyncio.timeout(12 * TIMEOUT):
            await asyncio.gather(*tasks)
        assert acked() == TOTAL

        history = await whole_history(nodes[0], ch)
        final = history["epoch"]
        held = [(p["offset"], p["data"]) for p in history["all"]]
        # Nothing trimmed: the history is the whole final stream, 1..N.
        assert history["start"] == 1
        assert [offset for offset, _ in held] == list(range(1, history["offset"] + 1))
        epochs = {epoch for p in publishers for epoch, _ in p.acked}
        assert final in epochs
        assert len(epochs) == 2, f"one stream before the restart, one after: {epochs}"
        (lost,) = epochs - {final}
        acked_final = {k[1]: v for p in publishers for k, v in p.acked.items() if k[0] == final}
        acked_lost = {k[1]: v for p in publishers for k, v in p.acked.items() if k[0] == lost}
        assert acked_final, "nothing was acknowledged after the restart"
        assert {offset: data for offset, data in held if offset in acked_final} == acked_final

        top = history["offset"]
        for subscriber in subscribers:
            await async_wait_until(
                lambda s=subscriber: s.caught_up(top),
                4 * TIMEOUT,
                f"a subscriber to catch up to {top}",
            )
        # A marker published after everything: a subscriber's stream is in order, so once the
        # marker is in, any duplicate that the nodes sent before it is in too.
        marker = await api_publish(nodes[0], ch, "end-of-test")
        assert (marker["epoch"], marker["offset"]) == (final, top + 1), marker
        for subscriber in subscribers:
            await async_wait_until(
                lambda s=subscriber: s.caught_up(top + 1), 4 * TIMEOUT, "the marker"
            )
        for k, subscriber in enumerate(subscribers):
            assert subscriber.got.pop() == (top + 1, "end-of-test"), f"subscriber {k}"
            streams = runs(subscriber.got)
            assert streams[-1] == held, (
                f"subscriber {k}: its last stream {_describe(streams[-1])} is not the history "
                f"{_describe(held)}"
            )
            assert len(streams) == 2, f"subscriber {k}: {[_describe(s) for s in streams]}"
            before = streams[0]
            assert [offset for offset, _ in before] == list(range(1, len(before) + 1))
            for offset, data in before:
                if offset in acked_lost:
                    assert data == acked_lost[offset]
            assert subscriber.subscription.gaps >= 1  # recovered: false, a new epoch
            assert subscriber.client.connections >= 2  # closed with 1012, came back
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscriber in subscribers:
            await subscriber.close()

    for node, offset in zip(nodes, logs, strict=True):
        text = node.log_since(offset)
        assert f"broker {fresh_redis.url} unreachable" in text, text[-3000:]
        assert f"broker {fresh_redis.url} reachable again" in text, text[-3000:]
        assert "Traceback" not in text
        assert "1012" in text  # the subscribers of the lost stream were told to recover


def _describe(stream: list[tuple[int, Any]]) -> str:
    if not stream:
        return "[]"
    return f"{len(stream)} publications, offsets {stream[0][0]}..{stream[-1][0]}"


# -- b) a node killed ----------------------------------------------------------------------------

CLIENTS_ON_A = 3


async def test_node_killed_its_clients_recover_elsewhere(
    nodes: list[RoomcastServer],
) -> None:
    a, b, c = nodes
    ch = channel("chaos")
    async with TcpProxy(a.port) as proxy, peer(b) as on_b, peer(c) as on_c:
        clients = [
            roomcast.connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) for _ in range(CLIENTS_ON_A)
        ]
        try:
            subs = []
            for client in clients:
                await client.start()
                subs.append(await client.subscribe(ch))
            await on_b.ok("subscribe", channel=ch)
            await on_c.ok("subscribe", channel=ch)
            on_a = {client.client_id for client in clients}
            sent = [(await api_publish(c, ch, i))["offset"] for i in range(20)]
            assert sent == list(range(1, 21))
            got: list[list[int]] = [[] for _ in clients]

            async def take(k: int, n: int) -> None:
                async with asyncio.timeout(4 * TIMEOUT):
                    while len(got[k]) < n:
                        item = await anext(subs[k])
                        assert isinstance(item, Publication), item
                        assert item.data == item.offset - 1
                        got[k].append(item.offset)

            await asyncio.gather(*(take(k, 20) for k in range(len(clients))))
            presence = await on_b.ok("presence", channel=ch)
            assert {e["client"] for e in presence["clients"]} == on_a | {on_b.client, on_c.client}

            # Node A dies without a word; its clients' connections drop.
            assert a.proc is not None
            a.proc.kill()
            killed = time.monotonic()
            await asyncio.to_thread(a.wait, 3 * TIMEOUT)
            proxy.target = b.port  # their URL now leads to node B
            proxy.cut()
            # Published while they are away: only recovery can bring these.
            sent += [(await api_publish(c, ch, i))["offset"] for i in range(20, 35)]
            await async_wait_until(
                lambda: all(cl.connections == 2 and cl.state == "connected" for cl in clients),
                4 * TIMEOUT,
                "the clients to reconnect through node B",
            )
            sent += [(await api_publish(b, ch, i))["offset"] for i in range(35, 40)]
            assert sent == list(range(1, 41))
            await asyncio.gather(*(take(k, 40) for k in range(len(clients))))
            for k, sub in enumerate(subs):
                assert got[k] == sent, f"client {k}"
                assert (sub.recoveries, sub.gaps) == (1, 0)  # recovered: true, no loss
            moved = {client.client_id for client in clients}
            assert not moved & on_a

            # A's presence entries are nobody's to remove: they expire after the TTL.
            def listed(presence: dict[str, Any]) -> set[str]:
                return {e["client"] for e in presence["clients"]}

            async def a_gone() -> bool:
                return not listed(await on_b.ok("presence", channel=ch)) & on_a

            await async_wait_until(a_gone, PRESENCE_TTL + 2, "node A's presence to expire")
            assert time.monotonic() - killed <= PRESENCE_TTL + 1.5
            for p in (on_b, on_c):
                assert listed(await p.ok("presence", channel=ch)) == moved | {
                    on_b.client,
                    on_c.client,
                }
            for p in (on_b, on_c):
                assert [f["offset"] for f in await p.publications(40)] == sent
                await p.still_works()
        finally:
            for client in clients:
                await client.close()


# -- failures found earlier, kept as regression tests ------------------------------------------


class KnownBug(AssertionError):
    """The symptom of a bug these tests once caught (each is fixed; the tests keep it so)."""


def unless_fixed(condition: bool, symptom: str) -> None:
    if not condition:
        raise KnownBug(symptom)


async def pushes_until_closed(p: Peer, n: int, within: float) -> tuple[list[int], int | None]:
    """The offsets ``p`` is sent (up to ``n``) until it is closed; and its close code."""
    offsets: list[int] = []
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        async with asyncio.timeout(within):
            while len(offsets) < n:
                frame = await p.push(within)
                assert frame["type"] == "publication", frame
                offsets.append(frame["offset"])
            await p.still_works()
    return offsets, p.ws.close_code


@pytest.mark.parametrize("trigger", ["history", "subscribe"])
async def test_history_lost_under_live_subscribers(
    tmp_path: Path,
    fresh_redis: RedisServer,
    trigger: str,
) -> None:
    """Redis loses a channel (flushed, evicted, restarted) while a node has subscribers.

    The old subscribers' offsets mean nothing in the next stream: the node must close them
    with 1012 so they recover, whatever else its clients ask meanwhile. A subscriber that came
    in the new stream gets all of it (or is told to recover too).
    """
    (node,) = start_nodes(tmp_path, fresh_redis, n=1)
    ch = channel("lost")
    try:
        async with peer(node) as old, peer(node) as pub, peer(node) as other:
            await old.ok("subscribe", channel=ch)
            for i in range(3):
                await pub.ok("publish", channel=ch, data=i)
            await old.publications(3)
            with fresh_redis.client() as conn:
                assert conn.delete(f"roomcast:m:{{{ch}}}", f"roomcast:h:{{{ch}}}") == 2
            if trigger == "history":
                await other.ok("history", channel=ch)  # any client's request
            else:
                # A new subscriber on the same node, in the new stream from its start.
                assert (await other.ok("subscribe", channel=ch))["offset"] == 0
            for i in range(5):
                assert (await pub.ok("publish", channel=ch, data=10 + i))["offset"] == i + 1
            # A reset closes at once, on the first publication of the new stream.
            got, code = await pushes_until_closed(old, 5, TIMEOUT / 2)
            unless_fixed(code == 1012, f"no reset; the old subscriber got offsets {got}")
            if trigger == "subscribe":
                got, code = await pushes_until_closed(other, 5, TIMEOUT / 2)
                # It follows the new stream from its start: it is not reset a second time.
                unless_fixed(
                    got == [1, 2, 3, 4, 5] and code is None,
                    f"the new subscriber got offsets {got} of 1..5 (close code {code})",
                )
    finally:
        node.stop()


async def test_http_api_while_redis_is_down(
    tmp_path: Path,
    fresh_redis: RedisServer,
) -> None:
    (node,) = start_nodes(tmp_path, fresh_redis, n=1)
    try:
        fresh_redis.kill()
        await async_wait_until(lambda: readyz_is(node, 503), TIMEOUT, "/readyz 503")
        async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
            reply = await http.post(
                "/api/publish", json={"channel": "x", "data": 1}, headers={"X-API-Key": KEY}
            )
        unless_fixed(reply.status_code == 503, f"{reply.status_code} {reply.text}")
        unless_fixed("Traceback" not in node.log(), "a traceback in the log")
    finally:
        node.stop()


async def test_sdk_resubscribes_after_an_unavailable_reply(
    tmp_path: Path,
    fresh_redis: RedisServer,
) -> None:
    """The connection drops while Redis is down; the SDK's resubscribe gets ``unavailable``.

    That is transient ("retry later"): once Redis is back the subscription must deliver again.
    """
    (node,) = start_nodes(tmp_path, fresh_redis, n=1)
    ch = channel("sdk")
    try:
        async with (
            TcpProxy(node.port) as proxy,
            roomcast.connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
        ):
            sub = await client.subscribe(ch)
            fresh_redis.kill()
            await async_wait_until(lambda: readyz_is(node, 503), TIMEOUT, "/readyz 503")
            proxy.cut()
            await async_wait_until(lambda: client.connections == 2, 2 * TIMEOUT, "a reconnect")
            await asyncio.to_thread(fresh_redis.restart)
            await async_wait_until(lambda: readyz_is(node, 200), 3 * TIMEOUT, "/readyz 200")
            offset = (await api_publish(node, ch, "after"))["offset"]
            try:
                async with asyncio.timeout(3 * TIMEOUT):
                    item = await anext(sub)
            except (StopAsyncIteration, TimeoutError):
                item = None
            unless_fixed(isinstance(item, Publication), "the subscription ended")
            assert isinstance(item, Publication)
            assert (item.offset, item.data) == (offset, "after")
    finally:
        node.stop()
