"""The core in-process, no sockets: fan-out cost per publication and memory per chat member.

``python benchmarks/core_micro.py`` measures the roomcast on ``PYTHONPATH`` (``src/`` first, as
the servers of run.py are): microseconds per publication to 1,000 chat members and to 1,000
``/ws`` subscribers whose transports take every frame at once (the fan-out loop and the
encoding, without the network), and the bytes of core objects a chat member costs
(tracemalloc). It also runs on the code from before the one-core redesign (``Runtime``,
``hub.Member``), so that a redesign can be compared in one sitting:
``PYTHONPATH=<old checkout>/src python benchmarks/core_micro.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from roomcast.connection import Connection
from roomcast.settings import Settings
from roomcast.transport.frames import FRAMES_EXTENSION

RECIPIENTS = 1000
PUBLICATIONS = 2000
ROUNDS = 5
MEMBERS = 2000
INFO = b'{"client":null,"user":null}'


class Sink:
    """A transport that takes every frame at once and counts them."""

    def __init__(self) -> None:
        self.frames = 0

    def write(self, frame: bytes) -> bool:
        self.frames += 1
        return True

    async def send_frame(self, frame: bytes) -> None:
        self.frames += 1

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        return None


def connection(sink: Sink, path: str) -> Connection:
    frames = {"write": sink.write, "send": sink.send_frame, "buffered": lambda: 0}
    scope = {"type": "websocket", "path": path, "extensions": {FRAMES_EXTENSION: frames}}
    return Connection(scope, sink.receive, sink.send, 1 << 20, endpoint=path)


Publish = Callable[[int], Awaitable[Any]]


class Core:
    """The same operations on the core as it is now, or as it was before the redesign."""

    def __init__(self) -> None:
        settings = Settings(tokens={"t": "u"}, max_connections_per_user=0)
        try:
            from roomcast.core.node import Node
        except ImportError:
            from roomcast.runtime import Runtime  # type: ignore[import-not-found]

            self.old: Any = Runtime(settings)
            self.node: Any = None
        else:
            self.old = None
            self.node = Node(settings)

    @property
    def label(self) -> str:
        return "before the one-core redesign" if self.node is None else "one core"

    async def start(self) -> None:
        await (self.old.node if self.node is None else self.node).start()

    async def chat_member(self, conn: Connection) -> object:
        if self.node is None:
            await self.old.join_room("/")
            return self.old.hub.join(conn, "/", "A client left the chat")
        from roomcast.closecodes import CloseCode
        from roomcast.codecs.guide import CODEC

        node = self.node
        session = node.open(
            conn,
            CODEC,
            node.auth.anonymous,
            slow_code=CloseCode.TRY_AGAIN_LATER,
            farewell=b"A client left the chat",
        )
        node.go_live(await node.join(session, "chat/"))
        return session

    def chat(self) -> Publish:
        if self.node is None:
            return lambda i: self.old.chat_publish("/", f"Client says: hello {i}")
        node = self.node
        return lambda i: node.publish("chat/", b"Client says: hello %d" % i, b"", history=False)

    async def subscriber(self, conn: Connection) -> None:
        frame = json.dumps({"id": 1, "op": "subscribe", "channel": "c"})
        if self.node is None:
            client = self.old.node.attach(conn, "u")
            await self.old.node.handle(client, frame)
            return
        from roomcast.http.channels import ChannelRequests

        requests = ChannelRequests(self.node)
        await requests.handle(requests.attach(conn, "u"), frame)

    def channel(self) -> Publish:
        broker = self.old.broker if self.node is None else self.node
        return lambda i: broker.publish("c", b'{"i":%d}' % i, INFO)


async def per_publication(publish: Publish, sinks: list[Sink]) -> float:
    """The best round's microseconds per publication (every sink must get every one)."""
    each = PUBLICATIONS // ROUNDS
    best = float("inf")
    for sink in sinks:
        sink.frames = 0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(each):
            await publish(i)
        best = min(best, time.perf_counter() - start)
    if any(sink.frames < PUBLICATIONS for sink in sinks):
        raise AssertionError("a recipient missed publications")
    return best / each * 1e6


async def main() -> None:
    core = Core()
    await core.start()
    chat_sinks = [Sink() for _ in range(RECIPIENTS)]
    for sink in chat_sinks:
        await core.chat_member(connection(sink, "/ws/chat"))
    ws_sinks = [Sink() for _ in range(RECIPIENTS)]
    for sink in ws_sinks:
        await core.subscriber(connection(sink, "/ws"))
    chat = await per_publication(core.chat(), chat_sinks)
    channel = await per_publication(core.channel(), ws_sinks)

    spare = Sink()
    conns = [connection(spare, "/ws/chat") for _ in range(MEMBERS)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    members = [await core.chat_member(conn) for conn in conns]
    gc.collect()
    per_member = (tracemalloc.get_traced_memory()[0] - before) / len(members)
    tracemalloc.stop()
    print(f"roomcast core ({core.label}), in-process, {RECIPIENTS:,} recipients:")
    print(f"  chat fan-out       {chat:8.0f} µs per publication")
    print(f"  /ws fan-out        {channel:8.0f} µs per publication")
    print(f"  a chat member      {per_member:8.0f} bytes of core objects ({MEMBERS:,} measured)")
    # The sessions' writer tasks and the broker would be stopped by a server; here the process
    # simply ends.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
