"""``/ws``: roomcast's channel protocol (docs/protocol.md) on a raw ASGI endpoint.

:class:`ChannelRequests` answers each request frame with exactly one reply: it parses and checks
the request (:mod:`roomcast.codecs.roomcast_json`), checks the session's grant, and asks the node
(:class:`roomcast.core.node.Node`) to do the work. It also keeps the ``/ws`` session's timers: the
authentication deadline of an anonymous connection, and a token's ``refresh`` push and expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from starlette.routing import WebSocketRoute

from roomcast.auth import EVERYTHING, AuthError, Grant, token_from_scope
from roomcast.brokers import BrokerUnavailable
from roomcast.closecodes import CloseCode
from roomcast.codecs.roomcast_json import (
    CODEC,
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    ErrorCode,
    Request,
    RequestError,
    channel_pattern,
    channel_rule,
    connected_frame,
    encode_data,
    encode_info,
    error_reply,
    history_result,
    lossy_numbers,
    ok_reply,
    parse_request,
    refresh_frame,
    unsubscribed_frame,
    utc_now,
)
from roomcast.connection import Connection
from roomcast.core.node import Node
from roomcast.core.session import Session
from roomcast.errors import RateLimited
from roomcast.http.guide import GuardedEndpoint
from roomcast.version import __version__

__all__ = ["ChannelRequests", "channels_routes"]

logger = logging.getLogger("roomcast.channels")

EMPTY: Final = b"{}"

#: What an operation returns: the encoded result, and what to do right after the reply.
Outcome = tuple[bytes, Callable[[], None] | None]


class ChannelRequests:
    """The ``/ws`` protocol of one node: sessions' requests, deadlines and expiries."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = settings = node.settings
        self.auth = node.auth
        self.channel_name = channel_pattern(settings.channel_max_length)
        self.channel_rule = channel_rule(settings.channel_max_length)
        self._ops: dict[str, Callable[[Session, Request], Awaitable[Outcome]]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "presence": self._presence,
            "history": self._history,
            "ping": self._ping,
            "auth": self._auth,
        }

    # -- sessions ---------------------------------------------------------------------------

    def attach(self, conn: Connection, grant: Grant | str | None) -> Session:
        """A new ``/ws`` connection (accepted): give it an id and send ``connected``.

        ``grant`` is what its token allows (a bare user name: every channel; ``None``: the
        anonymous grant). A user's connection was counted with ``claim_user`` already; the
        node's ``detach`` releases it.
        """
        if not isinstance(grant, Grant):
            grant = (
                self.auth.anonymous
                if grant is None
                else Grant(grant, EVERYTHING, EVERYTHING, None, "static")
            )
        node = self.node
        session_id = node.new_id()
        session = node.open(
            conn,
            CODEC,
            grant,
            slow_code=CloseCode.SLOW,
            info=encode_info(session_id, grant.user),
            connected_at=utc_now(),
            session_id=session_id,
        )
        session.send(connected_frame(session.id, grant.user, __version__))
        loop = asyncio.get_running_loop()
        if grant.user is None:
            session.add_timer(
                loop.call_later(self.settings.auth_timeout, self._auth_deadline, session)
            )
        else:
            self._arm_expiry(session, loop)
        return session

    def _auth_deadline(self, session: Session) -> None:
        if session.user is None and not session.subscriptions:
            self.node.close(session, CloseCode.AUTH_TIMEOUT, "not authenticated in time")

    def _arm_expiry(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the token's ``refresh`` push and, unless a fresh token comes, its end."""
        session.cancel_timers()
        expires_at = session.grant.expires_at
        if expires_at is None:
            return
        left = expires_at - time.time()
        ahead = self.settings.refresh_ahead
        if left > ahead:
            session.add_timer(loop.call_later(left - ahead, self._ask_refresh, session))
        else:
            self._ask_refresh(session)
        session.add_timer(
            loop.call_later(max(0.0, left + self.settings.jwt_leeway), self._expire, session)
        )

    def _ask_refresh(self, session: Session) -> None:
        expires_at = session.grant.expires_at
        if expires_at is not None:
            session.send(refresh_frame(expires_at))

    def _expire(self, session: Session) -> None:
        self.node.close(session, CloseCode.TOKEN_EXPIRED, "token expired")

    def refuse(self, session: Session, frame: str | bytes, reason: str) -> None:
        """A request over the rate limit: an error reply, or 4029 for a client that keeps on."""
        if not session.active:
            return
        self.node.tally.auth_failed("rate_limited")
        if session.conn.refused > self.settings.rate_burst:
            self.node.close(session, CloseCode.RATE_LIMITED, f"rate limit: {reason}")
            return
        request_id: int | str | None = None
        try:
            request_id = parse_request(frame).id
        except RequestError as error:
            request_id = error.request_id
        session.send(error_reply(request_id, ErrorCode.RATE_LIMITED, reason))

    # -- requests -------------------------------------------------------------------------

    async def handle(self, session: Session, frame: str | bytes) -> None:
        """Answer one client frame with exactly one reply.

        A ``publish`` is answered when the broker has it, without holding up the next frame:
        a client's publications are under way together (see :meth:`Node.pipeline`), in order.
        Any other request waits for them first, so that it sees them (a ``history`` after a
        ``publish`` holds it) and replies keep the order of the requests.
        """
        request_id: int | str | None = None
        node = self.node
        try:
            request = parse_request(frame)
            request_id = request.id
            if request.op == "publish":
                channel, data = self._publication(session, request)
                work = self._publish(session, request.id, channel, data)
                await node.pipeline(session, work, len(data))
                return
            await node.settle(session)
            result, after = await self._ops[request.op](session, request)
        except RequestError as error:
            session.send(error_reply(error.request_id, error.code, error.message))
            return
        except BrokerUnavailable as error:
            session.send(error_reply(request_id, ErrorCode.UNAVAILABLE, str(error)))
            return
        except Exception:
            logger.exception("conn=%s /ws request failed", session.id)
            session.send(error_reply(request_id, ErrorCode.INTERNAL, "the server failed"))
            return
        session.send(ok_reply(request.id, result))
        if after is not None:
            after()

    def _channel(self, request: Request) -> str:
        channel = request.body.get("channel")
        if not isinstance(channel, str) or self.channel_name.fullmatch(channel) is None:
            raise RequestError(ErrorCode.BAD_CHANNEL, self.channel_rule, request.id)
        return channel

    def _allowed(self, session: Session, request: Request, action: str) -> str:
        """The request's channel, if the session's grant allows ``action`` on it."""
        channel = self._channel(request)
        grant = session.grant
        patterns = grant.subscribe if action == "subscribe" else grant.publish
        if not patterns.allows(channel):
            self.node.tally.auth_failed("forbidden_channel")
            who = "anonymous clients" if session.user is None else f"user {session.user!r}"
            raise RequestError(
                ErrorCode.FORBIDDEN, f"{who} may not {action} to {channel}", request.id
            )
        return channel

    async def _auth(self, session: Session, request: Request) -> Outcome:
        token = request.string("token")
        node = self.node
        try:
            grant = self.auth.verify(token)
        except AuthError as error:
            node.tally.auth_failed(error.kind)
            raise RequestError(ErrorCode.UNAUTHORIZED, str(error), request.id) from None
        user = grant.user
        assert user is not None
        if session.user is None:
            if session.subscriptions:
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    "authenticate before subscribing (unsubscribe first)",
                    request.id,
                )
            if not node.claim_user(user):
                limit = self.settings.max_connections_per_user
                node.close(
                    session,
                    CloseCode.TOO_MANY_CONNECTIONS,
                    f"too many connections for this user (limit {limit})",
                )
                raise RequestError(ErrorCode.FORBIDDEN, "too many connections", request.id)
            session.user = user
            session.info = encode_info(session.id, user)
        elif user != session.user:
            raise RequestError(
                ErrorCode.FORBIDDEN,
                "a fresh token must be for the same user ('sub')",
                request.id,
            )
        session.grant = grant
        self._arm_expiry(session, asyncio.get_running_loop())
        await self._revoke_unallowed(session)
        expires = None if grant.expires_at is None else int(grant.expires_at)
        return orjson.dumps({"user": user, "expires_at": expires}), None

    async def _revoke_unallowed(self, session: Session) -> None:
        """End the subscriptions that the session's (new) grant no longer allows.

        A fresh token replaces the old one's channels (docs/protocol.md, ``auth``): keeping a
        subscription that the grant no longer covers would go on delivering a channel whose
        ``history`` is already refused. Each one ends with an ``unsubscribed`` push, queued
        before the reply to ``auth``, and no publication of it reaches the client after that.
        """
        patterns = session.grant.subscribe
        for channel in [name for name in session.subscriptions if not patterns.allows(name)]:
            reason = f"the connection's new token does not allow subscribing to {channel}"
            try:
                # Delivery to the client stops at once, before the first await in there.
                await self.node.drop(session, channel, notify=True)
            except BrokerUnavailable:
                # The broker forgets the entry by itself (presence entries expire).
                logger.info("conn=%s /ws broker unavailable while leaving %s", session.id, channel)
            logger.info("conn=%s /ws unsubscribed from %s: token narrowed", session.id, channel)
            session.send(unsubscribed_frame(channel, reason))

    async def _subscribe(self, session: Session, request: Request) -> Outcome:
        channel = self._allowed(session, request, "subscribe")
        recover = request.mapping("recover")
        recovery: tuple[int, str] | None = None
        if recover is not None:
            offset = recover.get("offset")
            epoch = recover.get("epoch")
            if type(offset) is not int or offset < 0 or not isinstance(epoch, str):
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    '\'recover\' must be {"offset": integer >= 0, "epoch": string}',
                    request.id,
                )
            recovery = (offset, epoch)
        join_leave = request.boolean("join_leave")
        if channel in session.subscriptions:
            raise RequestError(
                ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}", request.id
            )
        limit = self.settings.max_subscriptions
        if len(session.subscriptions) >= limit:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {limit} subscriptions per connection",
                request.id,
            )
        subscribed, go_live = await self.node.subscribe(
            session, channel, recover=recovery, join_leave=join_leave
        )
        fields: dict[str, object] = {"epoch": subscribed.epoch, "offset": subscribed.offset}
        if subscribed.recovered is not None:
            fields["recovered"] = subscribed.recovered
            fields["replayed"] = len(subscribed.replay)
        result = orjson.dumps(fields)
        if go_live is None:
            return result, None
        replay = [CODEC.publication(channel, publication) for publication in subscribed.replay]
        return result, lambda: go_live(replay)

    async def _unsubscribe(self, session: Session, request: Request) -> Outcome:
        channel = self._channel(request)
        if channel not in session.subscriptions:
            raise RequestError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}", request.id)
        await self.node.unsubscribe(session, channel)
        return EMPTY, None

    def _publication(self, session: Session, request: Request) -> tuple[str, bytes]:
        """The channel and data of a ``publish`` request; :class:`RequestError` if refused."""
        channel = self._allowed(session, request, "publish")
        body = request.body
        if "data" not in body:
            raise RequestError(ErrorCode.BAD_REQUEST, "'data' is required", request.id)
        if lossy_numbers(request.text, body["data"]):
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                "data: integers must fit in 64 bits (send larger ones as strings)",
                request.id,
            )
        return channel, encode_data(body["data"], self.settings.max_publication_size, request.id)

    async def _publish(
        self, session: Session, request_id: int | str, channel: str, data: bytes
    ) -> None:
        try:
            position = await self.node.publish(channel, data, session.info)
        except BrokerUnavailable as error:
            session.send(error_reply(request_id, ErrorCode.UNAVAILABLE, str(error)))
        except Exception:
            logger.exception("conn=%s /ws publish failed", session.id)
            session.send(error_reply(request_id, ErrorCode.INTERNAL, "the server failed"))
        else:
            result = orjson.dumps({"epoch": position.epoch, "offset": position.offset})
            session.send(ok_reply(request_id, result))

    async def _presence(self, session: Session, request: Request) -> Outcome:
        channel = self._allowed(session, request, "subscribe")
        clients = await self.node.presence(channel)
        return orjson.dumps({"clients": clients}), None

    async def _history(self, session: Session, request: Request) -> Outcome:
        channel = self._allowed(session, request, "subscribe")
        limit = request.integer(
            "limit", low=1, high=HISTORY_LIMIT_MAX, default=HISTORY_LIMIT_DEFAULT
        )
        since = request.integer("since", low=0)
        before = request.integer("before", low=0)
        if since is not None and before is not None:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "give 'since' or 'before', not both", request.id
            )
        assert limit is not None
        page = await self.node.history(channel, since=since, before=before, limit=limit)
        frames = [CODEC.publication(channel, publication) for publication in page.publications]
        # Bounded in bytes too (HISTORY_PAGE_BYTES): a page may hold fewer than `limit`, and
        # the client pages on from its last (or, backwards, its first) offset.
        result = history_result(
            page.epoch, page.offset, page.start, frames, keep_newest=since is None
        )
        return result, None

    async def _ping(self, session: Session, request: Request) -> Outcome:
        return EMPTY, None


def channels_routes(node: Node, requests: ChannelRequests) -> list[WebSocketRoute]:
    """The ``/ws`` endpoint, bound to ``node``."""
    auth = node.auth
    settings = node.settings

    async def channels(conn: Connection) -> None:
        token, subprotocol = token_from_scope(conn.scope, conn.query())
        grant = auth.anonymous
        if token is not None:
            try:
                grant = auth.verify(token)
            except AuthError as error:
                node.tally.auth_failed(error.kind)
                await conn.deny(str(error))
                return
        user = grant.user
        if user is not None and not node.claim_user(user):
            limit = settings.max_connections_per_user
            await conn.accept_and_close(
                CloseCode.TOO_MANY_CONNECTIONS,
                f"too many connections for this user (limit {limit})",
            )
            return
        if not await conn.accept(subprotocol=subprotocol):
            if user is not None:
                node.release_user(user)
            return
        # From here the session's user count is the node's to release (the user may change
        # through an ``auth`` request).
        session = requests.attach(conn, grant)
        try:
            while True:
                try:
                    frame = await conn.receive()
                except RateLimited as error:
                    requests.refuse(session, error.frame, error.reason)
                    continue
                if frame is None:
                    break
                # A session being closed (too slow, or kicked) keeps being read so that its
                # close handshake can finish, but it gets no more answers.
                if session.active:
                    await requests.handle(session, frame)
        finally:
            # When the server restarts everyone leaves at once: no leave events for that.
            await node.detach(session, notify=conn.close_code != CloseCode.SERVICE_RESTART)

    return [
        WebSocketRoute(
            "/ws",
            GuardedEndpoint(node, channels, CloseCode.TOO_MANY_CONNECTIONS, "/ws"),
            name="ws",
        )
    ]
