"""The node: ``/ws`` clients, their subscriptions, and local fan-out of publications.

One :class:`Node` per process sits between the ``/ws`` connections and the broker. The broker
gives publications their offsets and delivers each one to the node once; the node writes the
publication's frame, built once, to every local subscriber through the same bounded outboxes
as the chat rooms (:class:`roomcast.hub.Member`): a subscriber that reads too slowly is closed
with 4008 and never slows the others.

Recovery without gaps or duplicates: a new subscription starts *pending*. Publications that
arrive while the node is still asking the broker for the channel's position or history are
kept in the subscription's pending list. When the answer comes, the reply goes out, then the
replayed publications, then the pending ones newer than the last replayed. The subscription
then *catches up*: it is sent each publication newer than the last one it got, until the first
such one, after which (publications reach a node in offset order) nothing older can arrive any
more and it joins the channel's *live* members. The live fan-out is as lean as a chat room's:
the channel drops a publication it has already delivered, and writes each new one, framed once,
to every live member, with no check per member.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Final

import orjson

from roomcast import __version__
from roomcast.auth import EVERYTHING, Authenticator, AuthError, Grant
from roomcast.brokers import Broker, BrokerUnavailable
from roomcast.closecodes import CloseCode
from roomcast.connection import Connection, ConnId
from roomcast.hub import Member
from roomcast.metrics import FANOUT_BUCKETS, LocalHistogram, Tally, auth_reason
from roomcast.protocol import (
    ErrorCode,
    Request,
    RequestError,
    channel_pattern,
    channel_rule,
    connected_frame,
    encode_info,
    error_reply,
    event_frame,
    history_result,
    lossy_numbers,
    ok_reply,
    parse_request,
    refresh_frame,
    utc_now,
)
from roomcast.settings import Settings
from roomcast.transport.frames import OP_TEXT, build_frame

__all__ = ["Client", "Node", "Subscription"]

logger = logging.getLogger("roomcast.channels")

EMPTY: Final = b"{}"
HISTORY_LIMIT_DEFAULT: Final = 100
HISTORY_LIMIT_MAX: Final = 1000

#: What an operation returns: the encoded result, and what to do right after the reply.
Outcome = tuple[bytes, Callable[[], None] | None]


class Client:
    """One ``/ws`` connection: who it is, its outbox and its subscriptions."""

    __slots__ = (
        "conn",
        "connected_at",
        "grant",
        "id",
        "info",
        "member",
        "node",
        "subscriptions",
        "timers",
        "user",
    )

    def __init__(self, node: Node, conn: Connection, grant: Grant, member: Member) -> None:
        self.node = node
        self.conn = conn
        self.id = str(conn.id)
        #: What the client may do, and until when (its token's, or anonymous access's).
        self.grant = grant
        self.user = grant.user
        self.member = member
        self.connected_at = utc_now()
        self.info = encode_info(self.id, self.user)
        self.subscriptions: dict[str, Subscription] = {}
        #: The authentication deadline, or the token's refresh and expiry timers.
        self.timers: list[asyncio.TimerHandle] = []

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    def send(self, payload: bytes, *, force: bool = False) -> None:
        """Queue one frame for this client; a full outbox cuts it (4008).

        ``force`` is for the frames of a subscribe reply's replay, which the history size
        bounds: the outbox may then exceed its limit by that much.
        """
        member = self.member
        if not member.active:
            return
        conn = self.conn
        conn.sent += 1
        conn.sent_bytes += len(payload)
        if member.fast:
            frame = build_frame(OP_TEXT, payload)
            if member.offer(frame) or member.push(frame, force=force):
                return
        elif member.push({"type": "websocket.send", "text": payload.decode()}, force=force):
            return
        self.node.cut(self)


class Subscription:
    """A client's subscription to one channel."""

    __slots__ = ("channel", "client", "join_leave", "offset", "pending")

    def __init__(self, client: Client, channel: str, join_leave: bool) -> None:
        self.client = client
        self.channel = channel
        self.join_leave = join_leave
        #: The offset of the last publication sent to the client (or its starting point).
        self.offset = 0
        #: Publications that arrived before the subscribe reply was sent; ``None`` once live.
        self.pending: list[tuple[int, bytes]] | None = []


class LocalChannel:
    """A channel with subscribers on this node."""

    __slots__ = ("catching", "delivered", "epoch", "live", "subscriptions")

    def __init__(self) -> None:
        #: Every local subscription, in the order they were made.
        self.subscriptions: dict[str, Subscription] = {}
        #: The outboxes of the subscriptions that are live (the fan-out's hot loop).
        self.live: dict[str, Member] = {}
        #: Subscriptions pending or catching up (checked one by one).
        self.catching: dict[str, Subscription] = {}
        #: The highest offset this node has delivered on the channel.
        self.delivered = 0
        #: The epoch the broker gave for the channel.
        self.epoch: str | None = None

    def forget(self, client: str) -> None:
        """Stop delivering to ``client`` (the subscription itself may stay a moment longer)."""
        self.live.pop(client, None)
        self.catching.pop(client, None)


class Node:
    """The ``/ws`` side of one process; the broker's :class:`~roomcast.brokers.Sink`."""

    def __init__(
        self, settings: Settings, broker: Broker, auth: Authenticator | None = None
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.auth = auth if auth is not None else Authenticator(settings)
        #: Count a connection of a user against its limit (the runtime's, shared with the
        #: other endpoints); ``False`` at the limit.
        self.claim_user: Callable[[str], bool] = lambda user: True
        self.release_user: Callable[[str], None] = lambda user: None
        self.clients: dict[str, Client] = {}
        #: The channels with a local subscriber.
        self.local: dict[str, LocalChannel] = {}
        self._resync: asyncio.Task[None] | None = None
        self._writers: set[asyncio.Task[None]] = set()
        self.channel_name = channel_pattern(settings.channel_max_length)
        self.channel_rule = channel_rule(settings.channel_max_length)
        #: For roomcast.metrics: counts of ended connections and refusals; publication frames
        #: the live fan-out delivered, their bytes, and its durations.
        self.tally = Tally()
        self.deliveries = 0
        self.delivered_bytes = 0
        self.fanout_time = LocalHistogram(FANOUT_BUCKETS)
        self._ops: dict[str, Callable[[Client, Request], Awaitable[Outcome]]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "presence": self._presence,
            "history": self._history,
            "ping": self._ping,
            "auth": self._auth,
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.broker.on_control(self._command)
        await self.broker.start(self)

    async def stop(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
        writers = list(self._writers)
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await self.broker.close()

    def attach(self, conn: Connection, grant: Grant | str | None) -> Client:
        """A new ``/ws`` connection (accepted): give it an id and send ``connected``.

        ``grant`` is what its token allows (a bare user name: every channel; ``None``: the
        anonymous grant). A user's connection was counted with :attr:`claim_user` already;
        :meth:`detach` releases it.
        """
        if not isinstance(grant, Grant):
            grant = (
                self.auth.anonymous
                if grant is None
                else Grant(grant, EVERYTHING, EVERYTHING, None, "static")
            )
        client_id = secrets.token_hex(6)
        while client_id in self.clients:
            client_id = secrets.token_hex(6)
        conn.id = ConnId(client_id)
        member = Member(conn, "", self.settings.outbox_size, self._writers)
        client = Client(self, conn, grant, member)
        self.clients[client_id] = client
        client.send(connected_frame(client_id, grant.user, __version__))
        loop = asyncio.get_running_loop()
        if grant.user is None:
            client.timers.append(
                loop.call_later(self.settings.auth_timeout, self._auth_deadline, client)
            )
        else:
            self._arm_expiry(client, loop)
        return client

    async def detach(self, client: Client, *, notify: bool = True) -> None:
        """The connection ended: drop its subscriptions, presence and writer."""
        self.clients.pop(client.id, None)
        client.member.active = False
        client.cancel_timers()
        if client.user is not None:
            self.release_user(client.user)
        await self._drop_all(client, notify=notify)
        await client.member.finish()

    def close(self, client: Client, code: CloseCode, reason: str) -> None:
        """Close ``client`` from the server's side; it leaves its channels at once."""
        member = client.member
        if not member.active:
            return
        logger.info("conn=%s /ws closing %d: %s", client.id, code, reason)
        client.cancel_timers()
        member.close_after_current(reason, code, grace=self.settings.close_timeout, flush=True)
        self._leave_all(client)

    # -- authentication, expiry and the rate limit ------------------------------------------

    def _auth_deadline(self, client: Client) -> None:
        if client.user is None and not client.subscriptions:
            self.close(client, CloseCode.AUTH_TIMEOUT, "not authenticated in time")

    def _arm_expiry(self, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the token's ``refresh`` push and, unless a fresh token comes, its end."""
        client.cancel_timers()
        expires_at = client.grant.expires_at
        if expires_at is None:
            return
        left = expires_at - time.time()
        if left > self.settings.refresh_ahead:
            client.timers.append(
                loop.call_later(left - self.settings.refresh_ahead, self._ask_refresh, client)
            )
        else:
            self._ask_refresh(client)
        client.timers.append(
            loop.call_later(max(0.0, left + self.settings.jwt_leeway), self._expire, client)
        )

    def _ask_refresh(self, client: Client) -> None:
        expires_at = client.grant.expires_at
        if expires_at is not None:
            client.send(refresh_frame(expires_at))

    def _expire(self, client: Client) -> None:
        self.close(client, CloseCode.TOKEN_EXPIRED, "token expired")

    def refuse(self, client: Client, frame: str | bytes, reason: str) -> None:
        """A request over the rate limit: an error reply, or 4029 for a client that keeps on."""
        if not client.member.active:
            return
        self.tally.auth_failed("rate_limited")
        if client.conn.refused > self.settings.rate_burst:
            self.close(client, CloseCode.RATE_LIMITED, f"rate limit: {reason}")
            return
        request_id: int | str | None = None
        try:
            request_id = parse_request(frame).id
        except RequestError as error:
            request_id = error.request_id
        client.send(error_reply(request_id, ErrorCode.RATE_LIMITED, reason))

    async def _auth(self, client: Client, request: Request) -> Outcome:
        token = request.string("token")
        try:
            grant = self.auth.verify(token)
        except AuthError as error:
            self.tally.auth_failed(auth_reason(str(error)))
            raise RequestError(ErrorCode.UNAUTHORIZED, str(error), request.id) from None
        user = grant.user
        assert user is not None
        if client.user is None:
            if client.subscriptions:
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    "authenticate before subscribing (unsubscribe first)",
                    request.id,
                )
            if not self.claim_user(user):
                limit = self.settings.max_connections_per_user
                self.close(
                    client,
                    CloseCode.TOO_MANY_CONNECTIONS,
                    f"too many connections for this user (limit {limit})",
                )
                raise RequestError(ErrorCode.FORBIDDEN, "too many connections", request.id)
            client.user = user
            client.info = encode_info(client.id, user)
        elif user != client.user:
            raise RequestError(
                ErrorCode.FORBIDDEN,
                "a fresh token must be for the same user ('sub')",
                request.id,
            )
        client.grant = grant
        self._arm_expiry(client, asyncio.get_running_loop())
        expires = None if grant.expires_at is None else int(grant.expires_at)
        return orjson.dumps({"user": user, "expires_at": expires}), None

    def cut(self, client: Client) -> None:
        """Close a client that reads too slowly (4008); its subscriptions end with it."""
        member = client.member
        if not member.active:
            return
        logger.info(
            "conn=%s /ws cut %d: outbox overflow (%d frames unread)",
            client.id,
            CloseCode.SLOW,
            member.limit,
        )
        self.tally.cut("/ws")
        member.close_after_current(
            f"too slow: more than {member.limit} frames unread",
            CloseCode.SLOW,
            grace=self.settings.close_timeout,
        )
        self._leave_all(client)

    async def disconnect_user(self, user: str) -> int:
        """Close every connection of ``user``, on every node, with 4001.

        Returns how many this node closed (the others act on the same command).
        """
        if not self.broker.shared:
            return self._disconnect_user(user)
        closed = self._disconnect_user(user)
        await self.broker.command("D", user)
        return closed

    def _command(self, command: str, argument: str) -> None:
        if command == "D":
            self._disconnect_user(argument)

    def _disconnect_user(self, user: str) -> int:
        """Close every local connection of ``user`` with 4001; returns how many."""
        closed = 0
        for client in list(self.clients.values()):
            if client.user == user and client.member.active:
                self.close(client, CloseCode.DISCONNECTED, "disconnected by the server")
                closed += 1
        return closed

    # -- requests -------------------------------------------------------------------------

    async def handle(self, client: Client, frame: str | bytes) -> None:
        """Answer one client frame with exactly one reply."""
        request_id: int | str | None = None
        try:
            request = parse_request(frame)
            request_id = request.id
            result, after = await self._ops[request.op](client, request)
        except RequestError as error:
            client.send(error_reply(error.request_id, error.code, error.message))
            return
        except BrokerUnavailable as error:
            client.send(error_reply(request_id, ErrorCode.UNAVAILABLE, str(error)))
            return
        except Exception:
            logger.exception("conn=%s /ws request failed", client.id)
            client.send(error_reply(request_id, ErrorCode.INTERNAL, "the server failed"))
            return
        client.send(ok_reply(request.id, result))
        if after is not None:
            after()

    def _channel(self, request: Request) -> str:
        channel = request.body.get("channel")
        if not isinstance(channel, str) or self.channel_name.fullmatch(channel) is None:
            raise RequestError(ErrorCode.BAD_CHANNEL, self.channel_rule, request.id)
        return channel

    def _allowed(self, client: Client, request: Request, action: str) -> str:
        """The request's channel, if the client's grant allows ``action`` on it."""
        channel = self._channel(request)
        grant = client.grant
        patterns = grant.subscribe if action == "subscribe" else grant.publish
        if not patterns.allows(channel):
            self.tally.auth_failed("forbidden_channel")
            who = "anonymous clients" if client.user is None else f"user {client.user!r}"
            raise RequestError(
                ErrorCode.FORBIDDEN, f"{who} may not {action} to {channel}", request.id
            )
        return channel

    async def _subscribe(self, client: Client, request: Request) -> Outcome:
        channel = self._allowed(client, request, "subscribe")
        recover = request.mapping("recover")
        recover_offset: int | None = None
        recover_epoch = ""
        if recover is not None:
            offset = recover.get("offset")
            epoch = recover.get("epoch")
            if type(offset) is not int or offset < 0 or not isinstance(epoch, str):
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    '\'recover\' must be {"offset": integer >= 0, "epoch": string}',
                    request.id,
                )
            recover_offset, recover_epoch = offset, epoch
        join_leave = request.boolean("join_leave")
        if channel in client.subscriptions:
            raise RequestError(
                ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}", request.id
            )
        limit = self.settings.max_subscriptions
        if len(client.subscriptions) >= limit:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {limit} subscriptions per connection",
                request.id,
            )

        subscription = Subscription(client, channel, join_leave)
        client.subscriptions[channel] = subscription
        local = self.local.get(channel)
        try:
            if local is None:
                local = self.local[channel] = LocalChannel()
                local.subscriptions[client.id] = subscription
                local.catching[client.id] = subscription
                await self.broker.subscribe(channel)
            else:
                local.subscriptions[client.id] = subscription
                local.catching[client.id] = subscription
            replay: list[bytes] = []
            if recover_offset is None:
                position = await self.broker.position(channel)
                epoch, top = position.epoch, position.offset
                self._new_epoch(local, epoch, subscription)
                result = orjson.dumps({"epoch": epoch, "offset": top})
                subscription.offset = top
            else:
                page = await self.broker.history(
                    channel, since=recover_offset, limit=max(1, self.settings.history_size)
                )
                recovered = False
                if page.epoch == recover_epoch:
                    if recover_offset <= page.offset:
                        recovered = page.start <= recover_offset + 1
                        replay = [frame for _, frame in page.publications]
                else:
                    # The stream the client knew is gone and a new one began after it: what
                    # happened in between is lost, but everything the new stream still holds
                    # is news to the client.
                    page = await self.broker.history(
                        channel, since=0, limit=max(1, self.settings.history_size)
                    )
                    replay = [frame for _, frame in page.publications]
                epoch, top = page.epoch, page.offset
                self._new_epoch(local, epoch, subscription)
                result = orjson.dumps(
                    {"epoch": epoch, "offset": top, "recovered": recovered, "replayed": len(replay)}
                )
                subscription.offset = top
            entry = {"client": client.id, "user": client.user, "connected_at": client.connected_at}
            await self.broker.presence_add(channel, client.id, entry)
        except BaseException:
            # A failed broker call, or the server stopping: leave no half subscription behind.
            # (Nothing else can end the subscription meanwhile: a client's requests and its
            # departure all run in its handler, one after the other.)
            await self._drop(client, channel, notify=False)
            raise
        await self.broker.emit(channel, event_frame("join", channel, client.info), client.id)

        def go_live() -> None:
            if client.subscriptions.get(channel) is not subscription:
                return  # the client was closed meanwhile
            for frame in replay:
                client.send(frame, force=True)
            pending = subscription.pending or ()
            subscription.pending = None
            for offset, frame in pending:
                if offset > subscription.offset:
                    subscription.offset = offset
                    client.send(frame)
            if local.delivered >= subscription.offset and client.member.active:
                # Nothing it already has can still arrive: straight to the live members.
                del local.catching[client.id]
                local.live[client.id] = client.member

        return result, go_live

    def _new_epoch(self, local: LocalChannel, epoch: str, mine: Subscription) -> None:
        """A subscribe learnt the channel's epoch: if it changed, the others must recover."""
        if local.epoch is not None and local.epoch != epoch:
            local.delivered = 0
            for other in list(local.subscriptions.values()):
                if other is not mine:
                    self._restart(other.client, f"the history of {other.channel} was reset")
        local.epoch = epoch

    async def _unsubscribe(self, client: Client, request: Request) -> Outcome:
        channel = self._channel(request)
        if channel not in client.subscriptions:
            raise RequestError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}", request.id)
        await self._drop(client, channel, notify=True)
        return EMPTY, None

    def _leave_all(self, client: Client) -> None:
        """A client being closed by the server leaves its channels now, not when it is gone.

        Its close may take until the close timeout (a peer that does not read); meanwhile it
        must not appear in presence nor receive publications.
        """
        if not client.subscriptions:
            return
        for channel in client.subscriptions:
            local = self.local.get(channel)
            if local is not None:
                local.forget(client.id)
        task = asyncio.get_running_loop().create_task(
            self._drop_all(client), name=f"roomcast-leave-{client.id}"
        )
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)

    async def _drop_all(self, client: Client, *, notify: bool = True) -> None:
        for channel in list(client.subscriptions):
            try:
                await self._drop(client, channel, notify=notify)
            except BrokerUnavailable:
                # The broker forgets the entry by itself (presence entries expire).
                logger.info("conn=%s /ws broker unavailable while leaving %s", client.id, channel)

    async def _drop(self, client: Client, channel: str, *, notify: bool) -> None:
        """End ``client``'s subscription to ``channel`` here and in the broker."""
        if client.subscriptions.pop(channel, None) is None:
            return
        local = self.local.get(channel)
        if local is not None:
            local.forget(client.id)
            local.subscriptions.pop(client.id, None)
            if not local.subscriptions:
                del self.local[channel]
                await self.broker.unsubscribe(channel)
        await self.broker.presence_remove(channel, client.id)
        if notify:
            await self.broker.emit(channel, event_frame("leave", channel, client.info), client.id)

    async def _publish(self, client: Client, request: Request) -> Outcome:
        channel = self._allowed(client, request, "publish")
        if lossy_numbers(request.text, request.body.get("data")):
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                "data: integers must fit in 64 bits (send larger ones as strings)",
                request.id,
            )
        data = self.encode_data(request.body, request.id)
        position = await self.broker.publish(channel, data, client.info)
        return orjson.dumps({"epoch": position.epoch, "offset": position.offset}), None

    def encode_data(self, body: dict[str, Any], request_id: int | str | None = None) -> bytes:
        """``body["data"]`` as JSON, checked against the publication size limit."""
        if "data" not in body:
            raise RequestError(ErrorCode.BAD_REQUEST, "'data' is required", request_id)
        try:
            data = orjson.dumps(body["data"])
        except orjson.JSONEncodeError as error:
            # Only from the HTTP API, whose JSON parser takes integers of any size.
            raise RequestError(ErrorCode.BAD_REQUEST, f"data: {error}", request_id) from None
        limit = self.settings.max_publication_size
        if len(data) > limit:
            raise RequestError(
                ErrorCode.TOO_LARGE, f"data is {len(data)} bytes; the limit is {limit}", request_id
            )
        return data

    async def _presence(self, client: Client, request: Request) -> Outcome:
        channel = self._allowed(client, request, "subscribe")
        clients = await self.broker.presence(channel)
        return orjson.dumps({"clients": clients}), None

    async def _history(self, client: Client, request: Request) -> Outcome:
        channel = self._allowed(client, request, "subscribe")
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
        page = await self.broker.history(channel, since=since, before=before, limit=limit)
        frames = (frame for _, frame in page.publications)
        return history_result(page.epoch, page.offset, page.start, frames), None

    async def _ping(self, client: Client, request: Request) -> Outcome:
        return EMPTY, None

    # -- deliveries from the broker ---------------------------------------------------------

    def on_publication(self, channel: str, offset: int, frame: bytes) -> None:
        """Fan a publication out to the channel's local subscribers (its frame built once)."""
        local = self.local.get(channel)
        if local is None or offset <= local.delivered:
            return  # nobody here, or delivered already (a catch-up overlapping the live stream)
        local.delivered = offset
        start = perf_counter()
        ws_frame: bytes | None = None
        message: dict[str, Any] | None = None
        slow: list[Member] | None = None
        live = local.live
        reached = len(live)
        for member in live.values():
            if member.fast:
                if ws_frame is None:
                    ws_frame = build_frame(OP_TEXT, frame)
                if member.offer(ws_frame) or member.push(ws_frame):
                    continue
            else:
                if message is None:
                    message = {"type": "websocket.send", "text": frame.decode()}
                if member.push(message):
                    continue
            if slow is None:
                slow = []
            slow.append(member)
        if slow is not None:
            reached -= len(slow)
        self.fanout_time.observe(perf_counter() - start)
        self.deliveries += reached
        self.delivered_bytes += reached * len(frame)
        if local.catching:
            self._deliver_catching(local, offset, frame)
        if slow is not None:
            for member in slow:
                client = self.clients.get(str(member.conn.id))
                if client is not None:
                    self.cut(client)

    def _deliver_catching(self, local: LocalChannel, offset: int, frame: bytes) -> None:
        for subscription in list(local.catching.values()):
            pending = subscription.pending
            if pending is not None:
                pending.append((offset, frame))
                continue
            if offset <= subscription.offset:
                continue  # it had this one from its replay
            subscription.offset = offset
            client = subscription.client
            client.send(frame)
            # Newer than its starting point: everything older has arrived, so it is live now.
            if local.catching.pop(client.id, None) is not None and client.member.active:
                local.live[client.id] = client.member

    def on_event(self, channel: str, frame: bytes, client: str) -> None:
        """Push a join/leave event to the channel's subscribers that asked for them."""
        local = self.local.get(channel)
        if local is None:
            return
        for subscription in list(local.subscriptions.values()):
            if (
                subscription.join_leave
                and subscription.pending is None
                and subscription.client.id != client
            ):
                subscription.client.send(frame)

    def on_reset(self, channel: str) -> None:
        """The channel's stream began again: its subscribers' offsets mean nothing now.

        They are closed with 1012 so that they reconnect and subscribe with ``recover``: the
        reply then says ``recovered: false`` and replays what the new stream holds.
        """
        local = self.local.get(channel)
        if local is None:
            return
        local.delivered = 0
        for subscription in list(local.subscriptions.values()):
            self._restart(subscription.client, f"the history of {channel} was reset")

    def _restart(self, client: Client, reason: str) -> None:
        member = client.member
        if not member.active:
            return
        logger.info("conn=%s /ws closed %d: %s", client.id, CloseCode.SERVICE_RESTART, reason)
        member.close_after_current(
            reason, CloseCode.SERVICE_RESTART, grace=self.settings.close_timeout
        )
        self._leave_all(client)

    def on_reconnect(self) -> None:
        """The broker is back: deliver what was published while this node could not hear."""
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(
                self._catch_up(), name="roomcast-resync"
            )

    async def _catch_up(self) -> None:
        limit = max(1, self.settings.history_size)
        for channel, local in list(self.local.items()):
            # Live members have everything up to `delivered`; catching ones up to their own
            # offset (never below it); pending ones are being answered by the broker now.
            marks = [local.delivered] if local.live else []
            marks += [s.offset for s in local.catching.values() if s.pending is None]
            if not marks:
                continue
            since = min(marks)
            try:
                page = await self.broker.history(channel, since=since, limit=limit)
            except BrokerUnavailable:
                return  # down again: the next reconnect starts over
            if self.local.get(channel) is not local:
                continue
            if page.epoch != local.epoch:
                self.on_reset(channel)
                continue
            lost = page.start - 1
            if since < lost:
                # The history no longer covers what some subscribers missed: they must recover
                # for themselves (they will hear recovered: false).
                for subscription in list(local.subscriptions.values()):
                    live = subscription.client.id in local.live
                    mark = local.delivered if live else subscription.offset
                    if subscription.pending is None and mark < lost:
                        self._restart(subscription.client, "missed publications the history lost")
            for offset, frame in page.publications:
                self.on_publication(channel, offset, frame)

    def stats(self) -> dict[str, int]:
        """Counts for ``/stats``."""
        return {
            "ws_clients": len(self.clients),
            "ws_channels": len(self.local),
            "ws_subscriptions": sum(len(local.subscriptions) for local in self.local.values()),
            "ws_writer_tasks": len(self._writers),
        }
