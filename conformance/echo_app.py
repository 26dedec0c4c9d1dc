"""The echo server that Autobahn|Testsuite's fuzzing client tests: every message back unchanged.

A raw ASGI app: ``/`` accepts a WebSocket and sends each message back as it came, text as text
and binary as binary (roomcast's ``/ws/echo`` prefixes "Echo: " and takes text only, so the
fuzzing client, which expects an exact echo, cannot use it).

Run as a script it serves the app with uvicorn on a socket it binds itself, so there is no
race for a free port, and prints ``PORT <n>`` on stdout once it listens::

    python conformance/echo_app.py                      # roomcast's transport, a free port
    python conformance/echo_app.py --ws websockets-sansio --port 9001

``--ws roomcast`` (the default) serves it with ``roomcast.transport.protocol_class()``; any
other value is one of uvicorn's own WebSocket implementations, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

#: Large enough for Autobahn's 9.x cases (messages of up to 16 MiB).
MAX_SIZE = 64 * 1024 * 1024

UVICORN_WS = ("websockets-sansio", "websockets", "wsproto")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: an exact WebSocket echo on ``/``; 404 for anything else."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"WebSocket echo only, on /\n"})
        return
    if scope["type"] != "websocket":
        return
    message = await receive()  # websocket.connect
    if message["type"] != "websocket.connect":
        return
    if scope["path"] != "/":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is not None:
            await send({"type": "websocket.send", "bytes": data})
        else:
            await send({"type": "websocket.send", "text": message.get("text", "")})


def ws_setting(name: str, close_timeout: float) -> Any:
    """uvicorn's ``ws`` setting for ``name``: roomcast's protocol class or uvicorn's own name."""
    if name == "roomcast":
        from roomcast.transport import protocol_class

        return protocol_class(close_timeout=close_timeout)
    if name in UVICORN_WS:
        return name
    raise SystemExit(f"echo_app: unknown --ws {name!r} (roomcast or one of {UVICORN_WS})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--ws", default="roomcast", help="roomcast | " + " | ".join(UVICORN_WS))
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--max-size", type=int, default=MAX_SIZE)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    import uvicorn

    config = uvicorn.Config(
        app,
        ws=ws_setting(args.ws, args.close_timeout),
        ws_max_size=args.max_size,
        ws_per_message_deflate=True,
        # No keepalive pings: a server ping in the middle of a case is not what the case
        # expects, and no Autobahn case runs anywhere near uvicorn's 20 s interval anyway.
        ws_ping_interval=None,
        lifespan="off",
        access_log=False,
        log_level=args.log_level,
    )
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    sock.set_inheritable(True)
    print(f"PORT {sock.getsockname()[1]}", flush=True)  # noqa: T201 - the runner reads it
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
