"""The guide's eight endpoints, with the guide's exact messages, made safe.

Each endpoint is a raw ASGI app (see :mod:`roomcast.connection` for why). What the guide leaves
out is added here: frame-type and size checks with close codes, a stream that stops when its
client leaves, chat rooms that are channels of the node (without history, on every node), and
clean removal on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable

from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send

from roomcast.auth import AuthError, origin_allowed, token_from_scope
from roomcast.closecodes import CloseCode
from roomcast.codecs.guide import CODEC
from roomcast.connection import Connection
from roomcast.core.node import Node
from roomcast.errors import ClientError, InvalidPayload, PolicyViolation, RateLimited
from roomcast.settings import Settings

__all__ = [
    "DEFAULT_ROOM",
    "LEAVE_NOTICE",
    "ROOM_NAME",
    "GuardedEndpoint",
    "chat_channel",
    "guide_routes",
]

#: The room of ``/ws/chat``: the empty name, which no named room can have.
DEFAULT_ROOM = ""
#: What the remaining members hear when one leaves (the guide's text).
LEAVE_NOTICE = "A client left the chat"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def chat_channel(room: str) -> str:
    """The channel of a chat room: ``chat/`` + its name. ``/`` is in no ``/ws`` channel name,
    so ``/ws`` clients can neither subscribe nor publish to a chat room."""
    return "chat/" + room


Handler = Callable[[Connection], Awaitable[None]]

logger = logging.getLogger("roomcast.chat")


class GuardedEndpoint:
    """Runs a handler on a :class:`Connection`; client errors end it with their close code.


    Before the handler runs, every endpoint refuses a browser page of a foreign origin (HTTP
    403: cross-site WebSocket hijacking) and an IP address over its connection limit (closed
    with ``limit_code`` and a reason a browser can read).
    """

    def __init__(
        self,
        node: Node,
        handler: Handler,
        limit_code: CloseCode = CloseCode.POLICY_VIOLATION,
        endpoint: str = "",
    ) -> None:
        self.node = node
        self.handler = handler
        self.limit_code = limit_code
        #: The route's path template: the metrics' endpoint label.
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node = self.node
        settings = node.settings
        conn = Connection(
            scope,
            receive,
            send,
            settings.max_message_size,
            settings.rate_limit,
            settings.rate_burst,
            self.endpoint,
        )
        tally = node.tally
        if not origin_allowed(scope, settings.allowed_origins):
            tally.auth_failed("origin")
            await conn.deny("origin not allowed (ROOMCAST_ALLOWED_ORIGINS)")
            return
        client = scope.get("client")
        ip: str = client[0] if client else ""
        per_ip = node.per_ip
        held = per_ip.get(ip, 0)
        per_ip[ip] = held + 1
        connections = node.connections
        connections.add(conn)
        try:
            limit = settings.max_connections_per_ip
            if limit and held >= limit:
                await conn.accept_and_close(
                    self.limit_code, f"too many connections from this address (limit {limit})"
                )
                return
            await self.handler(conn)
        except ClientError as error:
            if isinstance(error, RateLimited):
                tally.auth_failed("rate_limited")
            await conn.fail(error)
        finally:
            connections.discard(conn)
            tally.ended(conn)
            left = per_ip[ip] - 1
            if left:
                per_ip[ip] = left
            else:
                del per_ip[ip]


def guide_routes(node: Node) -> list[WebSocketRoute]:
    """The guide's endpoints, bound to ``node``."""
    settings = node.settings
    farewell = LEAVE_NOTICE.encode()

    async def echo(conn: Connection) -> None:
        if await conn.accept():
            await _reply_to_text(conn, "Echo: ")

    async def say(channel: str, message: bytes) -> None:
        await node.publish(channel, message, b"", history=False)

    async def chat(conn: Connection, room: str = DEFAULT_ROOM) -> None:
        channel = chat_channel(room)
        session = node.open(
            conn, CODEC, node.auth.anonymous, slow_code=CloseCode.TRY_AGAIN_LATER, farewell=farewell
        )
        accepted = False
        try:
            # Hear the room on every node *before* the handshake completes: once a client is
            # in, it gets every message sent after that, whichever node the sender is on.
            subscriber = await node.join(session, channel)
            if not await conn.accept():
                return
            accepted = True
            node.go_live(subscriber)
            while (text := await conn.receive_text()) is not None:
                # A member cut for being slow keeps being read (so its close handshake can
                # finish) but speaks no more.
                if session.active:
                    message = f"Client says: {text}".encode()
                    await node.pipeline(session, say(channel, message), len(message))
        finally:
            # When the server restarts everyone leaves at once: n leave notices to n members
            # would be n² messages that nobody will read.
            notify = accepted and conn.close_code != CloseCode.SERVICE_RESTART
            await node.detach(session, notify=notify)

    async def named_chat(conn: Connection) -> None:
        room: str = conn.scope.get("path_params", {}).get("room", "")
        if ROOM_NAME.fullmatch(room) is None:
            # Accept, then close 1008 with the reason: unlike an HTTP refusal, a browser can
            # read a close reason.
            if await conn.accept():
                raise PolicyViolation("room names are 1-64 characters of A-Z a-z 0-9 _ . : -")
            return
        await chat(conn, room)

    async def secure(conn: Connection) -> None:
        token, subprotocol = token_from_scope(conn.scope, conn.query())
        if token is None:
            node.tally.auth_failed("unknown_token")
            await conn.deny("missing token")
            return
        try:
            grant = node.auth.verify(token)
        except AuthError as error:
            node.tally.auth_failed(error.kind)
            await conn.deny(str(error))
            return
        user = grant.user
        assert user is not None
        if not node.claim_user(user):
            limit = settings.max_connections_per_user
            await conn.accept_and_close(
                CloseCode.POLICY_VIOLATION, f"too many connections for this user (limit {limit})"
            )
            return
        expiry: asyncio.TimerHandle | None = None
        try:
            if not await conn.accept(subprotocol=subprotocol):
                return
            if grant.expires_at is not None:
                expiry = _close_at(conn, grant.expires_at + settings.jwt_leeway)
            if await conn.send_text(f"Hello, {user}! Welcome to the secure WebSocket."):
                await _reply_to_text(conn, "You said: ")
        finally:
            if expiry is not None:
                expiry.cancel()
            node.release_user(user)

    async def stream(conn: Connection) -> None:
        if not await conn.accept():
            return
        count, interval = _stream_params(conn.query(), settings)
        # Watch for the client leaving while we sleep, so the stream stops at once instead of
        # at its next send (the guide notices only then, up to `interval` later).
        left = asyncio.ensure_future(_until_disconnect(conn))
        try:
            for number in range(1, count + 1):
                if not await conn.send_text(f"Streaming message {number}"):
                    return
                await asyncio.wait((left,), timeout=interval)
                if left.done():
                    error = left.result()
                    if error is not None:
                        raise error
                    return
            await conn.close(CloseCode.NORMAL)
        finally:
            left.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await left

    async def methods_text(conn: Connection) -> None:
        if await conn.accept():
            await _reply_to_text(conn, "Server received: ")

    async def methods_bytes(conn: Connection) -> None:
        if not await conn.accept():
            return
        while (data := await conn.receive_bytes()) is not None:
            if not await conn.send_bytes(b"Server received: " + data):
                return

    async def methods_json(conn: Connection) -> None:
        if not await conn.accept():
            return
        while (text := await conn.receive_text()) is not None:
            # The standard library's json on purpose: the reply must be byte-for-byte what the
            # guide's Starlette send_json() writes (same separators, same float repr).
            try:
                data = json.loads(text)
                reply = json.dumps(
                    {"message": "Server received your JSON", "data": data},
                    separators=(",", ":"),
                    ensure_ascii=False,
                )
                # A lone surrogate escape ("\ud800") parses, but is no text a frame can carry.
                reply.encode()
            except ValueError as error:  # UnicodeEncodeError is one too
                raise InvalidPayload(f"invalid JSON: {error}") from None
            except RecursionError:
                raise InvalidPayload("invalid JSON: nested too deeply") from None
            if not await conn.send_text(reply):
                return

    async def methods_raw(conn: Connection) -> None:
        if not await conn.accept():
            return
        while (data := await conn.receive()) is not None:
            if isinstance(data, str):
                sent = await conn.send_text(f"Raw echo: {data}")
            else:
                sent = await conn.send_bytes(b"Raw echo: " + data)
            if not sent:
                return

    endpoints: dict[str, Handler] = {
        "/ws/echo": echo,
        "/ws/chat": chat,
        "/ws/chat/{room}": named_chat,
        "/ws/secure": secure,
        "/ws/stream": stream,
        "/ws/methods_text": methods_text,
        "/ws/methods_bytes": methods_bytes,
        "/ws/methods_json": methods_json,
        "/ws/methods_raw": methods_raw,
    }
    return [
        WebSocketRoute(path, GuardedEndpoint(node, handler, endpoint=path), name=path.strip("/"))
        for path, handler in endpoints.items()
    ]


async def _reply_to_text(conn: Connection, prefix: str) -> None:
    """Answer every text message with ``prefix + text`` until the peer leaves."""
    while (text := await conn.receive_text()) is not None:
        if not await conn.send_text(prefix + text):
            return


_closing: set[asyncio.Task[None]] = set()


def _close_at(conn: Connection, when: float) -> asyncio.TimerHandle:
    """Close ``conn`` with 4003 at Unix time ``when`` (its token's expiry)."""

    def expire() -> None:
        logger.info("conn=%s %s closed %d: token expired", conn.id, conn.path, 4003)
        task = asyncio.ensure_future(conn.close(CloseCode.TOKEN_EXPIRED, "token expired"))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    return asyncio.get_running_loop().call_later(max(0.0, when - time.time()), expire)


def _stream_params(query: dict[str, str], settings: Settings) -> tuple[int, float]:
    """``count`` and ``interval`` of ``/ws/stream``, checked against the settings' bounds."""
    try:
        count = int(query.get("count", "10"))
        interval = float(query.get("interval", "1"))
    except ValueError:
        raise PolicyViolation("count must be an integer, interval a number of seconds") from None
    if not 1 <= count <= settings.stream_max_count:
        raise PolicyViolation(f"count must be between 1 and {settings.stream_max_count}")
    if not (math.isfinite(interval) and 0 <= interval <= settings.stream_max_interval):
        raise PolicyViolation(f"interval must be between 0 and {settings.stream_max_interval}")
    return count, interval


async def _until_disconnect(conn: Connection) -> ClientError | None:
    """Read and discard until the peer leaves; a client error is returned, not raised."""
    try:
        while await conn.receive() is not None:
            pass
    except ClientError as error:
        return error
    return None
