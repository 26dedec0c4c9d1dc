"""The Python client of the ``/ws`` protocol, with reconnection and recovery built in.

::

    import roomcast

    async with roomcast.connect("ws://127.0.0.1:8000/ws", token="...") as client:
        lobby = await client.subscribe("chat:lobby")
        await client.publish("chat:lobby", {"text": "hi"})
        async for publication in lobby:
            print(publication.info["user"], publication.data)

When the connection drops (network failure, server restart, cut for reading too slowly) the
client reconnects with exponential backoff and full jitter, subscribes again to every channel
with the last offset and epoch it delivered, and the server replays what was missed. Each
subscription hands every publication to the application once, in offset order: replays that
overlap what was already delivered are skipped. What the server's history no longer holds
cannot be replayed; :attr:`Subscription.gaps` counts such recoveries.

The client does not reconnect after close 4001 (disconnected through the server's API) or an
HTTP 403 handshake (bad token); it raises :class:`Disconnected` to the application then.

``token`` may be a function (plain or async) that returns a token: it is called for every
connection, and when the server says the token is about to expire (a ``refresh`` push) the
client fetches a fresh one and sends it with ``auth``, so the connection never drops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from roomcast.closecodes import CloseCode
from roomcast.errors import RoomcastError

__all__ = [
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Presence",
    "Publication",
    "ServerError",
    "Subscription",
    "connect",
]

logger = logging.getLogger("roomcast.client")

State = Literal["connecting", "connected", "reconnecting", "closed"]

#: Close codes after which reconnecting cannot help.
TERMINAL_CLOSE_CODES = frozenset({CloseCode.DISCONNECTED, CloseCode.POLICY_VIOLATION})

#: A token, or a function (plain or async) returning a fresh one.
TokenSource = str | Callable[[], str | Awaitable[str]] | None


class ServerError(RoomcastError):
    """The server answered a request with ``ok: false`` (or ended a subscription: code
    ``unsubscribed``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(RoomcastError):
    """The connection dropped while a request was in flight; it may or may not have happened."""


class Disconnected(RoomcastError):
    """The client is closed for good: closed by the application, kicked, or refused."""


class _NotConnected(ConnectionLost):
    """No connection right now: the request was not sent (so it can wait and be sent)."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication of a channel."""

    channel: str
    offset: int
    data: Any
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Presence:
    """A ``join`` or ``leave`` event (subscriptions made with ``join_leave=True``)."""

    channel: str
    event: Literal["join", "leave"]
    info: dict[str, Any]


class Subscription:
    """A channel subscription: an async iterator of its publications (and presence events)."""

    def __init__(self, client: Client, channel: str, join_leave: bool, max_queue: int) -> None:
        self.client = client
        self.channel = channel
        self.join_leave = join_leave
        #: The epoch and offset of the last publication delivered (or the starting point).
        self.epoch: str | None = None
        self.offset = 0
        #: Reconnections whose recovery replayed everything missed, and those that could not.
        self.recoveries = 0
        self.gaps = 0
        self._queue: asyncio.Queue[Publication | Presence | None] = asyncio.Queue(max_queue)
        self._closed = False
        #: Why the server ended the subscription (an ``unsubscribed`` push), if it did.
        self.ended: ServerError | None = None

    async def _put(self, item: Publication | Presence) -> None:
        if isinstance(item, Publication):
            if item.offset <= self.offset:
                return  # already delivered: a replay overlapping what we had
            self.offset = item.offset
        await self._queue.put(item)

    def _end(self, reason: ServerError | None = None) -> None:
        if reason is not None and not self._closed:
            self.ended = reason
        self._closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Publication | Presence]:
        return self

    async def __anext__(self) -> Publication | Presence:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            # Ended: unsubscribed or closed by the application (a normal end), or the client
            # stopped for good (kicked, refused), or the server ended this subscription (its
            # token no longer allows the channel), which the application must hear about.
            if self.client.error is not None:
                raise self.client.error
            if self.ended is not None:
                raise self.ended
            raise StopAsyncIteration
        return item

    async def unsubscribe(self) -> None:
        """Stop receiving this channel; the iterator ends."""
        await self.client._unsubscribe(self)


class Client:
    """A ``/ws`` connection that survives reconnects. Make one with :func:`connect`."""

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource = None,
        backoff_min: float = 0.25,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
        max_queue: int = 4096,
    ) -> None:
        self.url = url
        self.token = token
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.max_queue = max_queue
        #: This connection's id and user, as the server's ``connected`` push said.
        self.client_id: str | None = None
        self.user: str | None = None
        self.state: State = "connecting"
        #: How many times the connection was established (1 + reconnections).
        self.connections = 0
        #: Why the client stopped for good, if it did.
        self.error: Disconnected | None = None
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._ids = itertools.count(1)
        #: Requests in flight: their reply's future, and the subscription a subscribe is for.
        self._waiting: dict[int, tuple[asyncio.Future[Any], Subscription | None]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._runner: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; returns once connected, raises if the first connection is refused."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._runner = loop.create_task(self._run(), name="roomcast-client")
        try:
            async with asyncio.timeout(self.request_timeout):
                await asyncio.shield(self._first)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and end every subscription's iterator."""
        self.state = "closed"
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for subscription in self._subscriptions.values():
            subscription._end()

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                ws = await self._open(attempt)
                if ws is None:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                opened = time.monotonic()
                code = await self._serve(ws)
                if code in TERMINAL_CLOSE_CODES:
                    self._stop(Disconnected(f"closed by the server with code {code}"))
                    return
                self.state = "reconnecting"
                # A connection that lasted counts as a success; one closed at once (a server
                # that keeps cutting us) backs off further each time, like a failed attempt.
                lasted = time.monotonic() - opened
                attempt = 1 if lasted > max(5.0, self.backoff_max) else attempt + 1
                await asyncio.sleep(self._backoff(attempt))
        except Disconnected as error:
            self._stop(error)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS architecture blog's "full jitter")."""
        ceiling = min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 30))
        return random.uniform(self.backoff_min / 2, ceiling)

    async def _token(self) -> str | None:
        """The token to use now: :attr:`token` itself, or what its function returns."""
        source = self.token
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _refresh(self) -> None:
        """The server's ``refresh`` push: send a fresh token before the old one expires."""
        try:
            token = await self._token()
            if token:
                await self._send("auth", {"token": token})
        except Exception as error:  # the server closes with 4003; we reconnect then
            logger.warning("roomcast client: token refresh failed: %s", error)

    async def _open(self, attempt: int) -> ClientConnection | None:
        token = await self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            ws = await ws_connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.request_timeout,
                max_size=None,
            )
        except InvalidStatus as error:
            if error.response.status_code in (401, 403):
                raise Disconnected(f"refused: HTTP {error.response.status_code}") from None
            logger.info("roomcast client: connect failed (%s); retrying", error)
            return None
        except (OSError, TimeoutError, InvalidHandshake) as error:
            if attempt == 0 or logger.isEnabledFor(logging.DEBUG):
                logger.info("roomcast client: connect failed (%s); retrying", error)
            return None
        return ws

    async def _serve(self, ws: ClientConnection) -> int | None:
        """Run one connection until it closes; returns the close code the server sent."""
        resubscribe: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                frame = orjson.loads(message)
                if "id" in frame:
                    waiting = self._waiting.pop(frame["id"], None)
                    if waiting is not None:
                        waiter, subscription = waiting
                        if subscription is not None and frame["ok"]:
                            # Now, before reading on: the replayed publications follow at once.
                            self._subscribed(subscription, frame["result"])
                        if not waiter.done():
                            waiter.set_result(frame)
                    continue
                kind = frame.get("type")
                if kind == "publication":
                    subscription = self._subscriptions.get(frame["channel"])
                    if subscription is not None:
                        await subscription._put(
                            Publication(
                                frame["channel"], frame["offset"], frame["data"], frame["info"]
                            )
                        )
                elif kind in ("join", "leave"):
                    subscription = self._subscriptions.get(frame["channel"])
                    if subscription is not None:
                        await subscription._put(Presence(frame["channel"], kind, frame["info"]))
                elif kind == "unsubscribed":
                    # The server ended it (a fresh token without this channel): for good.
                    subscription = self._subscriptions.pop(frame["channel"], None)
                    if subscription is not None:
                        subscription._end(ServerError("unsubscribed", frame["reason"]))
                elif kind == "refresh":
                    if callable(self.token) and (
                        self._refreshing is None or self._refreshing.done()
                    ):
                        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
                elif kind == "connected":
                    self.client_id = frame["client"]
                    self.user = frame["user"]
                    self._ws = ws
                    self.connections += 1
                    resubscribe = asyncio.get_running_loop().create_task(self._resubscribe())
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._connected.clear()
            for waiter, _ in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionLost("the connection dropped"))
            self._waiting.clear()
            if resubscribe is not None:
                resubscribe.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionLost):
                    await resubscribe
            with contextlib.suppress(Exception):
                await ws.close()
        received = ws.protocol.close_rcvd
        return received.code if received is not None else None

    async def _resubscribe(self) -> None:
        """After (re)connecting: subscribe again to every channel, recovering from offsets."""
        subscriptions = list(self._subscriptions.values())
        replies = [self._resubscribe_one(subscription) for subscription in subscriptions]
        outcomes = await asyncio.gather(*replies, return_exceptions=True)
        for subscription, outcome in zip(subscriptions, outcomes, strict=True):
            if isinstance(outcome, ConnectionLost | ConnectionClosed):
                raise ConnectionLost("the connection dropped while resubscribing")
            if isinstance(outcome, BaseException):
                logger.warning(
                    "roomcast client: resubscribing to %s failed: %s", subscription.channel, outcome
                )
                self._subscriptions.pop(subscription.channel, None)
                subscription._end()
        self.state = "connected"
        self._connected.set()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _resubscribe_one(self, subscription: Subscription) -> dict[str, Any]:
        """Subscribe again with recovery; ``unavailable`` (the server's broker is down for
        now) is retried with backoff instead of ending the subscription."""
        attempt = 0
        while True:
            body: dict[str, Any] = {"channel": subscription.channel}
            if subscription.join_leave:
                body["join_leave"] = True
            if subscription.epoch is not None:
                body["recover"] = {"offset": subscription.offset, "epoch": subscription.epoch}
            try:
                return await self._send("subscribe", body, subscription)
            except ServerError as error:
                if error.code != "unavailable":
                    raise
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    def _subscribed(self, subscription: Subscription, result: dict[str, Any]) -> None:
        recovered = result.get("recovered")
        if recovered is True:
            subscription.recoveries += 1
        elif recovered is False:
            subscription.gaps += 1
            if result["epoch"] != subscription.epoch:
                # A new history stream: the server replays all it holds of it, from offset 1.
                subscription.offset = 0
        else:
            subscription.offset = result["offset"]
        subscription.epoch = result["epoch"]

    def _stop(self, error: Disconnected) -> None:
        self.error = error
        self.state = "closed"
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
        for subscription in self._subscriptions.values():
            subscription._end()

    # -- requests -------------------------------------------------------------------------

    def _send(
        self, op: str, body: dict[str, Any], subscription: Subscription | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        """Send a request on the current connection; the future resolves to its result."""
        ws = self._ws
        if ws is None:
            raise _NotConnected("not connected")
        request_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (waiter, subscription)
        frame = orjson.dumps({"id": request_id, "op": op, **body}).decode()

        async def exchange() -> dict[str, Any]:
            await ws.send(frame)
            reply = await waiter
            if not reply["ok"]:
                error = reply["error"]
                raise ServerError(error["code"], error["message"])
            result: dict[str, Any] = reply["result"]
            return result

        return asyncio.ensure_future(exchange())

    async def request(
        self, op: str, subscription: Subscription | None = None, **body: Any
    ) -> dict[str, Any]:
        """Send one request once connected and return its result (raises :class:`ServerError`).

        A request sent on a connection that then drops raises :class:`ConnectionLost`: it may
        or may not have taken effect. A request made while the client is reconnecting waits
        (up to ``request_timeout``) and is sent once it is connected again.
        """
        async with asyncio.timeout(self.request_timeout):
            while True:
                if self.error is not None:
                    raise self.error
                if self.state == "closed":
                    raise Disconnected("the client was closed")
                await self._connected.wait()
                try:
                    return await self._send(op, body, subscription)
                except _NotConnected:
                    continue
                except ConnectionClosed:
                    raise ConnectionLost("the connection dropped") from None

    async def subscribe(self, channel: str, *, join_leave: bool = False) -> Subscription:
        """Subscribe to ``channel``; iterate the result for its publications."""
        if channel in self._subscriptions:
            raise ServerError("already_subscribed", f"already subscribed to {channel}")
        subscription = Subscription(self, channel, join_leave, self.max_queue)
        self._subscriptions[channel] = subscription
        try:
            body: dict[str, Any] = {"channel": channel}
            if join_leave:
                body["join_leave"] = True
            await self.request("subscribe", subscription, **body)
        except BaseException:
            self._subscriptions.pop(channel, None)
            raise
        return subscription

    async def _unsubscribe(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.channel) is not subscription:
            return
        del self._subscriptions[subscription.channel]
        subscription._end()
        with contextlib.suppress(ConnectionLost):
            await self.request("unsubscribe", channel=subscription.channel)

    async def publish(self, channel: str, data: Any) -> int:
        """Publish ``data`` (any JSON value) to ``channel``; returns its offset."""
        result = await self.request("publish", channel=channel, data=data)
        offset: int = result["offset"]
        return offset

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """Who is subscribed to ``channel``: ``[{"client", "user", "connected_at"}, ...]``."""
        result = await self.request("presence", channel=channel)
        clients: list[dict[str, Any]] = result["clients"]
        return clients

    async def history(
        self,
        channel: str,
        *,
        limit: int | None = None,
        since: int | None = None,
        before: int | None = None,
    ) -> list[Publication]:
        """Stored publications of ``channel``, oldest first (see docs/protocol.md)."""
        body: dict[str, Any] = {"channel": channel}
        for name, value in (("limit", limit), ("since", since), ("before", before)):
            if value is not None:
                body[name] = value
        result = await self.request("history", **body)
        return [
            Publication(p["channel"], p["offset"], p["data"], p["info"])
            for p in result["publications"]
        ]

    async def ping(self) -> None:
        """One application-level round trip."""
        await self.request("ping")


def connect(url: str, *, token: TokenSource = None, **options: Any) -> Client:
    """A client for the ``/ws`` endpoint at ``url``; use it with ``async with``.

    Options: ``backoff_min`` / ``backoff_max`` (seconds, default 0.25 / 10), ``request_timeout``
    (seconds, default 10), ``max_queue`` (publications buffered per subscription, default 4096;
    when the application reads slower than that, the client stops reading the socket and the
    server eventually cuts it; it then reconnects and recovers).
    """
    return Client(url, token=token, **options)
