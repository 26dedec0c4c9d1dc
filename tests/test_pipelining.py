"""A sender's publications are under way together, in order, within a window (issue 16).

A node on Redis used to wait for each publication's round trip before reading the sender's next
message: a burst crossed Redis, and came back by pub/sub, one message per event-loop turn, and
each member paid a system call per message (9-12x less than memory://). Now a session's
publications are started without waiting (``Node.pipeline``), at most ``PUBLISH_WINDOW`` at
once, and the broker sends whatever commands are waiting as one pipeline (``AutoPipeline``).
These tests hold the properties that make that safe: order, replies, a bound, and requests that
see the publications before them.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from core_support import GatedBroker, attach_ws, running_node
from helpers import TIMEOUT, async_wait_until
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401 (a fixture)
    unique_prefix,
)
from roomcast.brokers.redis import RedisBroker
from roomcast.core.node import PUBLISH_WINDOW, PUBLISH_WINDOW_BYTES

CH = "pipe:c"
ANYONE = {"anonymous_subscribe": ["*"], "anonymous_publish": ["*"]}


def publish_frame(rid: int, n: int) -> str:
    return json.dumps({"id": rid, "op": "publish", "channel": CH, "data": n})


async def test_a_sender_has_at_most_a_window_of_publications_under_way() -> None:
    """Past the window, the sender's next frame is not read until the oldest is done: a client
    that publishes faster than the broker answers cannot queue without bound."""
    broker = GatedBroker()
    async with running_node(broker, **ANYONE) as node:
        peer, session, requests = attach_ws(node, user=None)  # type: ignore[arg-type]
        reached, release = broker.gate("publish")
        handled = 0

        async def sender() -> None:
            nonlocal handled
            for i in range(PUBLISH_WINDOW + 20):
                await requests.handle(session, publish_frame(i, i))
                handled += 1

        task = asyncio.create_task(sender())
        await reached.wait()
        for _ in range(20):
            await asyncio.sleep(0)
        assert session.publishing is not None
        assert len(session.publishing) == PUBLISH_WINDOW
        assert handled == PUBLISH_WINDOW, "frames past the window were read"
        assert [f for f in peer.frames if f.get("type") == "reply"] == []
        release.set()
        async with asyncio.timeout(TIMEOUT):
            await task
            await node.settle(session)
        replies = [f for f in peer.frames if f.get("id") is not None]
        assert [f["id"] for f in replies] == list(range(PUBLISH_WINDOW + 20)), "replies in order"
        assert [f["result"]["offset"] for f in replies] == list(range(1, PUBLISH_WINDOW + 21))


async def test_a_sender_has_at_most_a_mebibyte_of_publications_under_way() -> None:
    """Big messages fill the window by their bytes first: 64 kB each, 16 under way at most."""
    broker = GatedBroker()
    size = 64_000
    async with running_node(broker, max_publication_size=size + 100, **ANYONE) as node:
        peer, session, requests = attach_ws(node, user=None)  # type: ignore[arg-type]
        reached, release = broker.gate("publish")
        big = "x" * (size - 2)  # a JSON string of size bytes

        async def sender() -> None:
            for i in range(40):
                frame = json.dumps({"id": i, "op": "publish", "channel": CH, "data": big})
                await requests.handle(session, frame)

        task = asyncio.create_task(sender())
        await reached.wait()
        for _ in range(20):
            await asyncio.sleep(0)
        assert session.publishing is not None
        assert len(session.publishing) == PUBLISH_WINDOW_BYTES // size
        assert session.publishing_bytes <= PUBLISH_WINDOW_BYTES
        release.set()
        async with asyncio.timeout(TIMEOUT):
            await task
            await node.settle(session)
        assert session.publishing_bytes == 0
        replies = [f for f in peer.frames if f.get("id") is not None]
        assert [f["result"]["offset"] for f in replies] == list(range(1, 41))


async def test_a_request_after_publications_sees_them_and_is_answered_after_them() -> None:
    broker = GatedBroker()
    async with running_node(broker, **ANYONE) as node:
        peer, session, requests = attach_ws(node, user=None)  # type: ignore[arg-type]
        reached, release = broker.gate("publish")
        for i in range(3):
            await requests.handle(session, publish_frame(i, i))
        history = json.dumps({"id": 9, "op": "history", "channel": CH})
        task = asyncio.create_task(requests.handle(session, history))
        await reached.wait()
        await asyncio.sleep(0.05)
        assert not task.done(), "the history request did not wait for the publications"
        release.set()
        async with asyncio.timeout(TIMEOUT):
            await task
        ids = [f["id"] for f in peer.frames if f.get("id") is not None]
        assert ids == [0, 1, 2, 9]
        publications = peer.reply(9)["result"]["publications"]
        assert [p["data"] for p in publications] == [0, 1, 2]


@pytest.mark.redis
async def test_a_burst_crosses_redis_in_a_few_round_trips_in_order(
    redis_server: RedisServer,
) -> None:
    """200 publications sent back to back by one client: a handful of pipelines, not 200 round
    trips; offsets and replies in the order sent."""
    broker = RedisBroker(
        redis_server.url_for(unique_prefix("pipe")),
        history_size=1000,
        history_ttl=600,
        presence_ttl=30,
    )
    async with running_node(broker, **ANYONE) as node:
        peer, session, requests = attach_ws(node, user=None)  # type: ignore[arg-type]
        subscribe = json.dumps({"id": -1, "op": "subscribe", "channel": CH})
        await requests.handle(session, subscribe)
        assert "result" in peer.reply(-1), peer.reply(-1)
        pipe = broker._pipe
        assert pipe is not None
        before = pipe.batches
        for i in range(200):
            await requests.handle(session, publish_frame(i, i))
        async with asyncio.timeout(TIMEOUT):
            await node.settle(session)
        await async_wait_until(lambda: len(peer.offsets()) == 200, what="200 publications")
        batches = pipe.batches - before
        assert batches <= 10, f"200 publications took {batches} round trips"
        replies = [f for f in peer.frames if f.get("id") is not None and f["id"] >= 0]
        assert [f["result"]["offset"] for f in replies] == list(range(1, 201))
        assert peer.offsets() == list(range(1, 201))
        data = [f["data"] for f in peer.frames if f.get("type") == "publication"]
        assert data == list(range(200))
