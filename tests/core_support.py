"""In-process pieces for tests of the core: a node on the memory broker, ASGI peers, members.

No sockets: a "peer" is the ASGI ``send``/``receive`` pair (and, for roomcast's own transport,
the ``roomcast.frames`` extension's callables) that a test can stall, standing in for a client
whose transport buffer is full.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from roomcast.brokers import Broker, MemoryBroker
from roomcast.closecodes import CloseCode
from roomcast.codecs.guide import CODEC as GUIDE
from roomcast.connection import Connection
from roomcast.core.node import Node
from roomcast.core.outbox import Outbox
from roomcast.core.session import Session
from roomcast.http.channels import ChannelRequests
from roomcast.http.guide import chat_channel
from roomcast.settings import Settings
from roomcast.transport.frames import FRAMES_EXTENSION

LEAVE = "left"


class AsgiPeer:
    """A plain ASGI peer: records what is sent, and can stop draining like a stalled client."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.draining = asyncio.Event()
        self.draining.set()
        self.gone = False

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # the core never reads
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

    def connection(self, path: str = "/ws/chat") -> Connection:
        scope = {"type": "websocket", "path": path}
        return Connection(scope, self.receive, self.send, 1024, endpoint=path)


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

    def connection(self, path: str = "/ws/chat") -> Connection:
        scope = {
            "type": "websocket",
            "path": path,
            "extensions": {
                FRAMES_EXTENSION: {
                    "write": self.write,
                    "send": self.send_frame,
                    "buffered": lambda: self.buffered,
                }
            },
        }
        return Connection(scope, self.receive, self.send, 1024, endpoint=path)


class WsPeer:
    """A ``/ws`` client's side on roomcast's transport: every frame the node sends, parsed."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closes: list[int] = []

    def write(self, frame: bytes) -> bool:
        self.frames.append(json.loads(frame[2:] if frame[1] < 126 else frame[4:]))
        return True

    async def send_frame(self, frame: bytes) -> None:
        self.write(frame)

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            self.closes.append(message["code"])

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f.get("type") == "publication"]

    def reply(self, request_id: int) -> dict[str, Any]:
        (found,) = [f for f in self.frames if f.get("id") == request_id]
        return found


def attach_ws(node: Node, user: str = "u") -> tuple[WsPeer, Session, ChannelRequests]:
    """A ``/ws`` session of ``user`` on ``node``, as the endpoint makes one (accepted)."""
    peer = WsPeer()
    scope = {
        "type": "websocket",
        "path": "/ws",
        "extensions": {FRAMES_EXTENSION: {"write": peer.write, "send": peer.send_frame}},
    }
    requests = ChannelRequests(node)
    conn = Connection(scope, peer.receive, peer.send, 1 << 20, endpoint="/ws")
    return peer, requests.attach(conn, user), requests


class SharedMemoryBroker(MemoryBroker):
    """The memory broker posing as a shared one (as Redis is), recording what is published."""

    shared = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, channel: str, data: bytes, info: bytes, *, history: bool = True) -> Any:
        self.published.append((channel, data))
        return await super().publish(channel, data, info, history=history)


@asynccontextmanager
async def running_node(
    broker: Broker | None = None, *, unchecked: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[Node]:
    """A started node (the memory broker unless ``broker``), stopped at the end.

    ``unchecked`` settings skip validation: bounds smaller than a server may use, so that a
    test can count bytes by hand.
    """
    checked = Settings(**settings)
    node = Node(checked.model_copy(update=unchecked) if unchecked else checked, broker)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def chat_member(
    node: Node, peer: AsgiPeer | FastPeer, room: str = "r", *, path: str = "/ws/chat"
) -> Session:
    """A member of chat room ``room``, as the guide's chat endpoint makes one (accepted)."""
    session = node.open(
        peer.connection(path),
        GUIDE,
        node.auth.anonymous,
        slow_code=CloseCode.TRY_AGAIN_LATER,
        farewell=LEAVE.encode(),
    )
    node.go_live(await node.join(session, chat_channel(room)))
    return session


async def say(node: Node, text: str, room: str = "r") -> None:
    """Publish ``text`` to chat room ``room`` (the memory broker delivers it before returning)."""
    await node.publish(chat_channel(room), text.encode(), b"", history=False)


def chat_stats(node: Node) -> dict[str, int]:
    """The chat part of ``/stats``."""
    stats = node.stats()
    return {key: stats[key] for key in ("rooms", "chat_members", "writer_tasks")}


async def settle(until: Any, rounds: int = 1000) -> None:
    """Let tasks run until ``until()`` holds (bounded)."""
    for _ in range(rounds):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def fast_member(node: Node, room: str = "r") -> tuple[FastPeer, Outbox]:
    """A chat member on roomcast's own transport: its peer and its outbox."""
    peer = FastPeer()
    session = await chat_member(node, peer, room)
    return peer, session.outbox


def session_of(node: Node, outbox: Outbox) -> Session:
    """The session whose outbox ``outbox`` is."""
    return node.sessions[str(outbox.conn.id)]


class GatedBroker(MemoryBroker):
    """The memory broker whose chosen calls wait at a gate that the test opens.

    ``gate(op)`` closes the gate of ``op`` (``subscribe``, ``position``, ``history``,
    ``publish``, ``presence_add``) and returns ``(reached, release)``: ``reached`` is set once a
    call is waiting there, and setting ``release`` lets it (and every later one) through. A race
    that a real broker makes by being slow then happens at exactly the chosen await, every time.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("history_size", 100)
        kwargs.setdefault("history_ttl", 600.0)
        kwargs.setdefault("history_channels", 100)
        super().__init__(**kwargs)
        self._gates: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}

    def gate(self, op: str) -> tuple[asyncio.Event, asyncio.Event]:
        gate = self._gates[op] = (asyncio.Event(), asyncio.Event())
        return gate

    async def _pass(self, op: str) -> None:
        gate = self._gates.get(op)
        if gate is not None:
            reached, release = gate
            reached.set()
            await release.wait()

    async def subscribe(self, channel: str) -> None:
        await self._pass("subscribe")
        await super().subscribe(channel)

    async def position(self, channel: str) -> Any:
        await self._pass("position")
        return await super().position(channel)

    async def history(self, channel: str, **kwargs: Any) -> Any:
        await self._pass("history")
        return await super().history(channel, **kwargs)

    async def publish(self, channel: str, data: bytes, info: bytes, *, history: bool = True) -> Any:
        await self._pass("publish")
        return await super().publish(channel, data, info, history=history)

    async def presence_add(self, channel: str, client: str, entry: dict[str, Any]) -> None:
        await self._pass("presence_add")
        await super().presence_add(channel, client, entry)
