"""Presence and the index of channels in use, in Redis: the part of
:class:`roomcast.brokers.redis.RedisBroker` that keeps who is where.

Each node writes its own clients' entries and refreshes their expiry every ``presence_ttl``/3
seconds, in the channels it still delivers; a dead node's entries expire (the presence script
drops them, however many). No command carries more than ``PRESENCE_BATCH`` entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError

from roomcast.brokers.base import BrokerUnavailable
from roomcast.brokers.redis_scripts import PRESENCE_BATCH

__all__ = ["RedisPresence"]

logger = logging.getLogger("roomcast.broker")

T = TypeVar("T")


class RedisPresence:
    """Presence entries and the channels index; mixed into the Redis brokers."""

    # Provided by RedisBroker.
    prefix: str
    presence_ttl: float
    meta_ttl: int
    available: bool
    _mine: dict[str, dict[str, bytes]]
    _wanted: set[str]
    _atomic: bool
    _presence_script: Any

    @property
    def _conn(self) -> Any:
        raise NotImplementedError

    def _key(self, kind: str, name: str) -> str:
        raise NotImplementedError

    async def _call(self, op: str, operation: Awaitable[T]) -> T:
        raise NotImplementedError

    def _expiry_ms(self) -> int:
        return int((time.time() + self.presence_ttl) * 1000)

    async def presence_add(self, channel: str, client: str, entry: dict[str, Any]) -> None:
        encoded = orjson.dumps({**entry, "at": time.time()})
        self._mine.setdefault(channel, {})[client] = encoded
        pipe = self._conn.pipeline(transaction=self._atomic)
        pipe.hset(self._key("p", channel), client, encoded)
        pipe.zadd(self._key("z", channel), {client: self._expiry_ms()})
        pipe.zadd(f"{self.prefix}:channels", {channel: self._expiry_ms()})
        await self._call("presence_add", pipe.execute())

    async def presence_remove(self, channel: str, client: str) -> None:
        mine = self._mine.get(channel)
        if mine is not None:
            mine.pop(client, None)
            if not mine:
                del self._mine[channel]
        pipe = self._conn.pipeline(transaction=self._atomic)
        pipe.hdel(self._key("p", channel), client)
        pipe.zrem(self._key("z", channel), client)
        await self._call("presence_remove", pipe.execute())

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        raw = await self._call(
            "presence",
            self._presence_script(
                keys=[self._key("p", channel), self._key("z", channel)],
                args=[int(time.time() * 1000), PRESENCE_BATCH],
            ),
        )
        entries = [orjson.loads(item) for item in raw if item is not None]
        entries.sort(key=lambda entry: entry.pop("at", 0))
        return entries

    async def channels(self) -> dict[str, int]:
        now = int(time.time() * 1000)
        raw: list[Any] = await self._call(
            "channels", self._conn.zrangebyscore(f"{self.prefix}:channels", f"({now}", "+inf")
        )
        names = [bytes(name).decode() for name in raw]
        if not names:
            return {}
        pipe = self._conn.pipeline(transaction=False)
        for name in names:
            pipe.zcount(self._key("z", name), f"({now}", "+inf")
        counts = await self._call("channels", pipe.execute())
        return {name: n for name, n in zip(names, counts, strict=True) if n}

    async def _heartbeat(self) -> None:
        """Keep this node's presence entries alive; a dead node's expire on their own."""
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            if not self.available:
                continue
            try:
                await self._refresh_presence()
                # Channels whose entries all expired leave the index of channels in use.
                await self._call(
                    "presence_refresh",
                    self._conn.zremrangebyscore(
                        f"{self.prefix}:channels", "-inf", int(time.time() * 1000)
                    ),
                )
            except (BrokerUnavailable, RedisError):
                pass  # the listener notices and reconnects; entries are rewritten then
            except Exception as error:
                logger.warning("broker presence refresh failed: %r", error)
            if task is not None and task.cancelling():
                # Cancelled during the refresh, but redis-py (8.1) may finish a pipeline
                # normally all the same, swallowing the CancelledError: stop anyway, or close()
                # would wait for this task forever.
                raise asyncio.CancelledError

    async def _refresh_presence(self) -> None:
        """Write this node's presence entries again with a new expiry (heartbeat, reconnection).

        Only those of the channels this node still delivers: the last local subscriber of a
        channel unsubscribes it, so an entry left for a channel no longer delivered belongs to
        no client here; it is removed rather than kept alive for the node's whole life.
        """
        if not self._mine:
            return
        pipe = self._conn.pipeline(transaction=False)
        for channel in [c for c in self._mine if self._key("c", c) not in self._wanted]:
            self._forget_presence(pipe, channel, list(self._mine.pop(channel)))
        expiry = self._expiry_ms()
        for channel, entries in self._mine.items():
            clients = list(entries)
            for first in range(0, len(clients), PRESENCE_BATCH):
                batch = clients[first : first + PRESENCE_BATCH]
                pipe.hset(self._key("p", channel), mapping={c: entries[c] for c in batch})
                pipe.zadd(self._key("z", channel), dict.fromkeys(batch, expiry))
            pipe.zadd(f"{self.prefix}:channels", {channel: expiry})
            # A channel with subscribers keeps its stream position even when nobody publishes.
            pipe.expire(self._key("m", channel), self.meta_ttl)
        await self._call("presence_refresh", pipe.execute())

    def _forget_presence(self, pipe: Any, channel: str, clients: list[str]) -> None:
        """Queue on ``pipe`` the removal of ``clients``' entries, a batch per command."""
        for first in range(0, len(clients), PRESENCE_BATCH):
            batch = clients[first : first + PRESENCE_BATCH]
            pipe.hdel(self._key("p", channel), *batch)
            pipe.zrem(self._key("z", channel), *batch)
