"""``redis+cluster://`` / ``rediss+cluster://``: channels spread over a Redis Cluster (>= 7).

``redis+cluster://[user:password@]HOST:PORT[,HOST:PORT...][?prefix=...]``: any of the cluster's
nodes as seeds; the others, and which master serves which slot, are discovered.

Everything :mod:`roomcast.brokers.redis` says holds, with these differences:

- A channel's keys carry its name as their hash tag (``P:m:{name}``, ``P:h:{name}``, ...), so
  its offset, history and presence live in one slot, and its scripts run there atomically.
  Channels spread over the masters by their names.
- Live messages go by sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, in the channel's slot):
  each message crosses only the shard that holds the channel, so the cluster's pub/sub scales
  with its masters (classic ``PUBLISH`` would copy every message to every node). A node holds
  one connection per master it listens to (:class:`ShardedPubSub`).
- After a failover (a master lost, its replica promoted), the channels of that shard are served
  by the new master: the listener resubscribes them there and every channel catches up from
  history, as after any reconnection. The scripts know the Redis process they run in, so a
  promoted replica never hands out again an offset the lost master gave (see
  :data:`roomcast.brokers.redis_scripts.PROLOGUE`).
- Presence writes are not one transaction (the index of channels in use is in another slot).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from roomcast.brokers.redis import UNREACHABLE, RedisBroker
from roomcast.brokers.redis_pipe import AutoPipeline
from roomcast.brokers.redis_scripts import WHOAMI

__all__ = ["RedisClusterBroker", "ShardedPubSub", "parse_cluster_url"]

T = TypeVar("T")

#: Publishes a message by sharded pub/sub from a script: KEYS[1] routes it (its slot is the pub/sub
#: channel's); ARGV: command, channel, message.
SEND = "return redis.call(ARGV[1], ARGV[2], ARGV[3])"

#: Messages read from the shards and not yet dispatched, at most (the readers wait beyond it).
BACKLOG = 4096

#: Connections per cluster node, and commands under way at once (below it: redis-py's cluster
#: client fails a command past its connections, then rebuilds its map of the cluster, closing
#: connections that other commands are using).
CONNECTIONS = 64
CONCURRENCY = 32
#: The operations sent through the broker's AutoPipeline.
PIPELINED = frozenset({"publish", "emit", "command"})


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, str]]:
    """Seeds, connection options (credentials, TLS) and query of a ``redis+cluster://`` URL."""
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    netloc, _, query = netloc.partition("?")
    if not query:
        query = tail.partition("?")[2]
    options: dict[str, Any] = {}
    if "@" in netloc:
        credentials, _, netloc = netloc.rpartition("@")
        user, _, password = credentials.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if scheme.startswith("rediss"):
        options["ssl"] = True
    seeds: list[tuple[str, int]] = []
    for item in filter(None, netloc.split(",")):
        host, _, port = item.rpartition(":")
        if not host:
            host, port = item, "6379"
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ValueError(f"{scheme}:// needs at least one HOST:PORT")
    return seeds, options, dict(parse_qsl(query))


class ShardedPubSub:
    """Sharded pub/sub over every master of the cluster, read as one stream of messages.

    Each master that serves a wanted channel gets one connection (never retried in place, as
    for one Redis). A reader per connection feeds one bounded queue that the broker's listener
    drains: messages that arrived together are dispatched in one turn of the event loop. A
    connection that fails, or a channel the server unsubscribes by itself (its slot moved), ends
    the whole stream with an error: the listener then starts again from the cluster's current
    map and every channel catches up from history.
    """

    def __init__(self, broker: RedisClusterBroker) -> None:
        self.broker = broker
        self._shards: dict[str, Any] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue(BACKLOG)
        self._fresh = False

    async def _shard(self, node: ClusterNode) -> Any:
        pubsub = self._shards.get(node.name)
        if pubsub is None:
            client = aioredis.Redis(
                host=node.host,
                port=int(node.port),
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=2,
                health_check_interval=10,
                client_name=f"roomcast-{self.broker.node_id}-pubsub",
                **self.broker.options,
            )
            pubsub = client.pubsub()
            self._shards[node.name] = pubsub
            await pubsub.connect()  # type: ignore[no-untyped-call]
            self._readers.append(
                asyncio.get_running_loop().create_task(
                    self._read(pubsub), name=f"roomcast-redis-shard-{node.name}"
                )
            )
        return pubsub

    async def subscribe(self, *channels: str) -> None:
        cluster = self.broker.cluster
        if not self._fresh:
            # A new stream starts from the cluster's current map (after a failover, the
            # promoted replica's).
            await cluster.nodes_manager.initialize()
            self._fresh = True
        by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
        for channel in channels:
            node = self.broker.master_of(channel)
            by_node.setdefault(node.name, (node, []))[1].append(channel)
        for node, names in by_node.values():
            pubsub = await self._shard(node)
            # One command per slot: a cluster refuses SSUBSCRIBE across slots.
            by_slot: dict[int, list[str]] = {}
            for name in names:
                by_slot.setdefault(cluster.keyslot(name), []).append(name)
            for group in by_slot.values():
                await pubsub.ssubscribe(*group)

    async def unsubscribe(self, channel: str) -> None:
        node = self.broker.master_of(channel)
        pubsub = self._shards.get(node.name)
        if pubsub is not None:
            await pubsub.sunsubscribe(channel)

    async def _read(self, pubsub: Any) -> None:
        wanted = self.broker._wanted
        try:
            while True:
                # A timeout, so that redis-py's health check (a PING every 10 s) runs on a
                # quiet connection: a shard that stopped answering is noticed.
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "sunsubscribe" and message["channel"].decode() in wanted:
                    # Unsubscribed by the server: the slot moved (a failover, a resharding).
                    raise RedisConnectionError(f"{message['channel']!r} moved to another shard")
                await self._queue.put(message)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # ends the stream: the listener starts again
            await self._queue.put(error)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109 (redis-py's)
        queue = self._queue
        if queue.empty():
            try:
                async with asyncio.timeout(timeout):
                    item = await queue.get()
            except TimeoutError:
                return None
        else:
            item = queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for pubsub in self._shards.values():
            with contextlib.suppress(RedisError, *UNREACHABLE):
                await pubsub.aclose()
                await pubsub.connection_pool.disconnect()
        self._shards.clear()


class RedisClusterBroker(RedisBroker):
    """Channels in a Redis Cluster, spread over its masters by name."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        seeds, options, _ = parse_cluster_url(url)
        super().__init__(url, **kwargs)
        self.seeds = seeds
        self.options = options
        self._publish_command = "SPUBLISH"
        self._atomic = False
        self._cluster: RedisCluster | None = None
        self._concurrency = asyncio.Semaphore(CONCURRENCY)

    @property
    def cluster(self) -> RedisCluster:
        assert self._cluster is not None, "the broker is not started"
        return self._cluster

    @property
    def _where(self) -> str:
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.seeds)

    @property
    def _control(self) -> str:
        return f"{self.prefix}:control:{{control}}"

    def _open(self) -> Any:
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self.seeds],
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
            max_connections=CONNECTIONS,
            **self.options,
        )
        return self._cluster

    async def _call(self, op: str, operation: Awaitable[T]) -> T:
        if op in PIPELINED:  # one connection per node, whatever their number
            return await super()._call(op, operation)
        # A burst of requests (a thousand clients subscribing at once) waits its turn here.
        async with self._concurrency:
            return await super()._call(op, operation)

    def _new_pipe(self) -> AutoPipeline:
        # redis-py's cluster pipeline routes each command to its slot's master (and follows
        # redirections): one batch under way at a time.
        return AutoPipeline(self.cluster)

    def _new_pubsub(self) -> Any:
        return ShardedPubSub(self)

    async def _check(self) -> None:
        cluster = self.cluster
        if self._down_since is not None:
            await cluster.nodes_manager.initialize()
        # Every master answers: each holds a part of the channels.
        await cluster.ping(target_nodes=RedisCluster.PRIMARIES)

    def master_of(self, key: str) -> ClusterNode:
        """The master that serves ``key``'s slot (a channel's keys and pub/sub channel share
        it)."""
        node = self.cluster.get_node_from_key(key)
        if node is None:
            raise RedisConnectionError(f"no master serves the slot of {key!r} now")
        return node

    def _node(self, channel: str) -> str:
        return str(self.master_of(self._key("m", channel)).name)

    def _target(self, node: str) -> ClusterNode:
        target = self.cluster.get_node(node_name=node)
        if target is None:
            raise RedisConnectionError(f"{node} is no longer in the cluster")
        return target

    async def _whoami(self, node: str) -> str:
        run: bytes = await self.cluster.execute_command(
            "EVAL", WHOAMI, 0, target_nodes=self._target(node)
        )
        return run.decode()

    async def _script_load(self, node: str, source: str) -> str:
        sha: bytes | str = await self.cluster.execute_command(
            "SCRIPT LOAD", source, target_nodes=self._target(node)
        )
        return sha.decode() if isinstance(sha, bytes) else sha

    def _publish_raw(self, pubsub_channel: str, message: bytes) -> Any:
        assert self._pipe is not None
        return self._pipe.submit(
            "EVAL", SEND, 1, pubsub_channel, "SPUBLISH", pubsub_channel, message
        )
