"""The hub on roomcast's own transport (the ``roomcast.frames`` extension), without a server.

test_hub.py drives members over plain ASGI; here the member's transport takes prepared frames:
``write`` (take it now if under the high-water mark, else refuse) and ``send`` (wait for the
transport to drain). What must hold: a frame goes straight to the transport only when nothing
of the member's is queued or in flight (it would overtake it), the outbox keeps the order, its
bound cuts the member, and no writer task lives while there is nothing to wait for.
"""

from __future__ import annotations

import asyncio
from typing import Any

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.hub import Hub, Member
from roomcast.transport.frames import FRAMES_EXTENSION, OP_TEXT, build_frame

LEAVE = "left"


class FastPeer:
    """A transport with the frames extension: ``writable`` says whether ``write`` takes a
    frame; ``send`` blocks while ``draining`` is clear. Both record into one ordered list."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.direct = 0  # frames taken by write (no writer task involved)
        self.writable = True
        self.draining = asyncio.Event()
        self.draining.set()
        self.asgi: list[dict[str, Any]] = []
        self.buffered = 0  # bytes the transport holds (its "buffered" callable reports them)

    def write(self, frame: bytes) -> bool:
        if not self.writable:
            return False
        self.frames.append(frame)
        self.direct += 1
        return True

    async def send_frame(self, frame: bytes) -> None:
        await self.draining.wait()
        self.frames.append(frame)

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        await self.draining.wait()
        self.asgi.append(message)

    @property
    def texts(self) -> list[str]:
        return [frame[2:].decode() for frame in self.frames]  # short frames: 2-byte header

    @property
    def close_codes(self) -> list[int]:
        return [m["code"] for m in self.asgi if m["type"] == "websocket.close"]


def fast_member(hub: Hub, room: str = "r") -> tuple[FastPeer, Member]:
    peer = FastPeer()
    scope = {
        "type": "websocket",
        "path": "/ws/chat",
        "extensions": {
            FRAMES_EXTENSION: {
                "write": peer.write,
                "send": peer.send_frame,
                "buffered": lambda: peer.buffered,
            }
        },
    }
    conn = Connection(scope, peer.receive, peer.send, 1024)
    return peer, hub.join(conn, room, LEAVE)


async def settle(until: Any, rounds: int = 1000) -> None:
    for _ in range(rounds):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def frame(text: str) -> bytes:
    return build_frame(OP_TEXT, text.encode())


async def test_writable_member_gets_frames_directly_without_a_writer() -> None:
    hub = Hub(outbox_size=4)
    peer, member = fast_member(hub)
    assert member.fast
    for i in range(10):
        assert hub.broadcast("r", f"m{i}") == 1
    assert peer.frames == [frame(f"m{i}") for i in range(10)]
    assert peer.direct == 10
    assert not member._outbox
    assert hub.stats()["writer_tasks"] == 0
    await hub.stop()


async def test_a_frame_never_overtakes_one_queued_or_in_flight() -> None:
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()
    hub.broadcast("r", "m0")  # refused by the transport: queued, a writer starts
    assert list(member._outbox) == [frame("m0")]
    peer.writable = True
    hub.broadcast("r", "m1")  # the transport would take it, but m0 is queued ahead
    assert list(member._outbox) == [frame("m0"), frame("m1")]
    await settle(lambda: member._busy and len(member._outbox) == 1)  # m0 in flight
    hub.broadcast("r", "m2")  # nothing queued, but m0 is in flight: still behind it
    assert list(member._outbox) == [frame("m1"), frame("m2")]
    assert peer.frames == []
    peer.draining.set()
    await settle(lambda: len(peer.frames) == 3 and hub.stats()["writer_tasks"] == 0)
    assert peer.texts == ["m0", "m1", "m2"]
    assert peer.direct == 0
    # Drained and idle: straight to the transport again, and no writer task left behind.
    hub.broadcast("r", "m3")
    assert peer.texts == ["m0", "m1", "m2", "m3"]
    assert peer.direct == 1
    assert hub.stats()["writer_tasks"] == 0
    await hub.stop()


async def test_fast_member_is_cut_one_over_the_bound() -> None:
    hub = Hub(outbox_size=3)
    stalled, member = fast_member(hub)
    healthy, _ = fast_member(hub)
    stalled.writable = False
    stalled.draining.clear()
    hub.broadcast("r", "m0")
    await settle(lambda: member._busy and not member._outbox)  # m0 in flight
    for i in range(1, 4):
        hub.broadcast("r", f"m{i}")
        assert member.active
        assert len(member._outbox) == i
    hub.broadcast("r", "over")
    assert not member.active
    assert hub.stats()["chat_members"] == 1
    assert sum(hub.slow.values()) == 1
    # The healthy member got everything, then one leave notice.
    assert healthy.texts == ["m0", "m1", "m2", "m3", "over", LEAVE]
    stalled.draining.set()
    await settle(lambda: bool(stalled.close_codes))
    assert stalled.texts == ["m0"]
    assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]
    await hub.stop()


async def test_a_member_whose_peer_is_gone_is_not_counted_slow() -> None:
    """A closed connection's messages are dropped (its handler is leaving), not a cut."""
    hub = Hub(outbox_size=1)
    peer, member = fast_member(hub)
    other, _ = fast_member(hub)
    peer.writable = False
    member.conn.closed = True
    for i in range(5):
        assert hub.broadcast("r", f"m{i}") == 2
    assert not member._outbox
    assert hub.slow == {}
    assert hub.stats()["chat_members"] == 2
    assert other.texts == [f"m{i}" for i in range(5)]
    await hub.leave(member)
    assert other.texts[-1] == LEAVE
    await hub.stop()


async def test_forced_items_pass_the_bound() -> None:
    """``force`` (a recovery's replay, bounded by the history size) queues past the limit."""
    hub = Hub(outbox_size=2)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()
    for i in range(5):
        assert member.push(frame(f"r{i}"), force=True)
    assert len(member._outbox) + member._busy == 5
    assert not member.push(frame("live"))  # a peer-driven item still meets the bound
    peer.draining.set()
    await settle(lambda: len(peer.frames) == 5)
    assert peer.texts == [f"r{i}" for i in range(5)]
    await hub.stop()


async def test_queued_again_after_the_writer_ended() -> None:
    """The writer of a fast member ends when its outbox is empty; the next queued frame
    must start a new one (else it would sit in the outbox for good)."""
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    for round_ in range(3):
        peer.writable = False
        hub.broadcast("r", f"q{round_}")
        await settle(lambda: hub.stats()["writer_tasks"] == 0)
        assert not member._outbox
        peer.writable = True
    assert peer.texts == ["q0", "q1", "q2"]
    assert member._writer is None
    await hub.stop()


async def test_a_cancelled_send_leaves_the_member_idle() -> None:
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()
    hub.broadcast("r", "stuck")
    await settle(lambda: member._busy)
    await member.finish()
    assert not member._busy
    assert member._writer is None
    assert (member._queued, member._sending) == (0, 0)  # the bytes in flight are let go
    peer.writable = True
    hub.broadcast("r", "next")  # straight to the transport: nothing is in flight any more
    assert peer.texts == ["next"]
    await hub.stop()


async def test_a_send_to_a_vanished_peer_ends_the_member() -> None:
    """The transport raises (fast path) or the ASGI send fails: nothing more is queued."""
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    peer.writable = False

    async def gone(frame: bytes) -> None:
        raise OSError("peer gone")

    member._send_frame = gone
    hub.broadcast("r", "a")
    hub.broadcast("r", "b")
    await settle(lambda: not member.active and hub.stats()["writer_tasks"] == 0)
    assert not member._outbox
    await hub.stop()


async def test_close_after_current_sends_its_code_after_the_queue() -> None:
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    peer.writable = False
    hub.broadcast("r", "last words")
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
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    assert member._writer is None
    member.close_after_current("bye", CloseCode.GOING_AWAY)
    await settle(lambda: bool(peer.close_codes))
    assert peer.close_codes == [CloseCode.GOING_AWAY]


async def test_close_after_current_gives_up_on_a_stuck_send_after_grace() -> None:
    hub = Hub(outbox_size=8)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()  # never drains: the send in flight never ends
    hub.broadcast("r", "stuck")
    await settle(lambda: member._busy)
    writer = member._writer
    assert writer is not None
    member.close_after_current("too slow", grace=0.05)
    await asyncio.wait({writer}, timeout=5)
    assert writer.cancelled()
    assert member.conn.closed
    await hub.stop()


async def test_leave_marks_the_member_inactive() -> None:
    hub = Hub(outbox_size=8)
    _, member = fast_member(hub)
    await hub.leave(member)
    assert not member.active


async def test_counts_of_deliveries_and_cuts() -> None:
    """What /metrics reports, kept by the hub: deliveries (not to a member being cut), the
    text delivered, one fan-out time per broadcast, slow cuts; and kept past the room's end."""
    hub = Hub(outbox_size=1)
    stalled, member = fast_member(hub)
    fast_member(hub)
    stalled.writable = False
    stalled.draining.clear()
    hub.broadcast("r", "aa")  # both: stalled's is in its outbox
    await settle(lambda: member._busy)
    hub.broadcast("r", "bbb")  # both: stalled's outbox holds 1 now
    hub.broadcast("r", "cccc")  # healthy only: stalled is cut, and healthy hears it left
    sent, sent_bytes = hub.delivered()
    deliveries = 2 + 2 + 1 + 1
    assert sum(sent.values()) == deliveries
    assert sum(sent_bytes.values()) == 2 * 2 + 3 * 2 + 4 + len(LEAVE)
    assert sum(hub.fanout_time.counts) == 4
    assert 0 <= hub.fanout_time.sum < 1
    assert sum(hub.slow.values()) == 1
    await hub.leave(hub.members("r")[0])  # the room ends: its counts are kept
    assert hub.stats()["rooms"] == 0
    assert (sum(hub.delivered()[0].values()), sum(hub.delivered()[1].values())) == (
        deliveries,
        2 * 2 + 3 * 2 + 4 + len(LEAVE),
    )
    await hub.stop()


async def test_departures_go_through_the_relay() -> None:
    """With a shared broker the leave notice goes to the relay, not to the local members."""
    hub = Hub(outbox_size=4)
    relayed: list[tuple[str, str]] = []
    hub.relay = lambda room, text: relayed.append((room, text))
    _, leaving = fast_member(hub)
    staying, _ = fast_member(hub)
    await hub.leave(leaving)
    assert relayed == [("r", LEAVE)]
    assert staying.frames == []
    await hub.stop()


async def test_a_relay_that_delivers_at_once_stays_flat() -> None:
    """A relay that broadcasts synchronously (a local broker) re-enters the hub while it is
    telling departures: thousands of cascading cuts must still not recurse."""
    hub = Hub(outbox_size=1)

    def relay(room: str, text: str) -> None:
        hub.broadcast(room, text)

    hub.relay = relay
    peers = [fast_member(hub)[0] for _ in range(3000)]
    for peer in peers:
        peer.writable = False
        peer.draining.clear()
    hub.broadcast("r", "one")
    await asyncio.sleep(0)  # the writers take "one" and block sending it
    hub.broadcast("r", "two")
    hub.broadcast("r", "three")
    assert hub.stats()["chat_members"] == 0
    await hub.stop()


async def test_a_plain_asgi_send_that_fails_ends_the_member() -> None:
    hub = Hub(outbox_size=8)
    peer = FastPeer()

    async def gone(message: dict[str, Any]) -> None:
        raise OSError("peer gone")

    conn = Connection({"type": "websocket", "path": "/ws/chat"}, peer.receive, gone, 1024)
    member = hub.join(conn, "r", LEAVE)
    assert not member.fast
    hub.broadcast("r", "a")
    hub.broadcast("r", "b")
    await settle(lambda: not member.active)
    assert not member._outbox
    await hub.stop()


# -- the bound in bytes (ROOMCAST_OUTBOX_BYTES) ----------------------------------------------------

TEN = "12345678"  # a 10-byte frame (2-byte header)


async def test_byte_bound_is_exact_and_its_count_returns_to_zero() -> None:
    hub = Hub(outbox_size=100, outbox_bytes=30)
    peer, member = fast_member(hub)
    assert len(frame(TEN)) == 10
    # Rounds through the outbox, drained each time: the bytes counted go back to 0, so many
    # times the bound can pass over time.
    for _ in range(4):
        peer.writable = False
        peer.draining.clear()
        for _ in range(3):
            hub.broadcast("r", TEN)
        assert member.active
        peer.draining.set()
        await settle(lambda: not member._outbox and hub.stats()["writer_tasks"] == 0)
        assert (member._queued, member._sending) == (0, 0)
    peer.writable = False
    peer.draining.clear()
    hub.broadcast("r", TEN)
    await settle(lambda: member._busy)  # in flight: still counted, 10 bytes
    assert member._queued == 10
    hub.broadcast("r", TEN)
    hub.broadcast("r", TEN)  # 30: exactly the bound
    assert member.active
    assert member._queued == 30
    hub.broadcast("r", "x")  # 33
    assert not member.active
    assert member.overflow == "more than 30 bytes unread"
    assert member._queued == 10  # the outbox dropped; the frame in flight still counted
    peer.draining.set()
    await settle(lambda: bool(peer.close_codes))
    assert peer.asgi[-1]["reason"] == "too slow: more than 30 bytes unread"
    await hub.stop()


async def test_byte_bound_counts_the_transport_buffer() -> None:
    hub = Hub(outbox_size=100, outbox_bytes=30)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()
    peer.buffered = 15
    hub.broadcast("r", TEN)  # an empty outbox takes any one message
    assert member._queued == 10
    hub.broadcast("r", "1234")  # 10 + 15 buffered + 6 = 31
    assert not member.active
    assert member.overflow == "more than 30 bytes unread"
    await hub.stop()


async def test_count_bound_says_so() -> None:
    hub = Hub(outbox_size=2, outbox_bytes=10_000)
    peer, member = fast_member(hub)
    peer.writable = False
    peer.draining.clear()
    hub.broadcast("r", "m")
    await settle(lambda: member._busy)  # in flight
    hub.broadcast("r", "m")
    hub.broadcast("r", "m")
    assert member.active
    hub.broadcast("r", "m")  # the 4th: one in flight, two queued
    assert not member.active
    peer.draining.set()
    await settle(lambda: bool(peer.close_codes))
    assert peer.asgi[-1]["reason"] == "too slow: more than 2 messages unread"
    await hub.stop()
