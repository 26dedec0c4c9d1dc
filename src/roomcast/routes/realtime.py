"""``/ws``: roomcast's channel protocol (docs/protocol.md) on a raw ASGI endpoint."""

from __future__ import annotations

from starlette.routing import WebSocketRoute

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.routes.classic import ClassicEndpoint
from roomcast.runtime import Runtime

__all__ = ["bearer_token", "realtime_routes"]


def bearer_token(conn: Connection) -> str | None:
    """The token of the handshake: ``?token=`` or ``Authorization: Bearer``; ``None`` if none."""
    token = conn.query().get("token")
    if token is not None:
        return token
    for name, value in conn.scope.get("headers", ()):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    return None


def realtime_routes(runtime: Runtime) -> list[WebSocketRoute]:
    """The ``/ws`` endpoint, bound to ``runtime``."""
    node = runtime.node

    async def realtime(conn: Connection) -> None:
        user: str | None = None
        token = bearer_token(conn)
        if token is not None:
            user = runtime.tokens.user(token)
            if user is None:
                await conn.deny("unknown token")
                return
        if not await conn.accept():
            return
        client = node.attach(conn, user)
        try:
            while (frame := await conn.receive()) is not None:
                # A client being closed (too slow, or kicked) keeps being read so that its
                # close handshake can finish, but it gets no more answers.
                if client.member.active:
                    await node.handle(client, frame)
        finally:
            # When the server restarts everyone leaves at once: no leave events for that.
            await node.detach(client, notify=conn.close_code != CloseCode.SERVICE_RESTART)

    return [WebSocketRoute("/ws", ClassicEndpoint(runtime, realtime), name="ws")]
