"""The guide's /ws/chat on socketify (uWebSockets' Python binding): the "socketify" peer.

Written the way a socketify user writes a chat room: every member subscribes to one topic on
open, and a text message is published to that topic as ``Client says: {text}`` with the App's
``publish`` (which, unlike ``WebSocket.publish``, reaches the sender too, as the guide's
broadcast does); a member that leaves publishes ``A client left the chat``. uWebSockets does
the fan-out in C++: one frame built per publication, written to every subscriber, corked per
event-loop turn. Defaults otherwise, except compression (off, as for every server here) and
the back-pressure limit: by default uWebSockets silently drops a publication for a member with
more than 64 KiB queued, which a chat that must not lose messages raises (16 MiB here, about
what the other servers would queue for a slow member before any limit).

Run: ``python benchmarks/socketify_server.py --port PORT`` (loopback only); GET /health → 200.
"""

from __future__ import annotations

import argparse

from socketify import App, AppListenOptions, CompressOptions, OpCode, WebSocket

ROOM = "chat"
MAX_BACKPRESSURE = 16 * 1024 * 1024


def main() -> None:
    """Parse ``--port`` and serve /ws/chat and /health on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    app = App()

    def on_open(ws: WebSocket) -> None:
        ws.subscribe(ROOM)

    def on_message(ws: WebSocket, message: str | bytes, opcode: OpCode) -> None:
        if opcode == OpCode.TEXT:
            app.publish(ROOM, f"Client says: {message}", OpCode.TEXT)

    def on_close(ws: WebSocket, code: int, message: bytes | None) -> None:
        app.publish(ROOM, "A client left the chat", OpCode.TEXT)

    app.ws(
        "/ws/chat",
        {
            "compression": CompressOptions.DISABLED,
            "max_backpressure": MAX_BACKPRESSURE,
            "open": on_open,
            "message": on_message,
            "close": on_close,
        },
    )
    app.get("/health", lambda res, req: res.end('{"status":"ok"}'))
    app.listen(AppListenOptions(port=port, host="127.0.0.1"))
    app.run()


if __name__ == "__main__":
    main()
