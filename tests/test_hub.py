"""The guide's chat rooms on the core without a server: bounded outboxes, the overflow policy,
clean leaves.

A chat room is a channel without history on the node's hub; its members are sessions with the
guide's codec. The "socket" here is an ASGI send callable that a test can block, standing in for
a peer whose transport buffer is full (uvicorn's send then waits for the transport to drain).
"""

from __future__ import annotations

import asyncio

import pytest

from core_support import (
    LEAVE,
    AsgiPeer,
    SharedMemoryBroker,
    chat_member,
    chat_stats,
    running_node,
    say,
    settle,
)
from roomcast.closecodes import CloseCode
from roomcast.http.guide import chat_channel


async def test_broadcast_reaches_every_member_in_order() -> None:
    async with running_node(outbox_size=8) as node:
        peers = [AsgiPeer() for _ in range(3)]
        for peer in peers:
            await chat_member(node, peer)
        for i in range(5):
            await say(node, f"m{i}")
        await settle(lambda: all(len(p.texts) == 5 for p in peers))
        for peer in peers:
            assert peer.texts == [f"m{i}" for i in range(5)]


async def test_broadcast_builds_one_message_for_all_members() -> None:
    async with running_node(outbox_size=8) as node:
        peers = [AsgiPeer() for _ in range(4)]
        for peer in peers:
            await chat_member(node, peer)
        await say(node, "once")
        await settle(lambda: all(p.sent for p in peers))
        first = peers[0].sent[0]
        assert all(p.sent[0] is first for p in peers)


async def test_stalled_member_is_cut_and_others_keep_receiving() -> None:
    async with running_node(outbox_size=4) as node:
        stalled = AsgiPeer()
        await chat_member(node, stalled)
        healthy = [AsgiPeer() for _ in range(2)]
        for peer in healthy:
            await chat_member(node, peer)
        stalled.draining.clear()
        for i in range(50):
            await say(node, f"m{i}")
            await asyncio.sleep(0)
        await settle(lambda: all(len(p.texts) >= 51 for p in healthy))
        for peer in healthy:
            # all 50 messages, plus exactly one leave notice for the cut member, in order
            assert [t for t in peer.texts if t != LEAVE] == [f"m{i}" for i in range(50)]
            assert peer.texts.count(LEAVE) == 1
        assert chat_stats(node)["chat_members"] == 2
        # Once the stalled peer drains, it gets what was in flight and then close 1013.
        stalled.draining.set()
        await settle(lambda: bool(stalled.close_codes))
        assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]
        assert len(stalled.texts) <= 1


async def test_leave_removes_member_tells_others_and_stops_writer() -> None:
    node_stats = None
    async with running_node(outbox_size=4) as node:
        a = await chat_member(node, AsgiPeer())
        pb, pc = AsgiPeer(), AsgiPeer()
        await chat_member(node, pb)
        await chat_member(node, pc)
        await node.detach(a)
        await node.detach(a)  # idempotent
        await settle(lambda: pb.texts == [LEAVE] and pc.texts == [LEAVE])
        assert chat_stats(node) == {"rooms": 1, "chat_members": 2, "writer_tasks": 2}
    node_stats = chat_stats(node)
    assert node_stats == {"rooms": 0, "chat_members": 0, "writer_tasks": 0}


async def test_mass_leave_every_remaining_member_gets_every_notice() -> None:
    async with running_node(outbox_size=1024) as node:
        leaving = []
        for i in range(20):
            peer = AsgiPeer()
            peer.gone = i < 10  # half of them vanish abruptly: their sends fail
            leaving.append(await chat_member(node, peer))
        staying = [AsgiPeer() for _ in range(20)]
        for peer in staying:
            await chat_member(node, peer)
        await asyncio.gather(*(node.detach(m) for m in leaving))
        await settle(lambda: all(len(p.texts) == 20 for p in staying))
        for peer in staying:
            assert peer.texts == [LEAVE] * 20


async def test_member_whose_peer_is_gone_does_not_break_broadcast() -> None:
    async with running_node(outbox_size=4) as node:
        gone, ok = AsgiPeer(), AsgiPeer()
        await chat_member(node, gone)
        await chat_member(node, ok)
        gone.gone = True
        await say(node, "x")
        await say(node, "y")
        await settle(lambda: ok.texts == ["x", "y"])


async def test_rooms_are_isolated_and_empty_rooms_disappear() -> None:
    async with running_node(outbox_size=4) as node:
        pa, pb = AsgiPeer(), AsgiPeer()
        a = await chat_member(node, pa, "a")
        b = await chat_member(node, pb, "b")
        await say(node, "to-a", "a")
        await say(node, "x", "nobody")
        await settle(lambda: pa.texts == ["to-a"])
        assert pb.texts == []
        assert chat_stats(node)["rooms"] == 2
        await node.detach(a)
        await node.detach(b)
        assert chat_stats(node) == {"rooms": 0, "chat_members": 0, "writer_tasks": 0}


@pytest.mark.parametrize("size", [1, 3])
async def test_outbox_never_exceeds_its_bound(size: int) -> None:
    async with running_node(outbox_size=size) as node:
        stalled = AsgiPeer()
        member = await chat_member(node, stalled)
        outbox = member.outbox
        stalled.draining.clear()
        # The writer takes the first message and blocks sending it; the next `size` fill the
        # outbox exactly, and the member is still in.
        await say(node, "m0")
        await settle(lambda: not outbox._outbox and outbox._busy)
        for i in range(1, size + 1):
            await say(node, f"m{i}")
            assert len(outbox._outbox) == i
            assert member.active
        assert chat_stats(node)["chat_members"] == 1
        # One more than the bound is the cut: out of the fan-out at once, its outbox dropped,
        # 1013 queued; out of the room once its leave task ran.
        await say(node, "over")
        assert not member.active
        assert not node.hub.channels[chat_channel("r")].live[member.codec]
        assert len(outbox._outbox) == 1  # only the close marker is left
        for i in range(20):  # a cut member takes nothing more, however much is broadcast
            await say(node, f"after{i}")
            assert len(outbox._outbox) <= size
        await settle(lambda: chat_stats(node)["chat_members"] == 0)
        stalled.draining.set()
        await settle(lambda: bool(stalled.close_codes))
        assert stalled.texts == ["m0"]
        assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]


async def test_a_cascade_of_cuts_stays_flat() -> None:
    """Every leave notice overflows someone else: thousands of cuts, no recursion."""
    async with running_node(outbox_size=1) as node:
        peers = [AsgiPeer() for _ in range(3000)]
        for peer in peers:
            await chat_member(node, peer)
            peer.draining.clear()
        await say(node, "one")
        await asyncio.sleep(0)  # plain-ASGI writers take "one" and block on sending it
        await say(node, "two")
        await say(node, "three")
        assert all(not session.active for session in node.sessions.values())
        await settle(lambda: chat_stats(node)["chat_members"] == 0, rounds=10_000)


async def test_leave_without_notice() -> None:
    async with running_node(outbox_size=4) as node:
        a = await chat_member(node, AsgiPeer())
        pb = AsgiPeer()
        await chat_member(node, pb)
        await node.detach(a, notify=False)
        await say(node, "after")
        await settle(lambda: pb.texts == ["after"])


async def test_the_last_member_leaving_is_heard_on_other_nodes_only_with_a_shared_broker() -> None:
    """Its farewell is published for the room's members elsewhere; with the memory broker
    (this process is the whole cluster) an empty room has nobody to tell."""
    broker = SharedMemoryBroker(history_size=10, history_ttl=60, history_channels=10)
    async with running_node(broker, outbox_size=4) as node:
        await node.detach(await chat_member(node, AsgiPeer()))
        assert broker.published == [(chat_channel("r"), LEAVE.encode())]
    memory = SharedMemoryBroker(history_size=10, history_ttl=60, history_channels=10)
    memory.shared = False
    async with running_node(memory, outbox_size=4) as node:
        await node.detach(await chat_member(node, AsgiPeer()))
        assert memory.published == []
