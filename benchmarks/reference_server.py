"""A deliberately minimal picows (Cython) server, used only to measure the load generator.

It answers /ws/echo and /ws/chat like the guide (``Echo: {text}``, ``Client says: {text}`` to
every member) at a cost per message far below any ASGI server's (chat broadcasts are batched:
one write per member per event-loop turn), so the figures the benchmark gets from it show the
ceiling of the load generator on this machine, not of a server. /ws/chat-each is the same room
without batching: one write per message per member, as the real servers do, so the load
generator reads the messages one by one, at its highest cost per delivery.

Run: ``python benchmarks/reference_server.py --port PORT`` (loopback only); GET /health → 200.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)


class Echo(WSListener):
    """Replies ``Echo: {text}`` to every text frame."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Echo text frames; close on CLOSE."""
        if frame.msg_type == WSMsgType.TEXT:
            transport.send(WSMsgType.TEXT, b"Echo: " + frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def text_frame(payload: bytes) -> bytes:
    """Return an unmasked (server → client) text frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Room:
    """The one chat room: broadcasts are batched per event-loop turn, one write per member."""

    def __init__(self) -> None:
        """Start empty."""
        self.members: set[WSTransport] = set()
        self.pending: list[bytes] = []

    def broadcast_each(self, payload: bytes) -> None:
        """Write ``Client says: {payload}`` to every member now, one write each (unbatched)."""
        frame = text_frame(b"Client says: " + payload)
        for member in self.members:
            member.underlying_transport.write(frame)

    def broadcast(self, payload: bytes) -> None:
        """Queue ``Client says: {payload}`` for every member; flush at the end of this turn."""
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(text_frame(b"Client says: " + payload))

    def flush(self) -> None:
        """Write everything queued to every member, one transport write each."""
        blob = b"".join(self.pending)
        self.pending.clear()
        for member in self.members:
            member.underlying_transport.write(blob)


ROOM = Room()


class Chat(WSListener):
    """A member of the one room (``batched``: one write per member per event-loop turn)."""

    def __init__(self, batched: bool = True) -> None:
        """Choose how broadcasts are written."""
        super().__init__()
        self.batched = batched

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Join the room."""
        ROOM.members.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Leave the room."""
        ROOM.members.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Broadcast text frames to everyone; close on CLOSE."""
        if frame.msg_type == WSMsgType.TEXT:
            if self.batched:
                ROOM.broadcast(frame.get_payload_as_bytes())
            else:
                ROOM.broadcast_each(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def route(request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener | None:
    """Pick the listener for a request path; GET /health answers 200."""
    path = request.path.split(b"?", 1)[0]
    if path == b"/ws/echo":
        return Echo()
    if path == b"/ws/chat":
        return Chat()
    if path == b"/ws/chat-each":
        return Chat(batched=False)
    if path == b"/health":
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_ok_response(b'{"status":"ok"}'), None
        )
    return None


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until killed."""
    server = await ws_create_server(route, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    """Parse ``--port`` and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
