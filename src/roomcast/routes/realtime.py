"""``/ws``: roomcast's channel protocol (docs/protocol.md) on a raw ASGI endpoint."""

from __future__ import annotations

from starlette.routing import WebSocketRoute

from roomcast.auth import AuthError, token_from_scope
from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.errors import RateLimited
from roomcast.metrics import auth_reason
from roomcast.routes.classic import ClassicEndpoint
from roomcast.runtime import Runtime

__all__ = ["realtime_routes"]


def realtime_routes(runtime: Runtime) -> list[WebSocketRoute]:
    """The ``/ws`` endpoint, bound to ``runtime``."""
    node = runtime.node
    auth = runtime.auth
    settings = runtime.settings

    async def realtime(conn: Connection) -> None:
        token, subprotocol = token_from_scope(conn.scope, conn.query())
        grant = auth.anonymous
        if token is not None:
            try:
                grant = auth.verify(token)
            except AuthError as error:
                node.tally.auth_failed(auth_reason(str(error)))
                await conn.deny(str(error))
                return
        user = grant.user
        if user is not None and not runtime.claim_user(user):
            limit = settings.max_connections_per_user
            await conn.accept_and_close(
                CloseCode.TOO_MANY_CONNECTIONS,
                f"too many connections for this user (limit {limit})",
            )
            return
        if not await conn.accept(subprotocol=subprotocol):
            if user is not None:
                runtime.release_user(user)
            return
        # From here the client's user count is the node's to release (the user may change
        # through an ``auth`` request).
        client = node.attach(conn, grant)
        try:
            while True:
                try:
                    frame = await conn.receive()
                except RateLimited as error:
                    node.refuse(client, error.frame, error.reason)
                    continue
                if frame is None:
                    break
                # A client being closed (too slow, or kicked) keeps being read so that its
                # close handshake can finish, but it gets no more answers.
                if client.member.active:
                    await node.handle(client, frame)
        finally:
            # When the server restarts everyone leaves at once: no leave events for that.
            await node.detach(client, notify=conn.close_code != CloseCode.SERVICE_RESTART)

    return [
        WebSocketRoute(
            "/ws",
            ClassicEndpoint(runtime, realtime, CloseCode.TOO_MANY_CONNECTIONS, "/ws"),
            name="ws",
        )
    ]
