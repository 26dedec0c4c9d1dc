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
    unsubscribed_frame,
    utc_now,
)
from roomcast.settings import Settings
from roomcast.transport.frames import OP_TEXT, build_frame

__all__ = ["Client", "Node", "Subscription"]

logger = logging.getLogger("roomcast.channels")

EMPTY: Final = b"{}"
HISTORY_LIMIT_DEFAULT: Final = 100
HISTORY_LIMIT_MAX: Final = 1000
#: Bounds of the live publications a channel holds back while it catches up (per channel).
HELD_MAX: Final = 10_000
HELD_MAX_BYTES: Final = 8 << 20
#: Rounds of a catch-up (each one reads the history) before the channel is reset instead.
CATCH_UP_ROUNDS: Final = 5

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

        The outbox is bounded in frames and in bytes (``ROOMCAST_OUTBOX_SIZE``,
        ``ROOMCAST_OUTBOX_BYTES``). ``force`` is for the frames of a subscribe reply's replay,
        which the history bounds (``ROOMCAST_HISTORY_SIZE`` publications of at most
        ``ROOMCAST_MAX_PUBLICATION_SIZE``): the outbox may then exceed its bounds by that much,
        once, as the next frame that is not forced meets them.
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

    __slots__ = ("channel", "client", "epoch", "join_leave", "offset", "pending")

    def __init__(self, client: Client, channel: str, join_leave: bool) -> None:
        self.client = client
        self.channel = channel
        self.join_leave = join_leave
        #: The offset of the last publication sent to the client (or its starting point).
        self.offset = 0
        #: The epoch of the stream the client follows (from its subscribe reply).
        self.epoch = ""
        #: Publications that arrived before the subscribe reply was sent; ``None`` once live.
        self.pending: list[tuple[int, bytes]] | None = []


class Held:
    """Live publications held back during a catch-up, bounded in count and bytes."""

    __slots__ = ("bytes", "items", "overflow")

    def __init__(self) -> None:
        self.items: list[tuple[str, int, bytes]] = []
        self.bytes = 0
        #: Set when more arrived than the bound: the catch-up then resets the channel.
        self.overflow = False

    def add(self, epoch: str, offset: int, frame: bytes) -> None:
        if len(self.items) >= HELD_MAX or self.bytes + len(frame) > HELD_MAX_BYTES:
            self.overflow = True
            return
        self.items.append((epoch, offset, frame))
        self.bytes += len(frame)


class LocalChannel:
    """A channel with subscribers on this node."""

    __slots__ = (
        "again",
        "catching",
        "delivered",
        "epoch",
        "filling",
        "held",
        "live",
        "subscriptions",
    )

    def __init__(self) -> None:
        #: Every local subscription, in the order they were made.
        self.subscriptions: dict[str, Subscription] = {}
        #: The outboxes of the subscriptions that are live (the fan-out's hot loop).
        self.live: dict[str, Member] = {}
        #: Subscriptions pending or catching up (checked one by one).
        self.catching: dict[str, Subscription] = {}
        #: The highest offset this node has delivered on the channel (``None``: not known yet,
        #: for a new channel or a new stream). Publications reach the node in offset order, so
        #: the next one must be ``delivered + 1``: anything else is a gap to fill.
        self.delivered: int | None = None
        #: The epoch of the stream the node delivers.
        self.epoch: str | None = None
        #: While the node catches up from the history (after a gap, or a reconnection to the
        #: broker): the live publications that arrive meanwhile, held back, in order, so that
        #: none overtakes the catch-up (``None`` otherwise).
        self.held: Held | None = None
        #: Whether a catch-up task runs, and whether it must read the history again (the
        #: broker reconnected meanwhile).
        self.filling = False
        self.again = False

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
        member = Member(
            conn, "", self.settings.outbox_size, self._writers, self.settings.outbox_bytes
        )
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
        await self._revoke_unallowed(client)
        expires = None if grant.expires_at is None else int(grant.expires_at)
        return orjson.dumps({"user": user, "expires_at": expires}), None

    async def _revoke_unallowed(self, client: Client) -> None:
        """End the subscriptions that the client's (new) grant no longer allows.

        A fresh token replaces the old one's channels (docs/protocol.md, ``auth``): keeping a
        subscription that the grant no longer covers would go on delivering a channel whose
        ``history`` is already refused. Each one ends with an ``unsubscribed`` push, queued
        before the reply to ``auth``, and no publication of it reaches the client after that.
        """
        patterns = client.grant.subscribe
        for channel in [name for name in client.subscriptions if not patterns.allows(name)]:
            reason = f"the connection's new token does not allow subscribing to {channel}"
            try:
                # Delivery to the client stops at once, before the first await in there.
                await self._drop(client, channel, notify=True)
            except BrokerUnavailable:
                # The broker forgets the entry by itself (presence entries expire).
                logger.info("conn=%s /ws broker unavailable while leaving %s", client.id, channel)
            logger.info("conn=%s /ws unsubscribed from %s: token narrowed", client.id, channel)
            client.send(unsubscribed_frame(channel, reason))

    def cut(self, client: Client) -> None:
        """Close a client that reads too slowly (4008); its subscriptions end with it."""
        member = client.member
        if not member.active:
            return
        logger.info(
            "conn=%s /ws cut %d: outbox overflow (%s)", client.id, CloseCode.SLOW, member.overflow
        )
        self.tally.cut("/ws")
        member.close_after_current(
            f"too slow: {member.overflow}", CloseCode.SLOW, grace=self.settings.close_timeout
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
            # Every subscriber waits until the broker delivers the channel to this node (the
            # first one asked; the others wait for the same confirmation), and only then reads
            # the position: a position read earlier could miss publications made in between.
            await self.broker.subscribe(channel)
            replay: list[bytes] = []
            if recover_offset is None:
                position = await self.broker.position(channel)
                epoch, top = position.epoch, position.offset
                self._learn_stream(local, epoch, top, subscription)
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
                self._learn_stream(local, epoch, top, subscription)
                result = orjson.dumps(
                    {"epoch": epoch, "offset": top, "recovered": recovered, "replayed": len(replay)}
                )
                subscription.offset = top
            entry = {"client": client.id, "user": client.user, "connected_at": client.connected_at}

            def current() -> bool:
                return client.member.active and client.subscriptions.get(channel) is subscription

            # The server may close the client while the broker answers (too slow, token
            # expired, /api/disconnect): it leaves its channels at once (_leave_all), removing
            # its presence entry. An entry added after that would outlive the client, kept alive
            # by this node's presence heartbeat; so add it only for a current subscription, and
            # take it back if the client was closed during the add.
            if current():
                try:
                    await self.broker.presence_add(channel, client.id, entry)
                finally:
                    if not current():
                        await self.broker.presence_remove(channel, client.id)
        except BaseException:
            # A failed broker call, or the server stopping: leave no half subscription behind.
            # (A client closed meanwhile has left already: then _drop finds nothing to do.)
            await self._drop(client, channel, notify=False)
            raise
        if not current():
            return result, None  # closed meanwhile: no reply reaches it, no join to announce
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
            delivered = local.delivered
            if delivered is not None and delivered >= subscription.offset and client.member.active:
                # Nothing it already has can still arrive: straight to the live members.
                del local.catching[client.id]
                local.live[client.id] = client.member

        return result, go_live

    def _learn_stream(self, local: LocalChannel, epoch: str, top: int, mine: Subscription) -> None:
        """A subscribe reply read the channel's stream (``epoch``, last offset ``top``).

        The broker delivers the channel to this node since before the read, so every
        publication after ``top`` reaches the node: a node that knew nothing of the channel
        knows where it stands now. A new epoch resets the subscribers of the old one.
        """
        mine.epoch = epoch
        if local.epoch != epoch:
            if local.epoch is not None:
                self._reset(local, epoch)
            local.epoch = epoch
        if local.delivered is None:
            local.delivered = top

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
        frames = [frame for _, frame in page.publications]
        # Bounded in bytes too (HISTORY_PAGE_BYTES): a page may hold fewer than `limit`, and
        # the client pages on from its last (or, backwards, its first) offset.
        result = history_result(
            page.epoch, page.offset, page.start, frames, keep_newest=since is None
        )
        return result, None

    async def _ping(self, client: Client, request: Request) -> Outcome:
        return EMPTY, None

    # -- deliveries from the broker ---------------------------------------------------------

    def on_publication(self, channel: str, epoch: str, offset: int, frame: bytes) -> None:
        """A publication from the broker: fan it out, unless it is not the next one.

        Publications reach the node in offset order. One from another stream resets the
        subscribers of the old one; one past the next offset means the node missed some (its
        connection to the broker dropped them): it holds the live ones back and fills the gap
        from the history first. Nothing is skipped without the subscribers being told.
        """
        local = self.local.get(channel)
        if local is None:
            return
        held = local.held
        if held is not None:
            held.add(epoch, offset, frame)
            return
        if epoch != local.epoch:
            if local.epoch is not None:
                self._reset(local, epoch)
            local.epoch = epoch
        delivered = local.delivered
        if delivered is not None:
            if offset <= delivered:
                return  # delivered already (a catch-up overlapping the live stream)
            if offset != delivered + 1:
                self._catch_up(channel, local).add(epoch, offset, frame)
                return
        self._fan_out(local, offset, frame)

    def _fan_out(self, local: LocalChannel, offset: int, frame: bytes) -> None:
        """Write the next publication, framed once, to every live subscriber."""
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

    def _reset(self, local: LocalChannel, epoch: str) -> None:
        """The channel's stream began again as ``epoch``: the old one's offsets mean nothing.

        Its subscribers are closed with 1012 so that they reconnect and subscribe with
        ``recover``: the reply then says ``recovered: false`` and replays what the new stream
        holds. Those that already follow ``epoch`` (their reply read it) stay.
        """
        local.epoch = epoch
        local.delivered = None
        for subscription in list(local.subscriptions.values()):
            if not subscription.epoch:
                # Its reply, still to come, reads the stream as it is now; what it was given
                # meanwhile belongs to the old one.
                if subscription.pending:
                    subscription.pending.clear()
            elif subscription.epoch != epoch:
                self._restart(
                    subscription.client, f"the history of {subscription.channel} was reset"
                )

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
        """The broker is back: catch every channel up on what this node could not hear.

        Called before any publication of the new connection arrives, so each channel holds the
        live ones back until its catch-up has delivered what the history holds.
        """
        for channel, local in list(self.local.items()):
            self._catch_up(channel, local)

    def _catch_up(self, channel: str, local: LocalChannel) -> Held:
        """Hold ``channel``'s live publications back and fill its gap from the history.

        One catch-up at a time per channel: asked again while one runs (the broker reconnected
        meanwhile), that one reads the history once more.
        """
        if local.held is None:
            local.held = Held()
        if local.filling:
            local.again = True
            return local.held
        local.filling = True
        local.again = False
        task = asyncio.get_running_loop().create_task(
            self._fill(channel, local), name=f"roomcast-catch-up-{channel}"
        )
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)
        return local.held

    async def _fill(self, channel: str, local: LocalChannel) -> None:
        """Deliver from the history what the node missed, then what it held back, in order.

        Each round reads the history after the last offset delivered, delivers it, then the
        held publications while they follow on. A gap the history no longer covers, another
        stream, or a catch-up that cannot finish resets the subscribers concerned: they see
        ``recovered: false`` when they come back, never a silent gap. If the broker is
        unreachable, the channel stays held (bounded) until it is back (:meth:`on_reconnect`).
        """
        limit = max(1, self.settings.history_size)
        try:
            for _ in range(CATCH_UP_ROUNDS):
                local.again = False
                since = self._since(local)
                if since is None:
                    self._release(local, everything=True)
                    return  # nobody waits for anything older: the held ones are the stream
                page = await self.broker.history(channel, since=since, limit=limit)
                if self.local.get(channel) is not local:
                    return  # everyone left meanwhile
                if local.again:
                    continue  # the broker reconnected while the history was read
                if page.epoch != local.epoch:
                    self._reset(local, page.epoch)
                    continue
                lost = page.start - 1
                if since < lost:
                    self._drop_behind(local, lost)
                    local.delivered = lost
                for offset, frame in page.publications:
                    delivered = local.delivered
                    if delivered is None or offset > delivered:
                        self._fan_out(local, offset, frame)
                if self._release(local):
                    return
            self._restart_all(local, "the node could not catch up with the channel")
            self._release(local, everything=True)
        except BrokerUnavailable:
            return  # still held; the broker's reconnection starts the next catch-up
        finally:
            local.filling = False

    @staticmethod
    def _since(local: LocalChannel) -> int | None:
        """The offset after which some subscriber still needs publications."""
        marks = [] if local.delivered is None else [local.delivered]
        marks += [s.offset for s in local.catching.values() if s.pending is None]
        return min(marks) if marks else None

    def _drop_behind(self, local: LocalChannel, lost: int) -> None:
        """Reset the subscribers that miss publications the history no longer holds."""
        for subscription in list(local.subscriptions.values()):
            mark = local.delivered if subscription.client.id in local.live else subscription.offset
            if subscription.pending is None and mark is not None and mark < lost:
                self._restart(subscription.client, "missed publications the history lost")

    def _release(self, local: LocalChannel, *, everything: bool = False) -> bool:
        """Deliver the held publications while they follow on (``everything``: all of them).

        Returns ``True`` once none is left (the channel is live again); ``False`` at a gap,
        another stream, or an overflow, keeping the rest held for the next round.
        """
        held = local.held
        if held is None:
            return True
        if held.overflow and not everything:
            # More arrived than could be held: the history has them; hold anew and read it.
            local.held = Held()
            return False
        items = held.items
        for i, (epoch, offset, frame) in enumerate(items):
            delivered = local.delivered
            if everything:
                if epoch != local.epoch:
                    self._reset(local, epoch)
                elif delivered is not None and offset <= delivered:
                    continue
                self._fan_out(local, offset, frame)
                continue
            if epoch != local.epoch or (delivered is not None and offset > delivered + 1):
                local.held = rest = Held()
                for item in items[i:]:
                    rest.add(*item)
                return False
            if delivered is None or offset > delivered:
                self._fan_out(local, offset, frame)
        local.held = None
        return True

    def _restart_all(self, local: LocalChannel, reason: str) -> None:
        for subscription in list(local.subscriptions.values()):
            if subscription.pending is None:
                self._restart(subscription.client, reason)
        local.delivered = None

    def stats(self) -> dict[str, int]:
        """Counts for ``/stats``."""
        return {
            "ws_clients": len(self.clients),
            "ws_channels": len(self.local),
            "ws_subscriptions": sum(len(local.subscriptions) for local in self.local.values()),
            "ws_writer_tasks": len(self._writers),
        }
