"""``memory://``: the embedded broker. Everything lives in this process; nothing to run.

History is bounded five ways: ``history_size`` publications and ``history_bytes`` bytes per
channel, ``history_ttl`` seconds per publication, ``history_channels`` channels (past it, the
stream of the channel published to least recently, among those nobody is subscribed to, is
dropped; its next publication starts a new epoch), and ``history_total_bytes`` bytes in all (past
it, the oldest publications of the least recently published channels are dropped: their streams
go on, and a recovery from before them says ``recovered: false``). Presence is bounded by the
connections' subscription limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from roomcast.brokers.base import HistoryPage, Position, Publication, Sink

__all__ = ["MemoryBroker"]

#: How many of the least recently used streams to look at for one not in use, per eviction.
_EVICTION_SCAN = 16


class _Stream:
    """One channel's history stream."""

    __slots__ = ("bytes", "epoch", "offset", "publications", "touched")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(4)
        self.offset = 0
        #: (time stored, publication), oldest first.
        self.publications: deque[tuple[float, Publication]] = deque()
        #: The size of the data and info in :attr:`publications`.
        self.bytes = 0
        self.touched = now


class MemoryBroker:
    """Channels of one process (the default broker)."""

    shared = False

    def __init__(
        self,
        *,
        history_size: int,
        history_ttl: float,
        history_channels: int,
        history_bytes: int = 1 << 20,
        history_total_bytes: int = 256 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.history_channels = history_channels
        self.history_bytes = history_bytes
        self.history_total_bytes = history_total_bytes
        #: The size of every stored frame, all channels together.
        self.stored_bytes = 0
        self._clock = clock
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._presence: dict[str, dict[str, dict[str, Any]]] = {}
        self._sink: Sink | None = None
        self.available = True
        self._sweeper: asyncio.Task[None] | None = None
        #: Publications made (for roomcast.metrics).
        self.publications = 0

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_forever(), name="roomcast-history-sweeper"
        )

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self._sink = None

    async def subscribe(self, channel: str) -> None:
        return None  # every publication of this process is delivered to this process

    async def unsubscribe(self, channel: str) -> None:
        return None

    # -- publications and history ---------------------------------------------------------

    def _stream(self, channel: str) -> _Stream:
        now = self._clock()
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(now)
            if len(self._streams) > self.history_channels:
                self._evict()
        else:
            self._streams.move_to_end(channel)
            self._expire(stream, now)
        stream.touched = now
        return stream

    def _evict(self) -> None:
        for _, (name, _stream) in zip(range(_EVICTION_SCAN), self._streams.items(), strict=False):
            if name not in self._presence:
                self.stored_bytes -= self._streams.pop(name).bytes
                return
        # Every stream looked at has subscribers: keep them all for now (the subscription
        # limits bound how many such streams there can be).

    def _expire(self, stream: _Stream, now: float) -> None:
        publications = stream.publications
        oldest = now - self.history_ttl
        while publications and publications[0][0] < oldest:
            self._drop_oldest(stream)

    def _drop_oldest(self, stream: _Stream) -> None:
        publication = stream.publications.popleft()[1]
        size = len(publication.data) + len(publication.info)
        stream.bytes -= size
        self.stored_bytes -= size

    def _trim_total(self) -> None:
        """Past ``history_total_bytes``: drop publications, least recently published first."""
        for stream in self._streams.values():
            while stream.publications and self.stored_bytes > self.history_total_bytes:
                self._drop_oldest(stream)
            if self.stored_bytes <= self.history_total_bytes:
                return

    async def publish(
        self, channel: str, data: bytes, info: bytes, *, history: bool = True
    ) -> Position:
        if not history:
            if self._sink is not None:
                self._sink.on_publication(channel, "", Publication(0, data, info))
            return Position("", 0)
        stream = self._stream(channel)
        stream.offset += 1
        offset = stream.offset
        self.publications += 1
        publication = Publication(offset, data, info)
        if self.history_size:
            publications = stream.publications
            publications.append((stream.touched, publication))
            size = len(data) + len(info)
            stream.bytes += size
            self.stored_bytes += size
            while publications and (
                len(publications) > self.history_size or stream.bytes > self.history_bytes
            ):
                self._drop_oldest(stream)
            if self.stored_bytes > self.history_total_bytes:
                self._trim_total()
        if self._sink is not None:
            self._sink.on_publication(channel, stream.epoch, publication)
        return Position(stream.epoch, offset)

    async def position(self, channel: str) -> Position:
        stream = self._stream(channel)
        return Position(stream.epoch, stream.offset)

    async def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        before: int | None = None,
        limit: int,
    ) -> HistoryPage:
        stream = self._stream(channel)
        stored = stream.publications
        start = stored[0][1].offset if stored else stream.offset + 1
        if since is not None:
            # Offsets in the deque are consecutive: index arithmetic finds the first one.
            first = max(0, since + 1 - start)
            chosen = [stored[i] for i in range(first, min(len(stored), first + limit))]
        else:
            end = len(stored) if before is None else max(0, min(len(stored), before - start))
            chosen = [stored[i] for i in range(max(0, end - limit), end)]
        return HistoryPage(
            stream.epoch,
            stream.offset,
            start,
            [publication for _, publication in chosen],
        )

    # -- presence -------------------------------------------------------------------------

    async def presence_add(self, channel: str, client: str, entry: dict[str, Any]) -> None:
        self._presence.setdefault(channel, {})[client] = entry

    async def presence_remove(self, channel: str, client: str) -> None:
        entries = self._presence.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._presence[channel]

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        return list(self._presence.get(channel, {}).values())

    async def emit(self, channel: str, kind: str, client: str, info: bytes) -> None:
        if self._sink is not None:
            self._sink.on_event(channel, kind, client, info)

    async def channels(self) -> dict[str, int]:
        return {channel: len(entries) for channel, entries in self._presence.items()}

    # -- commands: this process is the whole cluster ----------------------------------------

    async def command(self, command: str, argument: str) -> int:
        if self._sink is not None:
            self._sink.on_command(command, argument)
        return 1

    # -- retention ------------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop expired publications, and streams idle past the TTL that nobody uses."""
        now = self._clock()
        idle_since = now - self.history_ttl
        for name in list(self._streams):
            stream = self._streams[name]
            self._expire(stream, now)
            if (
                not stream.publications
                and stream.touched < idle_since
                and name not in self._presence
            ):
                del self._streams[name]  # empty: no bytes to count

    async def _sweep_forever(self) -> None:
        interval = max(1.0, min(self.history_ttl, 60.0))
        while True:
            await asyncio.sleep(interval)
            self.sweep()
