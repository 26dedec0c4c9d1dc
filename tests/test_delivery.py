"""Delivery through a shared broker: no publication is skipped without the subscriber being told.

The guarantee (docs/scaling.md): a subscriber gets every publication of its channel, in order,
exactly once; where a node cannot fill a gap (the history no longer holds it, or the stream began
again under a new epoch) the subscriber is closed with 1012 and its recovery says
``recovered: false``. Each test here reproduces one way that guarantee was once broken, against a
real ``redis-server``:

- the node's pub/sub connection dropped (``CLIENT KILL``, a Redis restart, a blip): redis-py
  reconnected in place and the publications of the gap were never delivered, or the live stream
  overtook the catch-up from the history and the catch-up skipped what lay below it;
- Redis restored from a snapshot handed out offsets 11..20 a second time under the same epoch
  (now the channel skips them, keeping its epoch and history);
- a short history TTL expired a quiet channel's position, so its next publication reset every
  subscriber;
- a second subscriber read its position before the node's Redis subscription was active;
- a node that learnt a new epoch from a subscribe reply reset that very subscriber again (in
  test_chaos.py, test_history_lost_under_live_subscribers);
- a recreated position next to an old stream made every later publication fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from helpers import TIMEOUT, RoomcastServer, async_wait_until, wait_until
from redis_cluster_fixtures import (
    ClusterAsOneRedis,
    fresh_redis_or_cluster_fixture,  # noqa: F401 (a fixture: fresh_redis, on each)
    redis_cluster_fixture,  # noqa: F401 (a fixture)
)
from redis_server import RedisServer, unique_prefix
from roomcast.brokers import Position
from roomcast.brokers.redis import RedisBroker
from roomcast.brokers.redis_scripts import SKIP_RATE, SKIP_SKEW
from roomcast.codecs.roomcast_json import encode_info
from roomcast.connection import Connection
from roomcast.core.node import Node
from roomcast.core.session import Session
from roomcast.http.channels import ChannelRequests
from roomcast.settings import Settings
from test_chaos import Publisher, Subscriber, api_publish, start_nodes
from test_protocol import Peer, channel, peer

pytestmark = pytest.mark.redis

INFO = encode_info("c0ffee000001", "alice")

#: The tests through ``roomcast serve`` nodes run on one Redis and on a Redis Cluster
#: (``fresh_redis[cluster]``: killing "the" Redis kills every node); those that drive a
#: ``RedisBroker`` in this process run on one Redis only.
single_redis = pytest.mark.parametrize("fresh_redis", ["redis"], indirect=True)


# -- the node's pub/sub connection killed, again and again ---------------------------------------

KILLS = 20
TOTAL = 10_000


def pubsub_clients(
    redis: RedisServer | ClusterAsOneRedis, node: RoomcastServer, ch: str
) -> list[tuple[int, int]]:
    """``node``'s pub/sub connections to the Redis that holds ``ch`` (on a cluster, the master
    of its slot), as (that Redis' port, client id)."""
    assert node.proc is not None
    mine = {c.laddr.port for c in psutil.Process(node.proc.pid).net_connections("tcp")}
    if isinstance(redis, ClusterAsOneRedis):
        port = redis.cluster.master_of("{" + ch + "}")
        conn = redis.cluster.client(port)
    else:
        port, conn = redis.port, redis.client()
    with conn:
        return [
            (port, int(c["id"]))
            for c in conn.client_list()
            if int(c["sub"]) + int(c.get("ssub", 0)) > 0
            and int(str(c["addr"]).rpartition(":")[2]) in mine
        ]


def kill_client(redis: RedisServer | ClusterAsOneRedis, port: int, client_id: int) -> None:
    """``CLIENT KILL`` one connection of the Redis on ``port``."""
    conn = redis.cluster.client(port) if isinstance(redis, ClusterAsOneRedis) else redis.client()
    with conn:
        assert conn.client_kill_filter(_id=client_id) == 1


async def test_pubsub_connection_killed_20_times_while_two_nodes_publish(
    tmp_path: Path, fresh_redis: RedisServer
) -> None:
    """Every subscriber ends with every publication, in order: no silent gap, no duplicate.

    Node 0 holds the subscribers (the victim: its pub/sub connection that carries the test's
    channel; on a cluster, the one to the channel's master); nodes 1 and 2 publish 5,000 each.
    Each kill waits until node 0 is back before the next, so all 20 are whole reconnections.
    """
    nodes = start_nodes(tmp_path, fresh_redis, ROOMCAST_HISTORY_SIZE=str(2 * TOTAL))
    ch = channel("kill")
    subscribers = [Subscriber(nodes[0], ch) for _ in range(4)]
    try:
        for s in subscribers:
            await s.start()
        await async_wait_until(
            lambda: len(pubsub_clients(fresh_redis, nodes[0], ch)) == 1,
            what="node 0's subscription",
        )
        publishers = [Publisher(node, ch, i, TOTAL // 2) for i, node in enumerate(nodes[1:])]
        tasks = [asyncio.create_task(p.run()) for p in publishers]
        kills = 0
        while kills < KILLS:
            acked = sum(len(p.acked) for p in publishers)
            if acked >= (kills + 1) * TOTAL // (KILLS + 1) or all(t.done() for t in tasks):
                await async_wait_until(
                    lambda: len(pubsub_clients(fresh_redis, nodes[0], ch)) == 1,
                    what="node 0's subscription",
                )
                ((port, victim),) = pubsub_clients(fresh_redis, nodes[0], ch)
                kill_client(fresh_redis, port, victim)
                kills += 1
                # Each kill is one whole reconnection before the next one.
                await async_wait_until(
                    lambda k=kills: nodes[0].log().count("reachable again") == k,
                    3 * TIMEOUT,
                    "node 0 to be back",
                )
            else:
                await asyncio.sleep(0.005)
        async with asyncio.timeout(20 * TIMEOUT):
            await asyncio.gather(*tasks)
        acked = {offset: d for p in publishers for (_, offset), d in p.acked.items()}
        assert len({epoch for p in publishers for epoch, _ in p.acked}) == 1
        assert sorted(acked) == list(range(1, TOTAL + 1))
        for s in subscribers:
            await async_wait_until(
                lambda s=s: s.caught_up(TOTAL), 10 * TIMEOUT, "a subscriber to catch up"
            )
        for s in subscribers:
            offsets = [offset for offset, _ in s.got]
            missing = sorted(set(range(1, TOTAL + 1)) - set(offsets))
            assert not missing, f"{len(missing)} never delivered, e.g. {missing[:10]}"
            assert offsets == list(range(1, TOTAL + 1)), "out of order or duplicated"
            assert all(d == acked[offset] for offset, d in s.got)
        reconnects = nodes[0].log().count("reachable again")
        assert reconnects == KILLS, f"node 0 reconnected {reconnects} times for {KILLS} kills"
    finally:
        for s in subscribers:
            await s.close()
        for node in nodes:
            node.stop()
    for node in nodes:
        node.assert_no_traceback()


# -- Redis restored from a snapshot ---------------------------------------------------------------


async def closed_with(p: Peer, within: float) -> tuple[list[int], int | None]:
    """The publication offsets ``p`` is sent until it is closed, and the close code."""
    offsets: list[int] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(within):
            while True:
                frame = await p.push(within)
                if frame["type"] == "publication":
                    offsets.append(frame["offset"])
    return offsets, p.ws.close_code


async def test_a_restored_snapshot_never_reuses_an_offset_under_the_same_epoch(
    tmp_path: Path, fresh_redis: RedisServer
) -> None:
    """Offsets 11..20 were handed out after the snapshot: after the restore the channel keeps its
    epoch and history but skips every offset the lost publications can have had, so none is
    handed out twice; the subscriber that saw the old 11..20 gets the next one without a reset,
    and a client that was away recovers what the restored history holds."""
    (node,) = start_nodes(tmp_path, fresh_redis, n=1)
    ch = channel("restore")
    try:
        async with peer(node) as sub:
            await sub.ok("subscribe", channel=ch)
            first = [await api_publish(node, ch, i) for i in range(10)]
            with fresh_redis.client() as conn:
                assert conn.save()  # dump.rdb in the server's directory, loaded at start
            later = [await api_publish(node, ch, 10 + i) for i in range(10)]
            assert [p["offset"] for p in later] == list(range(11, 21))
            epoch = first[0]["epoch"]
            assert {p["epoch"] for p in first + later} == {epoch}
            assert [f["offset"] for f in await sub.publications(20)] == list(range(1, 21))

            fresh_redis.kill()
            await asyncio.to_thread(fresh_redis.restart)
            with fresh_redis.client() as conn:
                # 10 from the snapshot, or already past the skip if the node's catch-up ran a
                # script on the restored data first.
                restored = int(conn.hget(f"roomcast:m:{{{ch}}}", "offset") or 0)
                assert restored == 10 or restored >= 10 + SKIP_SKEW * SKIP_RATE, restored

            async def publish_again() -> dict[str, Any] | None:
                with contextlib.suppress(AssertionError):
                    return await api_publish(node, ch, "after")
                return None

            again: dict[str, Any] | None = None
            async with asyncio.timeout(4 * TIMEOUT):
                while again is None:
                    again = await publish_again()
                    await asyncio.sleep(0.05)
            assert again["epoch"] == epoch, "a restore within the skip window keeps the epoch"
            assert again["offset"] > 20, f"offset {again['offset']} reused under {epoch}"
            frame = await sub.push(2 * TIMEOUT)
            assert (frame["type"], frame["offset"]) == ("publication", again["offset"]), frame
            await sub.still_works()
        async with peer(node) as back:
            reply = await back.ok("subscribe", channel=ch, recover={"epoch": epoch, "offset": 5})
            assert reply["recovered"] is True, reply
            offsets = [f["offset"] for f in await back.publications(6)]
            assert offsets == [6, 7, 8, 9, 10, again["offset"]]
    finally:
        node.stop()
    node.assert_no_traceback()


# -- a short history TTL ---------------------------------------------------------------------------


async def test_a_quiet_channel_keeps_its_stream_past_the_history_ttl(
    tmp_path: Path, fresh_redis: RedisServer
) -> None:
    """Publications expire after the TTL; the channel's offsets and epoch do not."""
    (node,) = start_nodes(tmp_path, fresh_redis, n=1, ROOMCAST_HISTORY_TTL="1")
    ch = channel("ttl")
    try:
        async with peer(node) as sub:
            await sub.ok("subscribe", channel=ch)
            first = await api_publish(node, ch, 1)
            assert (await sub.push())["offset"] == 1
            # Wait until Redis has dropped the history by its TTL (the position stays).
            with fresh_redis.client() as conn:
                wait_until(
                    lambda: not conn.exists(f"roomcast:h:{{{ch}}}"), 4 * TIMEOUT, "the history TTL"
                )
            second = await api_publish(node, ch, 2)
            assert second == {"epoch": first["epoch"], "offset": 2}
            frame = await sub.push()
            assert (frame["type"], frame["offset"]) == ("publication", 2), frame
            await sub.still_works()
    finally:
        node.stop()
    node.assert_no_traceback()


# -- in-process: a broker whose subscription the test holds back -------------------------------


class HeldRedisBroker(RedisBroker):
    """A Redis broker whose channel subscriptions wait until the test opens :attr:`gate`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def subscribe(self, channel: str) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().subscribe(channel)


class AsgiPeer:
    """The ASGI side of an in-process connection: records the text frames sent to it."""

    def __init__(self) -> None:
        self.texts: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            self.texts.append(json.loads(message["text"]))

    def reply(self, rid: int) -> dict[str, Any] | None:
        return next((f for f in self.texts if f.get("id") == rid), None)

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.texts if f.get("type") == "publication"]


@pytest.fixture
async def held_node(fresh_redis: RedisServer) -> AsyncIterator[tuple[Node, RedisBroker]]:
    prefix = unique_prefix("held")
    settings = Settings(anonymous_subscribe=["*"], anonymous_publish=["*"], rate_limit=0)
    broker = HeldRedisBroker(
        fresh_redis.url_for(prefix), history_size=100, history_ttl=3600, presence_ttl=30
    )
    other = RedisBroker(
        fresh_redis.url_for(prefix), history_size=100, history_ttl=3600, presence_ttl=30
    )
    node = Node(settings, broker)
    await node.start()
    await other.start(node)  # publishes only: it subscribes to nothing
    try:
        yield node, other
    finally:
        await other.close()
        await node.stop()


def attach(requests: ChannelRequests) -> tuple[AsgiPeer, Session]:
    asgi = AsgiPeer()
    conn = Connection({"type": "websocket", "path": "/ws"}, asgi.receive, asgi.send, 1 << 20)
    return asgi, requests.attach(conn, None)


@single_redis
async def test_a_second_subscriber_waits_for_the_node_subscription(
    held_node: tuple[Node, RedisBroker],
) -> None:
    """While the first subscriber's Redis subscription is not yet active, a second one on the
    same node must not read the channel's position: publications made in between would be
    neither in its reply nor delivered to the node."""
    node, other = held_node
    broker = node.broker
    assert isinstance(broker, HeldRedisBroker)
    requests = ChannelRequests(node)
    ch = channel("second")
    (a, session_a), (b, session_b) = attach(requests), attach(requests)
    subscribe = json.dumps({"id": 1, "op": "subscribe", "channel": ch})
    first = asyncio.create_task(requests.handle(session_a, subscribe))
    await async_wait_until(lambda: broker.waiting == 1, what="the first subscribe")
    second = asyncio.create_task(requests.handle(session_b, subscribe))
    await async_wait_until(
        lambda: b.reply(1) is not None or broker.waiting == 2, what="the second subscribe"
    )
    for i in range(2):
        await other.publish(ch, orjson.dumps(i), INFO)
    broker.gate.set()
    await asyncio.gather(first, second)
    await other.publish(ch, orjson.dumps(2), INFO)
    for asgi in (a, b):
        await async_wait_until(lambda asgi=asgi: 3 in asgi.offsets(), what="offset 3")
        reply = asgi.reply(1)
        assert reply is not None
        assert reply["ok"], reply
        top = reply["result"]["offset"]
        assert asgi.offsets() == list(range(top + 1, 4)), (top, asgi.offsets())


# -- the broker's stream keys -------------------------------------------------------------------


@pytest.fixture
async def broker(fresh_redis: RedisServer) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(
        fresh_redis.url_for(unique_prefix("keys")),
        history_size=100,
        history_ttl=3600,
        presence_ttl=30,
        history_bytes=2000,
    )
    await b.start(Node(Settings(), b))
    try:
        yield b
    finally:
        await b.close()


@single_redis
async def test_a_recreated_position_next_to_an_old_stream(
    broker: RedisBroker, fresh_redis: RedisServer
) -> None:
    """The position key is gone (evicted, deleted) but the stream is not: the channel begins
    again, and its next publication is stored, not refused by a stream whose ids run ahead."""
    ch = channel("orphan")
    for i in range(5):
        await broker.publish(ch, orjson.dumps(i), INFO)
    with fresh_redis.client() as conn:
        assert conn.delete(f"{broker.prefix}:m:{{{ch}}}") == 1
        assert conn.xlen(f"{broker.prefix}:h:{{{ch}}}") == 5
    position = await broker.position(ch)
    assert position.offset == 0
    assert await broker.publish(ch, orjson.dumps("new"), INFO) == Position(position.epoch, 1)
    page = await broker.history(ch, since=0, limit=10)
    offsets = [p.offset for p in page.publications]
    assert (page.epoch, page.start, offsets) == (position.epoch, 1, [1])


@single_redis
async def test_history_is_bounded_in_bytes(broker: RedisBroker) -> None:
    """history_bytes=2000: the oldest publications go once their data and info hold more
    than that."""
    ch = channel("bytes")
    payload = orjson.dumps("x" * 300)
    for _ in range(20):
        await broker.publish(ch, payload, INFO)
    page = await broker.history(ch, since=0, limit=100)
    assert all(p.data == payload and p.info == INFO for p in page.publications)
    sizes = [len(p.data) + len(p.info) for p in page.publications]
    assert sum(sizes) <= 2000 < sum(sizes) + sizes[0], sizes
    offsets = [p.offset for p in page.publications]
    assert offsets == list(range(21 - len(offsets), 21))
    assert page.start == offsets[0]


@single_redis
async def test_the_index_of_channels_in_use_forgets_expired_ones(fresh_redis: RedisServer) -> None:
    """``P:channels`` lists channels with presence; one whose entries expired leaves it."""
    b = RedisBroker(
        fresh_redis.url_for(unique_prefix("index")), history_size=10, history_ttl=60, presence_ttl=1
    )
    await b.start(Node(Settings(), b))
    try:
        with fresh_redis.client() as conn:
            conn.zadd(f"{b.prefix}:channels", {"gone:1": 1000, "live:1": 2**50})
            await async_wait_until(
                lambda: conn.zrange(f"{b.prefix}:channels", 0, -1) == [b"live:1"],
                4 * TIMEOUT,
                "the expired channel to leave the index",
            )
    finally:
        await b.close()
