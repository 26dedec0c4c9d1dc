"""A subscribe racing the publications of its channel, made deterministic (no sockets).

A subscriber's stream must hold every publication after its reply's offset, once, in order. The
races that threaten that (a publication delivered to the node between the broker subscription
and the position or history read, or during the presence add) are timing-dependent against a
real server; here the broker publishes at exactly those moments, so the race happens every
time. Also: a client closed while its subscribe is in flight leaves no presence entry behind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core_support import WsPeer, attach_ws
from roomcast.brokers import Publication, from_settings
from roomcast.closecodes import CloseCode
from roomcast.core.node import Node
from roomcast.core.session import Session
from roomcast.http.channels import ChannelRequests
from roomcast.settings import Settings

CH = "race:c"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    settings = Settings(tokens={"t": "u"}, broker_url="memory://")
    node = Node(settings, from_settings(settings))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def attach(node: Node) -> tuple[WsPeer, Session]:
    peer, session, _ = attach_ws(node)
    return peer, session


async def eventually(predicate: Any, seconds: float = 5.0) -> None:
    """Wait for ``predicate()`` (a catch-up or a close runs as a task), failing after
    ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def request(node: Node, client: Session, rid: int, op: str, **body: Any) -> None:
    await ChannelRequests(node).handle(client, json.dumps({"id": rid, "op": op, **body}))


async def publish(node: Node, count: int) -> None:
    for i in range(count):
        await node.broker.publish(CH, json.dumps(i).encode(), b"null")


@pytest.mark.parametrize("read", ["position", "history"])
async def test_a_publication_between_subscribing_and_reading(node: Node, read: str) -> None:
    """Delivered to the node after its broker subscription and before the read: the read
    includes it, so the client has it from the reply (or the replay), never once more."""
    _, live_client = attach(node)
    await request(node, live_client, 1, "subscribe", channel=CH)
    await publish(node, 3)
    original = getattr(node.broker, read)

    async def racing(*args: Any, **kwargs: Any) -> Any:
        await publish(node, 1)  # offset 4: delivered to the node now, then read
        return await original(*args, **kwargs)

    setattr(node.broker, read, racing)
    peer, client = attach(node)
    if read == "history":
        epoch = (await node.broker.position(CH)).epoch
        await request(
            node, client, 1, "subscribe", channel=CH, recover={"offset": 2, "epoch": epoch}
        )
        assert peer.reply(1)["result"]["replayed"] == 2
    else:
        await request(node, client, 1, "subscribe", channel=CH)
    assert peer.reply(1)["result"]["offset"] == 4
    setattr(node.broker, read, original)
    await publish(node, 2)
    expected = [3, 4, 5, 6] if read == "history" else [5, 6]
    assert peer.offsets() == expected


async def test_publications_during_the_presence_add_follow_the_reply(node: Node) -> None:
    await publish(node, 2)
    original = node.broker.presence_add

    async def racing(*args: Any, **kwargs: Any) -> Any:
        await publish(node, 2)  # offsets 3 and 4: after the reply's offset, before it is sent
        return await original(*args, **kwargs)

    node.broker.presence_add = racing  # type: ignore[method-assign]
    peer, client = attach(node)
    await request(node, client, 1, "subscribe", channel=CH)
    assert peer.reply(1)["result"]["offset"] == 2
    node.broker.presence_add = original  # type: ignore[method-assign]
    await publish(node, 1)
    assert peer.offsets() == [3, 4, 5]
    frames = [f.get("id", f.get("offset")) for f in peer.frames if f.get("type") != "connected"]
    assert frames == [1, 3, 4, 5]  # the reply first, then the publications in order
    assert client.id in {e["client"] for e in await node.broker.presence(CH)}


async def test_closed_during_the_presence_add_leaves_no_entry(node: Node) -> None:
    original = node.broker.presence_add
    peer, client = attach(node)

    async def closing(*args: Any, **kwargs: Any) -> Any:
        await original(*args, **kwargs)
        node.close(client, CloseCode.POLICY_VIOLATION, "closed meanwhile")

    node.broker.presence_add = closing  # type: ignore[method-assign]
    await request(node, client, 1, "subscribe", channel=CH)
    assert await node.broker.presence(CH) == []
    assert [f for f in peer.frames if f.get("type") == "publication"] == []


class Held:
    """A sink that keeps publications back (a broker connection that is late to deliver)."""

    def __init__(self) -> None:
        self.held: list[tuple[str, str, Publication]] = []

    def on_publication(self, channel: str, epoch: str, publication: Publication) -> None:
        self.held.append((channel, epoch, publication))


async def test_a_replay_ahead_of_what_the_node_delivered(node: Node) -> None:
    """The history read holds a publication the node has not delivered yet: the recovering
    client gets it in its replay, not again when the node delivers it, then goes live."""
    live_peer, live_client = attach(node)
    await request(node, live_client, 1, "subscribe", channel=CH)
    await publish(node, 3)
    broker: Any = node.broker
    assert broker._sink is node  # the memory broker delivers to its sink at publish
    original = broker.history
    late = Held()

    async def ahead(*args: Any, **kwargs: Any) -> Any:
        broker._sink = late
        await publish(node, 1)  # offset 4: stored, not delivered yet
        broker._sink = node
        return await original(*args, **kwargs)

    broker.history = ahead
    peer, client = attach(node)
    epoch = (await broker.position(CH)).epoch
    await request(node, client, 1, "subscribe", channel=CH, recover={"offset": 2, "epoch": epoch})
    broker.history = original
    assert peer.reply(1)["result"]["replayed"] == 2
    assert peer.offsets() == [3, 4]
    ((channel, epoch, publication),) = late.held
    node.on_publication(channel, epoch, publication)  # delivered at last
    assert peer.offsets() == [3, 4]
    assert live_peer.offsets() == [1, 2, 3, 4]
    await publish(node, 2)
    assert peer.offsets() == [3, 4, 5, 6]
    assert live_peer.offsets() == [1, 2, 3, 4, 5, 6]


async def test_a_gap_after_a_recovery_is_filled_from_the_history(node: Node) -> None:
    """A node that knew nothing of the channel learns where it stands from the recovery's
    history read: a publication it then misses is a gap it fills, not one it skips."""
    broker: Any = node.broker
    await publish(node, 3)  # nobody here yet
    peer, client = attach(node)
    epoch = (await broker.position(CH)).epoch
    await request(node, client, 1, "subscribe", channel=CH, recover={"offset": 1, "epoch": epoch})
    assert peer.offsets() == [2, 3]
    late = Held()
    broker._sink = late
    await publish(node, 1)  # offset 4: lost on the way to the node
    broker._sink = node
    await publish(node, 1)  # offset 5: delivered, one past the next
    await eventually(lambda: len(peer.offsets()) >= 4)
    assert peer.offsets() == [2, 3, 4, 5]


async def test_a_new_epoch_learnt_from_a_subscribe_resets_the_old_subscribers(
    node: Node,
) -> None:
    """The stream began again (a Redis restart or an expired history) before any publication
    reached the node: the next subscribe reads the new epoch, and the subscribers of the old
    one are closed 1012 to recover (docs/protocol.md), instead of waiting on a dead stream."""
    broker: Any = node.broker
    old_peer, old_client = attach(node)
    await request(node, old_client, 1, "subscribe", channel=CH)
    first = old_peer.reply(1)["result"]["epoch"]
    broker._streams.clear()  # the stream is gone: its next use begins a new epoch
    peer, client = attach(node)
    await request(node, client, 1, "subscribe", channel=CH)
    assert peer.reply(1)["result"]["epoch"] != first
    assert not old_client.active
    assert client.active
    await eventually(lambda: bool(old_peer.closes))
    assert old_peer.closes == [CloseCode.SERVICE_RESTART]
