"""The core's outbox on roomcast's own transport (the ``roomcast.frames`` extension), no server.

test_hub.py drives chat members over plain ASGI; here the member's transport takes prepared
frames: ``write`` (take it now if under the high-water mark, else refuse) and ``send`` (wait for
the transport to drain). What must hold: a frame goes straight to the transport only when nothing
of the member's is queued or in flight (it would overtake it), the outbox keeps the order, its
bound cuts the member, and no writer task lives while there is nothing to wait for.
"""

from __future__ import annotations

import asyncio

from core_support import (
    LEAVE,
    AsgiPeer,
    SharedMemoryBroker,
    chat_member,
    chat_stats,
    fast_member,
    running_node,
    say,
    session_of,
    settle,
)
from roomcast.closecodes import CloseCode
from roomcast.http.guide import chat_channel
from roomcast.transport.frames import OP_TEXT, build_frame


def frame(text: str) -> bytes:
    return build_frame(OP_TEXT, text.encode())


async def test_writable_member_gets_frames_directly_without_a_writer() -> None:
    async with running_node(outbox_size=4) as node:
        peer, member = await fast_member(node)
        assert member.fast
        for i in range(10):
            await say(node, f"m{i}")
        assert peer.frames == [frame(f"m{i}") for i in range(10)]
        assert peer.direct == 10
        assert not member._outbox
        assert chat_stats(node)["writer_tasks"] == 0


async def test_a_frame_never_overtakes_one_queued_or_in_flight() -> None:
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()
        await say(node, "m0")  # refused by the transport: queued, a writer starts
        assert list(member._outbox) == [frame("m0")]
        peer.writable = True
        await say(node, "m1")  # the transport would take it, but m0 is queued ahead
        assert list(member._outbox) == [frame("m0"), frame("m1")]
        await settle(lambda: member._busy and len(member._outbox) == 1)  # m0 in flight
        await say(node, "m2")  # nothing queued, but m0 is in flight: still behind it
        assert list(member._outbox) == [frame("m1"), frame("m2")]
        assert peer.frames == []
        peer.draining.set()
        await settle(lambda: len(peer.frames) == 3 and chat_stats(node)["writer_tasks"] == 0)
        assert peer.texts == ["m0", "m1", "m2"]
        assert peer.direct == 0
        # Drained and idle: straight to the transport again, and no writer task left behind.
        await say(node, "m3")
        assert peer.texts == ["m0", "m1", "m2", "m3"]
        assert peer.direct == 1
        assert chat_stats(node)["writer_tasks"] == 0


async def test_fast_member_is_cut_one_over_the_bound() -> None:
    async with running_node(outbox_size=3) as node:
        stalled, member = await fast_member(node)
        healthy, _ = await fast_member(node)
        stalled.writable = False
        stalled.draining.clear()
        await say(node, "m0")
        await settle(lambda: member._busy and not member._outbox)  # m0 in flight
        for i in range(1, 4):
            await say(node, f"m{i}")
            assert member.active
            assert len(member._outbox) == i
        await say(node, "over")
        assert not member.active
        assert sum(node.tally.slow.values()) == 1
        # It leaves the room (a task): the healthy member got everything, then one notice.
        await settle(lambda: chat_stats(node)["chat_members"] == 1)
        await settle(lambda: healthy.texts[-1:] == [LEAVE])
        assert healthy.texts == ["m0", "m1", "m2", "m3", "over", LEAVE]
        stalled.draining.set()
        await settle(lambda: bool(stalled.close_codes))
        assert stalled.texts == ["m0"]
        assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]


async def test_a_member_whose_peer_is_gone_is_not_counted_slow() -> None:
    """A closed connection's messages are dropped (its handler is leaving), not a cut."""
    async with running_node(outbox_size=1) as node:
        peer, member = await fast_member(node)
        other, _ = await fast_member(node)
        peer.writable = False
        member.conn.closed = True
        for i in range(5):
            await say(node, f"m{i}")
        assert not member._outbox
        assert node.tally.slow == {}
        assert chat_stats(node)["chat_members"] == 2
        assert other.texts == [f"m{i}" for i in range(5)]
        await node.detach(session_of(node, member))
        assert other.texts[-1] == LEAVE


async def test_forced_items_pass_the_bound() -> None:
    """``force`` (a recovery's replay, bounded by the history size) queues past the limit."""
    async with running_node(outbox_size=2) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()
        for i in range(5):
            assert member.push(frame(f"r{i}"), force=True)
        assert len(member._outbox) + member._busy == 5
        assert not member.push(frame("live"))  # a peer-driven item still meets the bound
        peer.draining.set()
        await settle(lambda: len(peer.frames) == 5)
        assert peer.texts == [f"r{i}" for i in range(5)]


async def test_queued_again_after_the_writer_ended() -> None:
    """The writer of a fast member ends when its outbox is empty; the next queued frame
    must start a new one (else it would sit in the outbox for good)."""
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        for round_ in range(3):
            peer.writable = False
            await say(node, f"q{round_}")
            await settle(lambda: chat_stats(node)["writer_tasks"] == 0)
            assert not member._outbox
            peer.writable = True
        assert peer.texts == ["q0", "q1", "q2"]
        assert member._writer is None


async def test_a_cancelled_send_leaves_the_member_idle() -> None:
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()
        await say(node, "stuck")
        await settle(lambda: member._busy)
        await member.finish()
        assert not member._busy
        assert member._writer is None
        assert (member._queued, member._sending) == (0, 0)  # the bytes in flight are let go
        peer.writable = True
        await say(node, "next")  # straight to the transport: nothing is in flight any more
        assert peer.texts == ["next"]


async def test_a_send_to_a_vanished_peer_ends_the_member() -> None:
    """The transport raises (fast path) or the ASGI send fails: nothing more is queued."""
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        peer.writable = False

        async def gone(frame: bytes) -> None:
            raise OSError("peer gone")

        member._send_frame = gone
        await say(node, "a")
        await say(node, "b")
        await settle(lambda: not member.active and chat_stats(node)["writer_tasks"] == 0)
        assert not member._outbox


async def test_close_after_current_sends_its_code_after_the_queue() -> None:
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        await say(node, "last words")
        member.close_after_current("restarting", CloseCode.SERVICE_RESTART, flush=True)
        assert not member.active
        await settle(lambda: bool(peer.close_codes))
        assert peer.texts == ["last words"]
        assert peer.asgi[-1] == {
            "type": "websocket.close",
            "code": CloseCode.SERVICE_RESTART,
            "reason": "restarting",
        }


async def test_close_after_current_on_an_idle_member() -> None:
    """No writer runs (fast path, nothing queued): the close still goes out at once."""
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        assert member._writer is None
        member.close_after_current("bye", CloseCode.GOING_AWAY)
        await settle(lambda: bool(peer.close_codes))
        assert peer.close_codes == [CloseCode.GOING_AWAY]


async def test_close_after_current_gives_up_on_a_stuck_send_after_grace() -> None:
    async with running_node(outbox_size=8) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()  # never drains: the send in flight never ends
        await say(node, "stuck")
        await settle(lambda: member._busy)
        writer = member._writer
        assert writer is not None
        member.close_after_current("too slow", grace=0.05)
        await asyncio.wait({writer}, timeout=5)
        assert writer.cancelled()
        assert member.conn.closed


async def test_leave_marks_the_member_inactive() -> None:
    async with running_node(outbox_size=8) as node:
        _, member = await fast_member(node)
        await node.detach(session_of(node, member))
        assert not member.active


async def test_counts_of_deliveries_and_cuts() -> None:
    """What /metrics reports, kept by the hub: deliveries (not to a member being cut), the
    text delivered, one fan-out time per publication, slow cuts; and kept past the room's end."""
    async with running_node(outbox_size=1) as node:
        stalled, member = await fast_member(node)
        healthy, _ = await fast_member(node)
        stalled.writable = False
        stalled.draining.clear()
        await say(node, "aa")  # both: stalled's is in its outbox
        await settle(lambda: member._busy)
        await say(node, "bbb")  # both: stalled's outbox holds 1 now
        await say(node, "cccc")  # healthy only: stalled is cut, and healthy hears it left
        await settle(lambda: healthy.texts[-1:] == [LEAVE])
        hub = node.hub
        sent, sent_bytes, kinds = hub.delivered()
        deliveries = 2 + 2 + 1 + 1
        payload = 2 * 2 + 3 * 2 + 4 + len(LEAVE)
        assert sum(sent.values()) == deliveries
        assert sent == {"/ws/chat": deliveries}
        assert sum(sent_bytes.values()) == payload
        assert kinds == {"chat": deliveries, "channel": 0}
        assert sum(hub.fanout_time["chat"].counts) == 4
        assert sum(hub.fanout_time["channel"].counts) == 0
        assert 0 <= hub.fanout_time["chat"].sum < 1
        assert node.tally.slow == {"/ws/chat": 1}
        await node.detach(session_of(node, member))
        await node.detach(next(s for s in node.sessions.values() if s.active))
        assert chat_stats(node)["rooms"] == 0  # the room ends: its counts are kept
        sent, sent_bytes, kinds = hub.delivered()
        assert (sum(sent.values()), sum(sent_bytes.values())) == (deliveries, payload)
        assert kinds["chat"] == deliveries


async def test_departures_go_through_the_broker() -> None:
    """With a shared broker the leave notice is published (for every node), and reaches the
    local members through the broker's delivery like any chat message."""
    broker = SharedMemoryBroker(history_size=10, history_ttl=60, history_channels=10)
    async with running_node(broker, outbox_size=4) as node:
        _, leaving = await fast_member(node)
        staying, _ = await fast_member(node)
        await node.detach(session_of(node, leaving))
        assert broker.published == [(chat_channel("r"), LEAVE.encode())]
        assert staying.texts == [LEAVE]


async def test_a_cascade_of_cuts_on_the_fast_path_stays_flat() -> None:
    """Each cut member's leave notice overflows others: thousands of cascading cuts must not
    recurse (each departure is its own task)."""
    async with running_node(outbox_size=1) as node:
        peers = [(await fast_member(node))[0] for _ in range(3000)]
        for peer in peers:
            peer.writable = False
            peer.draining.clear()
        await say(node, "one")
        await asyncio.sleep(0)  # the writers take "one" and block sending it
        await say(node, "two")
        await say(node, "three")
        assert all(not session.active for session in node.sessions.values())
        await settle(lambda: chat_stats(node)["chat_members"] == 0, rounds=10_000)


async def test_a_plain_asgi_send_that_fails_ends_the_member() -> None:
    async with running_node(outbox_size=8) as node:
        peer = AsgiPeer()
        peer.gone = True  # every send raises
        member = (await chat_member(node, peer)).outbox
        assert not member.fast
        await say(node, "a")
        await say(node, "b")
        await settle(lambda: not member.active)
        assert not member._outbox


# -- the bound in bytes (ROOMCAST_OUTBOX_BYTES) ----------------------------------------------------

TEN = "12345678"  # a 10-byte frame (2-byte header)


async def test_byte_bound_is_exact_and_its_count_returns_to_zero() -> None:
    async with running_node(outbox_size=100, unchecked={"outbox_bytes": 30}) as node:
        peer, member = await fast_member(node)
        assert len(frame(TEN)) == 10
        # Rounds through the outbox, drained each time: the bytes counted go back to 0, so many
        # times the bound can pass over time.
        for _ in range(4):
            peer.writable = False
            peer.draining.clear()
            for _ in range(3):
                await say(node, TEN)
            assert member.active
            peer.draining.set()
            await settle(lambda: not member._outbox and chat_stats(node)["writer_tasks"] == 0)
            assert (member._queued, member._sending) == (0, 0)
        peer.writable = False
        peer.draining.clear()
        await say(node, TEN)
        await settle(lambda: member._busy)  # in flight: still counted, 10 bytes
        assert member._queued == 10
        await say(node, TEN)
        await say(node, TEN)  # 30: exactly the bound
        assert member.active
        assert member._queued == 30
        await say(node, "x")  # 33
        assert not member.active
        assert member.overflow == "more than 30 bytes unread"
        assert member._queued == 10  # the outbox dropped; the frame in flight still counted
        peer.draining.set()
        await settle(lambda: bool(peer.close_codes))
        assert peer.asgi[-1]["reason"] == "too slow: more than 30 bytes unread"


async def test_byte_bound_counts_the_transport_buffer() -> None:
    async with running_node(outbox_size=100, unchecked={"outbox_bytes": 30}) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()
        peer.buffered = 15
        await say(node, TEN)  # an empty outbox takes any one message
        assert member._queued == 10
        await say(node, "1234")  # 10 + 15 buffered + 6 = 31
        assert not member.active
        assert member.overflow == "more than 30 bytes unread"


async def test_count_bound_says_so() -> None:
    async with running_node(outbox_size=2, outbox_bytes=10_000) as node:
        peer, member = await fast_member(node)
        peer.writable = False
        peer.draining.clear()
        await say(node, "m")
        await settle(lambda: member._busy)  # in flight
        await say(node, "m")
        await say(node, "m")
        assert member.active
        await say(node, "m")  # the 4th: one in flight, two queued
        assert not member.active
        peer.draining.set()
        await settle(lambda: bool(peer.close_codes))
        assert peer.asgi[-1]["reason"] == "too slow: more than 2 messages unread"
