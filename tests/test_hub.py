"""The hub without a server: bounded outboxes, the overflow policy, clean leaves.

The "socket" here is an ASGI send callable that a test can block, standing in for a peer whose
transport buffer is full (uvicorn's send then waits for the transport to drain).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.hub import Hub

LEAVE = "left"


class Peer:
    """An ASGI peer: records what is sent, and can stop draining like a stalled client."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.draining = asyncio.Event()
        self.draining.set()
        self.gone = False

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # the hub never reads
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        await self.draining.wait()
        if self.gone:
            raise OSError("peer gone")
        self.sent.append(message)

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.sent if m["type"] == "websocket.send"]

    @property
    def close_codes(self) -> list[int]:
        return [m["code"] for m in self.sent if m["type"] == "websocket.close"]


def member_of(hub: Hub, room: str = "r") -> tuple[Peer, Any]:
    peer = Peer()
    conn = Connection({"type": "websocket", "path": "/ws/chat"}, peer.receive, peer.send, 1024)
    return peer, hub.join(conn, room, LEAVE)


async def settle(hub: Hub, until: Any, rounds: int = 1000) -> None:
    """Let writer tasks run until ``until()`` holds (bounded)."""
    for _ in range(rounds):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_broadcast_reaches_every_member_in_order() -> None:
    hub = Hub(outbox_size=8)
    peers = [member_of(hub)[0] for _ in range(3)]
    for i in range(5):
        assert hub.broadcast("r", f"m{i}") == 3
    await settle(hub, lambda: all(len(p.texts) == 5 for p in peers))
    for peer in peers:
        assert peer.texts == [f"m{i}" for i in range(5)]
    await hub.stop()


async def test_broadcast_builds_one_message_for_all_members() -> None:
    hub = Hub(outbox_size=8)
    peers = [member_of(hub)[0] for _ in range(4)]
    hub.broadcast("r", "once")
    await settle(hub, lambda: all(p.sent for p in peers))
    first = peers[0].sent[0]
    assert all(p.sent[0] is first for p in peers)
    await hub.stop()


async def test_stalled_member_is_cut_and_others_keep_receiving() -> None:
    hub = Hub(outbox_size=4)
    stalled, _ = member_of(hub)
    healthy = [member_of(hub)[0] for _ in range(2)]
    stalled.draining.clear()
    for i in range(50):
        hub.broadcast("r", f"m{i}")
        await asyncio.sleep(0)
    await settle(hub, lambda: all(len(p.texts) >= 51 for p in healthy))
    for peer in healthy:
        # all 50 messages, plus exactly one leave notice for the cut member, in order
        assert [t for t in peer.texts if t != LEAVE] == [f"m{i}" for i in range(50)]
        assert peer.texts.count(LEAVE) == 1
    assert hub.stats()["chat_members"] == 2
    # Once the stalled peer drains, it gets what was in flight and then close 1013.
    stalled.draining.set()
    await settle(hub, lambda: bool(stalled.close_codes))
    assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]
    assert len(stalled.texts) <= 1
    await hub.stop()


async def test_leave_removes_member_tells_others_and_stops_writer() -> None:
    hub = Hub(outbox_size=4)
    _, a = member_of(hub)
    pb, _ = member_of(hub)
    pc, _ = member_of(hub)
    await hub.leave(a)
    await hub.leave(a)  # idempotent
    await settle(hub, lambda: pb.texts == [LEAVE] and pc.texts == [LEAVE])
    assert hub.stats() == {"rooms": 1, "chat_members": 2, "writer_tasks": 2}
    await hub.stop()
    assert hub.stats() == {"rooms": 0, "chat_members": 0, "writer_tasks": 0}


async def test_mass_leave_every_remaining_member_gets_every_notice() -> None:
    hub = Hub(outbox_size=1024)
    members = [member_of(hub) for _ in range(40)]
    leaving, staying = members[:20], members[20:]
    for peer, _ in leaving[:10]:
        peer.gone = True  # half of them vanish abruptly: their sends fail
    await asyncio.gather(*(hub.leave(m) for _, m in leaving))
    await settle(hub, lambda: all(len(p.texts) == 20 for p, _ in staying))
    for peer, _ in staying:
        assert peer.texts == [LEAVE] * 20
    await hub.stop()


async def test_member_whose_peer_is_gone_does_not_break_broadcast() -> None:
    hub = Hub(outbox_size=4)
    gone, _ = member_of(hub)
    ok, _ = member_of(hub)
    gone.gone = True
    hub.broadcast("r", "x")
    hub.broadcast("r", "y")
    await settle(hub, lambda: ok.texts == ["x", "y"])
    await hub.stop()


async def test_rooms_are_isolated_and_empty_rooms_disappear() -> None:
    hub = Hub(outbox_size=4)
    pa, a = member_of(hub, "a")
    pb, b = member_of(hub, "b")
    assert hub.broadcast("a", "to-a") == 1
    assert hub.broadcast("nobody", "x") == 0
    await settle(hub, lambda: pa.texts == ["to-a"])
    assert pb.texts == []
    await hub.leave(a)
    await hub.leave(b)
    assert hub.stats() == {"rooms": 0, "chat_members": 0, "writer_tasks": 0}


@pytest.mark.parametrize("size", [1, 3])
async def test_outbox_never_exceeds_its_bound(size: int) -> None:
    hub = Hub(outbox_size=size)
    stalled, member = member_of(hub)
    stalled.draining.clear()
    # The writer takes the first message and blocks sending it; the next `size` fill the
    # outbox exactly, and the member is still in.
    hub.broadcast("r", "m0")
    await settle(hub, lambda: not member._outbox and member._busy)
    for i in range(1, size + 1):
        hub.broadcast("r", f"m{i}")
        assert len(member._outbox) == i
        assert member.active
    assert hub.stats()["chat_members"] == 1
    # One more than the bound is the cut: out of the room, its outbox dropped, 1013 queued.
    hub.broadcast("r", "over")
    assert not member.active
    assert hub.stats()["chat_members"] == 0
    assert len(member._outbox) == 1  # only the close marker is left
    for i in range(20):  # a cut member takes nothing more, however much is broadcast
        hub.broadcast("r", f"after{i}")
        assert len(member._outbox) <= size
    stalled.draining.set()
    await settle(hub, lambda: bool(stalled.close_codes))
    assert stalled.texts == ["m0"]
    assert stalled.close_codes == [CloseCode.TRY_AGAIN_LATER]
    await hub.stop()


async def test_a_cascade_of_cuts_stays_flat() -> None:
    """Every leave notice overflows someone else: thousands of cuts, no recursion."""
    hub = Hub(outbox_size=1)
    peers = [member_of(hub)[0] for _ in range(3000)]
    for peer in peers:
        peer.draining.clear()
    await asyncio.sleep(0)  # plain-ASGI writers start and block on their first send
    hub.broadcast("r", "one")
    hub.broadcast("r", "two")
    assert hub.stats()["chat_members"] == 0
    await hub.stop()


async def test_leave_without_notice() -> None:
    hub = Hub(outbox_size=4)
    _, a = member_of(hub)
    pb, _ = member_of(hub)
    await hub.leave(a, notify=False)
    hub.broadcast("r", "after")
    await settle(hub, lambda: pb.texts == ["after"])
    await hub.stop()
