"""Races of the core made deterministic: a broker whose awaits the test releases.

Against a real server these races depend on timing (a publication landing while a subscriber
recovers, while the node catches up from the history, while a chat member joins); here the
broker stops at the chosen await, the test publishes, then lets it go on. Each test checks the
stream a subscriber sees: every publication after its starting point, once, in order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from core_support import (
    AsgiPeer,
    GatedBroker,
    WsPeer,
    attach_ws,
    chat_member,
    running_node,
    say,
    settle,
)
from roomcast.brokers import Publication
from roomcast.core.node import Node
from roomcast.core.session import Session
from roomcast.http.channels import ChannelRequests
from roomcast.http.guide import chat_channel

CH = "race:c"


def attach(node: Node) -> tuple[WsPeer, Session, ChannelRequests]:
    return attach_ws(node)


async def subscribe(
    requests: ChannelRequests, session: Session, rid: int, **body: Any
) -> asyncio.Task[None]:
    """Start a subscribe request; it runs until the broker's gate stops it."""
    frame = json.dumps({"id": rid, "op": "subscribe", "channel": CH, **body})
    return asyncio.create_task(requests.handle(session, frame))


async def publish(node: Node, count: int, first: int = 0) -> None:
    for i in range(first, first + count):
        await node.publish(CH, json.dumps(i).encode(), b"null")


async def test_publications_while_a_subscriber_recovers_are_delivered_once_in_order() -> None:
    broker = GatedBroker()
    async with running_node(broker, tokens={"t": "u"}) as node:
        live_peer, live, live_requests = attach(node)
        await (await subscribe(live_requests, live, 1))
        await publish(node, 3)  # offsets 1..3
        epoch = live_peer.reply(1)["result"]["epoch"]
        reached, release = broker.gate("history")
        peer, session, requests = attach(node)
        task = await subscribe(requests, session, 1, recover={"offset": 1, "epoch": epoch})
        await reached.wait()  # the recovery is reading the history
        await publish(node, 2, first=3)  # offsets 4, 5 reach the node meanwhile
        assert peer.offsets() == []  # nothing before the reply
        release.set()
        await task
        result = peer.reply(1)["result"]
        assert (result["recovered"], result["offset"]) == (True, 5)
        assert peer.offsets() == [2, 3, 4, 5]  # the replay; the pending 4, 5 not again
        await publish(node, 1, first=5)
        assert peer.offsets() == [2, 3, 4, 5, 6]
        assert live_peer.offsets() == [1, 2, 3, 4, 5, 6]


async def test_publications_while_the_position_is_read_follow_the_reply() -> None:
    broker = GatedBroker()
    async with running_node(broker, tokens={"t": "u"}) as node:
        await publish(node, 2)
        reached, release = broker.gate("position")
        peer, session, requests = attach(node)
        task = await subscribe(requests, session, 1)
        await reached.wait()
        await publish(node, 2, first=2)  # offsets 3, 4: after the subscription, before the read
        release.set()
        await task
        # The reply reads offset 4: 3 and 4 are older than its starting point, not news.
        assert peer.reply(1)["result"]["offset"] == 4
        await publish(node, 1, first=4)
        assert peer.offsets() == [5]


async def test_publications_held_during_a_catch_up_come_after_the_history() -> None:
    """A gap makes the node read the history; what arrives while it reads is held back and
    delivered after what the history holds, once, in order."""
    broker = GatedBroker()
    async with running_node(broker, tokens={"t": "u"}) as node:
        peer, session, requests = attach(node)
        await (await subscribe(requests, session, 1))
        epoch = peer.reply(1)["result"]["epoch"]
        await publish(node, 1)  # offset 1, delivered
        reached, release = broker.gate("history")
        # Offsets 2 and 3 are stored, but the node's delivery of them is lost; 4 arrives.
        sink, broker._sink = broker._sink, None
        await publish(node, 2, first=1)
        broker._sink = sink
        await publish(node, 1, first=3)  # offset 4: a gap, the catch-up starts
        await reached.wait()
        await publish(node, 2, first=4)  # offsets 5, 6 while the history is read: held
        assert peer.offsets() == [1]
        release.set()
        await settle(lambda: len(peer.offsets()) >= 6)
        assert peer.offsets() == [1, 2, 3, 4, 5, 6]
        node.on_publication(CH, epoch, Publication(6, b"6", b"null"))  # a late duplicate
        assert peer.offsets() == [1, 2, 3, 4, 5, 6]


async def test_a_chat_member_hears_what_is_said_once_it_is_in() -> None:
    """A chat member joining waits for the broker's subscription; what is said before it is
    in is not its (the guide's chat has no history), everything after is."""
    broker = GatedBroker()
    async with running_node(broker) as node:
        early = AsgiPeer()
        await chat_member(node, early)
        reached, release = broker.gate("subscribe")
        joining = AsgiPeer()
        join = asyncio.create_task(chat_member(node, joining))
        await reached.wait()
        await say(node, "before")
        release.set()
        await join
        await say(node, "after")
        await settle(lambda: joining.texts == ["after"])
        await settle(lambda: early.texts == ["before", "after"])
        assert node.hub.channels[chat_channel("r")].subscribers.keys() == {
            s.id for s in node.sessions.values()
        }
