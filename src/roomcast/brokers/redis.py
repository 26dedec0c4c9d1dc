"""``redis://`` / ``rediss://``: channels shared by every node that uses the same Redis (>= 6).

Keys (``P`` is the prefix, ``roomcast`` unless the URL says ``?prefix=...``; the braces are
literal: a channel's name is its keys' hash tag, for :mod:`roomcast.brokers.redis_cluster`):

- ``P:m:{channel}`` hash ``epoch``, ``offset``, ``gen``, ``at``, ``bytes``: the channel's
  stream position; ``gen`` and ``at`` name the Redis process that wrote the last publication
  and when (see :data:`roomcast.brokers.redis_scripts.PROLOGUE`: a restored or promoted copy
  skips the offsets lost writes can have had). Offsets come from ``HINCRBY`` inside the
  publish script, so a channel has one sequence cluster-wide. It lives ``history_meta_ttl``
  after its last use (not the history TTL: a quiet channel keeps its offsets).
- ``P:h:{channel}`` stream: the history, one entry per publication with the explicit id
  ``{offset}-1``, trimmed to the history size and to ``history_bytes`` bytes of data and info
  (``bytes`` in the meta counts them) on every publish, and by age on every read.
- ``P:p:{channel}`` hash client -> presence entry, and ``P:z:{channel}`` sorted set client ->
  expiry time: each node refreshes the expiry of its own clients' entries, in the channels it
  delivers; the entries of a node that died expire after ``presence_ttl`` seconds (the presence
  script drops them, however many). Commands take ``PRESENCE_BATCH`` entries at most.
- ``P:channels`` sorted set channel -> expiry: channels with subscribers, refreshed the same way.
- Pub/sub channel ``P:c:{channel}``: live publications (``P <epoch> <offset> <len(info)>
  <info><data>``; a chat room's have no epoch and offset 0) and join/leave events
  (``E <kind> <client> <info>``); ``P:control``: commands to every node (``D <user>``:
  disconnect that user).

A publication gets its offset, is stored and published in one atomic step (the scripts are in
:mod:`roomcast.brokers.redis_scripts`), so it crosses Redis once. The broker stores and carries
the publisher's bytes as they are; each node encodes them once per wire format. Each node holds
one Redis subscription per channel that has local subscribers, whatever their number.
Publications go on a connection of their own, as many per round trip as are waiting
(:mod:`roomcast.brokers.redis_pipe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.brokers.base import BrokerUnavailable, HistoryPage, Position, Publication, Sink
from roomcast.brokers.redis_pipe import AutoPipeline, ConnectionPipeline
from roomcast.brokers.redis_presence import RedisPresence
from roomcast.brokers.redis_scripts import (
    HISTORY,
    POSITION,
    PRESENCE,
    PUBLISH,
    WHOAMI,
    for_process,
)
from roomcast.counters import BROKER_BUCKETS, LocalHistogram

__all__ = ["RedisBroker"]

logger = logging.getLogger("roomcast.broker")

T = TypeVar("T")

#: Seconds the start waits for Redis before serving anyway (not ready).
STARTUP_WAIT = 5.0

#: Failures that mean "Redis cannot be reached now" (as opposed to a bug). RuntimeError: redis-py
#: writing on a transport that closed under it while it reconnected ("the handler is closed").
#: The cluster's: no node answers (RedisClusterException), a slot without a master during a
#: failover (ClusterDownError, TryAgainError).
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    RuntimeError,
    RedisClusterException,
    ClusterDownError,
    TryAgainError,
)


class RedisBroker(RedisPresence):
    """Channels in Redis, shared by every node connected to it."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        history_size: int,
        history_ttl: float,
        presence_ttl: float,
        history_bytes: int = 1 << 20,
        meta_ttl: float = 30 * 86400.0,
        node_id: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = query.pop("prefix", "roomcast")
        rest = "&".join(f"{k}={v}" for k, v in query.items())
        self.url = urlunsplit(parts._replace(query=rest))
        self.history_size = history_size
        self.history_ttl = max(1, round(history_ttl))
        self.history_bytes = history_bytes
        #: The meta key (epoch, offset) outlives the publications: a channel whose history
        #: expired keeps its offsets, so its subscribers are not reset for being quiet.
        self.meta_ttl = max(self.history_ttl, round(meta_ttl))
        self.presence_ttl = presence_ttl
        self.node_id = node_id or secrets.token_hex(4)
        self.available = False
        self._redis: aioredis.Redis | None = None
        #: Publications, as many per round trip as are waiting (see redis_pipe).
        self._pipe: AutoPipeline | ConnectionPipeline | None = None
        self._pubsub: Any = None
        #: The pub/sub connection's own client: one connection, never retried in place (see
        #: start()).
        self._listener: aioredis.Redis | None = None
        self._sink: Sink | None = None
        #: Pub/sub channels this node wants, and the futures of subscriptions not yet confirmed.
        self._wanted: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        #: Presence entries of this node's clients: channel -> client -> encoded entry.
        self._mine: dict[str, dict[str, bytes]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: SHA1 of each stream script as loaded into each Redis process (run by EVALSHA only;
        #: see _load_scripts), by node (the cluster's node name; "" for one Redis).
        self._shas: dict[str, dict[str, str]] = {}
        self._loading: dict[str, asyncio.Future[dict[str, str]]] = {}
        #: PUBLISH; the cluster's SPUBLISH (sharded pub/sub).
        self._publish_command = "PUBLISH"
        #: Presence writes in one MULTI (a cluster cannot: the index of channels is elsewhere).
        self._atomic = True
        self._presence_script: Any = None
        self._down_since: float | None = None
        #: Set while Redis is reachable through the listener's connection.
        self._up = asyncio.Event()
        #: For roomcast.metrics: command round trips by op, publications made, reconnections.
        self.timings: dict[str, LocalHistogram] = {}
        self.publications = 0
        self.reconnects = 0

    # -- keys -----------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        # The braces make the channel's name its keys' hash tag: on a Redis Cluster, every key of
        # a channel is in one slot (channel names have no braces).
        return f"{self.prefix}:{kind}:{{{name}}}"

    @property
    def _control(self) -> str:
        return f"{self.prefix}:control"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._redis = self._open()
        r = self._redis
        self._pipe = self._new_pipe()
        self._presence_script = r.register_script(PRESENCE)
        self._wanted.add(self._control)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="roomcast-redis-listener"),
            loop.create_task(self._heartbeat(), name="roomcast-redis-presence"),
        ]
        # Accept clients once Redis answers, so that the first ones are not served "local
        # only"; if it does not answer soon, start anyway (not ready) and keep trying.
        try:
            async with asyncio.timeout(STARTUP_WAIT):
                await self._up.wait()
        except TimeoutError:
            logger.warning(
                "broker %s not reachable at start; serving, not ready, until it is", self._where
            )

    def _open(self) -> Any:
        """The client for commands; also makes the pub/sub connection's own client."""
        # A bounded pool whose callers wait for a free connection: a burst (hundreds of
        # clients leaving at once at shutdown) queues instead of failing "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=64,
            timeout=5,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
        )
        # The pub/sub connection must not reconnect behind the listener's back: redis-py
        # retries a failed read by reconnecting and resubscribing in place, and whatever was
        # published meanwhile would be lost without anyone knowing. With no retries the read
        # fails, the listener reconnects itself, and the node catches up from the history.
        self._listener = aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2,
            health_check_interval=10,
            client_name=f"roomcast-{self.node_id}-pubsub",
        )
        return aioredis.Redis(connection_pool=pool)

    def _new_pipe(self) -> AutoPipeline | ConnectionPipeline:
        """Where publications go: a connection of their own, several batches under way."""
        return ConnectionPipeline(self._conn.connection_pool)

    def _new_pubsub(self) -> Any:
        """A pub/sub connection, not yet subscribed to anything."""
        assert self._listener is not None
        return self._listener.pubsub()

    async def _check(self) -> None:
        """Raise unless Redis answers (after a failure: with fresh connections)."""
        if self._down_since is not None:
            # Connections made before the failure are dead: drop the idle ones rather than
            # fail one request on each.
            await self._conn.connection_pool.disconnect(inuse_connections=False)
            if isinstance(self._pipe, ConnectionPipeline):
                self._pipe.reset()
        await self._conn.ping()

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._mine and self.available:
            # Leave no presence behind (a node that dies leaves it to expire instead).
            with contextlib.suppress(RedisError, *UNREACHABLE):
                async with asyncio.timeout(2):
                    pipe = self._conn.pipeline(transaction=False)
                    for channel, entries in self._mine.items():
                        self._forget_presence(pipe, channel, list(entries))
                    await pipe.execute()
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, *UNREACHABLE):
                await self._pubsub.aclose()
        for client in (self._listener, self._redis):
            if client is not None:
                with contextlib.suppress(RedisError, *UNREACHABLE):
                    if isinstance(client, aioredis.Redis):
                        await client.aclose(close_connection_pool=True)
                    else:  # a RedisCluster closes its nodes' connections
                        await client.aclose()
        self._sink = None

    @property
    def _conn(self) -> aioredis.Redis:
        assert self._redis is not None, "the broker is not started"
        return self._redis

    async def _call(self, op: str, operation: Awaitable[T]) -> T:
        """Run one Redis operation; an unreachable Redis becomes :class:`BrokerUnavailable`.

        ``op`` names it for the round-trip histogram (one of roomcast.metrics.BROKER_OPS).
        """
        start = time.perf_counter()
        try:
            return await operation
        except UNREACHABLE as error:
            self._mark_down(error)
            raise BrokerUnavailable("the broker (Redis) is unreachable; retry later") from None
        finally:
            timing = self.timings.get(op)
            if timing is None:
                timing = self.timings[op] = LocalHistogram(BROKER_BUCKETS)
            timing.observe(time.perf_counter() - start)

    def _mark_down(self, error: BaseException) -> None:
        self._up.clear()
        if self.available or self._down_since is None:
            logger.warning("broker %s unreachable: %s; retrying with backoff", self._where, error)
            self._down_since = time.monotonic()
        self.available = False

    @property
    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"

    # -- pub/sub --------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Read pub/sub forever; on a failure reconnect with backoff and resubscribe."""
        backoff = 0.1
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # swallowed by redis-py (see _heartbeat)
            try:
                if self._pubsub is None:
                    pubsub = self._new_pubsub()
                    self._pubsub = pubsub
                    await pubsub.subscribe(*self._wanted)
                if not self.available:
                    # First start, or after a failure (here or in any request): check, and if
                    # we were down, catch up on what happened meanwhile.
                    was_down = self._down_since is not None
                    await self._check()
                    self.available = True
                    self._up.set()
                    self._down_since = None
                    backoff = 0.1
                    if was_down:
                        self.reconnects += 1
                        logger.warning("broker %s reachable again", self._where)
                        await self._refresh_presence()
                        if self._sink is not None:
                            self._sink.on_reconnect()
                message = await self._pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not isinstance(error, (*UNREACHABLE, RedisError)):
                    logger.warning("broker listener: unexpected %r; reconnecting", error)
                logger.debug("broker listener: %r", error)
                self._mark_down(error)
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    with contextlib.suppress(RedisError, *UNREACHABLE):
                        await pubsub.aclose()
                await asyncio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 1000))
                backoff = min(backoff * 2, 5.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"].decode()
        if kind in ("subscribe", "ssubscribe"):
            waiter = self._confirm.pop(channel, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if kind not in ("message", "smessage"):
            return
        data: bytes = message["data"]
        kind_, _, name = channel[len(self.prefix) + 1 :].partition(":")
        name = name[1:-1]  # the braces of the hash tag
        sink = self._sink
        if sink is None:
            return
        if kind_ == "c":
            if data.startswith(b"P "):
                _, epoch, offset, size, rest = data.split(b" ", 4)
                cut = int(size)
                publication = Publication(int(offset), rest[cut:], rest[:cut])
                sink.on_publication(name, epoch.decode(), publication)
            elif data.startswith(b"E "):
                _, kind, client, info = data.split(b" ", 3)
                sink.on_event(name, kind.decode(), client.decode(), info)
        elif channel == self._control:
            command, _, argument = data.decode().partition(" ")
            sink.on_command(command, argument)

    async def _want(self, pubsub_channel: str) -> None:
        if pubsub_channel in self._wanted:
            # Another caller asked first; if Redis has not confirmed yet, wait for that too.
            pending = self._confirm.get(pubsub_channel)
            if pending is not None:
                try:
                    async with asyncio.timeout(5):
                        await asyncio.shield(pending)
                except TimeoutError:
                    raise BrokerUnavailable(
                        "the broker (Redis) did not confirm a subscription"
                    ) from None
            return
        # Wanted from now on, even if this attempt fails: the listener subscribes everything
        # wanted when it (re)connects. A caller that gives up calls _unwant.
        self._wanted.add(pubsub_channel)
        pubsub = self._pubsub
        if pubsub is None:
            raise BrokerUnavailable("the broker (Redis) is unreachable; retry later")
        waiter = asyncio.get_running_loop().create_future()
        self._confirm[pubsub_channel] = waiter
        try:
            await self._call("subscribe", pubsub.subscribe(pubsub_channel))
            # Wait for Redis to confirm, so that nothing published after this returns is missed.
            async with asyncio.timeout(5):
                await waiter
        except TimeoutError:
            raise BrokerUnavailable("the broker (Redis) did not confirm a subscription") from None
        finally:
            self._confirm.pop(pubsub_channel, None)

    async def _unwant(self, pubsub_channel: str) -> None:
        if pubsub_channel not in self._wanted:
            return
        self._wanted.discard(pubsub_channel)
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(*UNREACHABLE):
                await pubsub.unsubscribe(pubsub_channel)

    async def subscribe(self, channel: str) -> None:
        await self._want(self._key("c", channel))

    async def unsubscribe(self, channel: str) -> None:
        await self._unwant(self._key("c", channel))

    async def command(self, command: str, argument: str) -> int:
        """Send a command to every node (this one included); returns how many nodes got it."""
        received: int = await self._call(
            "command", self._publish_raw(self._control, f"{command} {argument}".encode())
        )
        return received

    # -- publications and history ---------------------------------------------------------

    def _node(self, channel: str) -> str:
        """The Redis process that holds ``channel`` (one Redis: "")."""
        return ""

    async def _whoami(self, node: str) -> str:
        run: bytes = await self._conn.eval(WHOAMI, 0)
        return run.decode()

    async def _script_load(self, node: str, source: str) -> str:
        sha: bytes | str = await self._conn.script_load(source)
        return sha.decode() if isinstance(sha, bytes) else sha

    async def _load_scripts(self, node: str) -> dict[str, str]:
        """Load the stream scripts into ``node``'s Redis process, built with its run id.

        A script knows the process it was built for (see redis_scripts.PROLOGUE), and a new
        process (a restart, a promoted replica) knows none of them: its first EVALSHA answers
        NOSCRIPT, and the scripts are loaded again, built with the new run id. The run id is
        read again after the load: if the process changed in between, the scripts are built
        again rather than run under another process's id.
        """
        pending = self._loading.get(node)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._loading[node] = future
        try:
            for _ in range(3):
                run = await self._whoami(node)
                shas = {
                    source: await self._script_load(node, for_process(source, run))
                    for source in (PUBLISH, POSITION, HISTORY)
                }
                if await self._whoami(node) == run:
                    self._shas[node] = shas
                    future.set_result(shas)
                    return shas
            raise BrokerUnavailable("the broker (Redis) restarted while loading its scripts")
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: the callers waiting on it get it too
            raise
        finally:
            del self._loading[node]

    async def _stream_script(
        self, source: str, channel: str, *args: Any, pipelined: bool = False
    ) -> Any:
        """Run a stream script on ``channel`` by its SHA (loading it first where needed).

        ``pipelined``: sent with the other commands waiting (publications: see redis_pipe).
        """
        keys = (self._key("m", channel), self._key("h", channel))
        argv = (secrets.token_hex(4), self.meta_ttl, *args)
        for _ in range(3):
            node = self._node(channel)
            shas = self._shas.get(node)
            if shas is None:
                shas = await self._load_scripts(node)
            command = ("EVALSHA", shas[source], len(keys), *keys, *argv)
            try:
                if pipelined:
                    assert self._pipe is not None
                    return await self._pipe.submit(*command)
                return await self._conn.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoScriptError:
                # A new Redis process (or a flushed script cache) behind that node.
                if self._shas.get(node) is shas:
                    del self._shas[node]
        raise BrokerUnavailable("the broker (Redis) keeps forgetting its scripts; retry later")

    async def publish(
        self, channel: str, data: bytes, info: bytes, *, history: bool = True
    ) -> Position:
        """Publish; commands waiting are sent together (see redis_pipe), in the order given."""
        if not history:
            # No offset and no stream: one PUBLISH, the same live message with offset 0.
            message = b"P  0 %d %s%s" % (len(info), info, data)
            await self._call("publish", self._send(channel, message))
            return Position("", 0)
        epoch, offset = await self._call(
            "publish",
            self._stream_script(
                PUBLISH,
                channel,
                data,
                info,
                self.history_size,
                self.history_ttl,
                self._key("c", channel),
                self.history_bytes,
                self._publish_command,
                pipelined=True,
            ),
        )
        self.publications += 1
        return Position(epoch.decode(), int(offset))

    def _send(self, channel: str, message: bytes) -> Awaitable[Any]:
        """Publish ``message`` on ``channel``'s pub/sub channel, after the commands waiting."""
        return self._publish_raw(self._key("c", channel), message)

    def _publish_raw(self, pubsub_channel: str, message: bytes) -> Awaitable[Any]:
        assert self._pipe is not None
        return self._pipe.submit("PUBLISH", pubsub_channel, message)

    async def position(self, channel: str) -> Position:
        epoch, offset = await self._call("position", self._stream_script(POSITION, channel))
        return Position(epoch.decode(), int(offset))

    async def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        before: int | None = None,
        limit: int,
    ) -> HistoryPage:
        if since is not None:
            mode, bound = "since", since
        elif before is not None:
            mode, bound = "before", before
        else:
            mode, bound = "latest", 0
        reply = await self._call(
            "history",
            self._stream_script(HISTORY, channel, self.history_ttl, mode, bound, limit),
        )
        epoch = reply[0].decode()
        offset, start = int(reply[1]), int(reply[2])
        rest: list[bytes] = reply[3:]
        publications = [
            Publication(int(rest[i].partition(b"-")[0]), rest[i + 1], rest[i + 2])
            for i in range(0, len(rest), 3)
        ]
        return HistoryPage(epoch, offset, start, publications)

    async def emit(self, channel: str, kind: str, client: str, info: bytes) -> None:
        message = b"E %s %s %s" % (kind.encode(), client.encode(), info)
        await self._call("emit", self._send(channel, message))
