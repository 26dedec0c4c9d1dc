"""Catching a channel up from the history when the node missed publications.

A node misses publications when its connection to the broker drops them (a reconnection) or
when one arrives past the next offset (a gap). The hub then holds the channel's live
publications back (:class:`Held`, bounded) and :class:`Recovery` reads the history after the last
offset delivered, delivers it, then the held publications while they follow on. A gap the
history no longer covers, another stream, or a catch-up that cannot finish restarts the
subscribers concerned (close 1012): they see ``recovered: false`` when they come back, never a
silent gap.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, Protocol

from roomcast.brokers.base import BrokerUnavailable, HistoryPage, Publication

if TYPE_CHECKING:
    from roomcast.core.hub import Channel, Hub

__all__ = ["CATCH_UP_ROUNDS", "HELD_MAX", "HELD_MAX_BYTES", "Held", "HistoryReader", "Recovery"]

#: Bounds of the live publications a channel holds back while it catches up (per channel).
HELD_MAX: Final = 10_000
HELD_MAX_BYTES: Final = 8 << 20
#: Rounds of a catch-up (each one reads the history) before the channel is restarted instead.
CATCH_UP_ROUNDS: Final = 5


class HistoryReader(Protocol):
    """The broker's history read (:meth:`roomcast.brokers.Broker.history`)."""

    async def __call__(
        self, channel: str, *, since: int | None = None, before: int | None = None, limit: int
    ) -> HistoryPage: ...


class Held:
    """Live publications held back during a catch-up, bounded in count and bytes."""

    __slots__ = ("bytes", "items", "overflow")

    def __init__(self) -> None:
        self.items: list[tuple[str, Publication]] = []
        self.bytes = 0
        #: Set when more arrived than the bound: the catch-up then reads the history again.
        self.overflow = False

    def add(self, epoch: str, publication: Publication) -> None:
        """Hold one more, unless that passes a bound (then only note the overflow)."""
        size = len(publication.data) + len(publication.info)
        if len(self.items) >= HELD_MAX or self.bytes + size > HELD_MAX_BYTES:
            self.overflow = True
            return
        self.items.append((epoch, publication))
        self.bytes += size


class Recovery:
    """The catch-ups of one hub's channels."""

    def __init__(
        self,
        hub: Hub,
        history: HistoryReader,
        history_size: int,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._hub = hub
        self._history = history
        self._limit = max(1, history_size)
        self._tasks = tasks

    def on_reconnect(self) -> None:
        """The broker is back: catch every channel up on what this node could not hear.

        Called before any publication of the new connection arrives, so each channel holds the
        live ones back until its catch-up has delivered what the history holds.
        """
        for channel in list(self._hub.channels.values()):
            if channel.history:
                self.catch_up(channel)

    def catch_up(self, channel: Channel) -> Held:
        """Hold ``channel``'s live publications back and fill its gap from the history.

        One catch-up at a time per channel: asked again while one runs (the broker reconnected
        meanwhile), that one reads the history once more.
        """
        if channel.held is None:
            channel.held = Held()
        if channel.filling:
            channel.again = True
            return channel.held
        channel.filling = True
        channel.again = False
        task = asyncio.get_running_loop().create_task(
            self._fill(channel), name=f"roomcast-catch-up-{channel.name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return channel.held

    async def _fill(self, channel: Channel) -> None:
        """Deliver from the history what the node missed, then what it held back, in order.

        If the broker is unreachable, the channel stays held (bounded) until it is back
        (:meth:`on_reconnect`).
        """
        hub = self._hub
        try:
            for _ in range(CATCH_UP_ROUNDS):
                channel.again = False
                since = self._since(channel)
                if since is None:
                    self._release(channel, everything=True)
                    return  # nobody waits for anything older: the held ones are the stream
                page = await self._history(channel.name, since=since, limit=self._limit)
                if hub.channels.get(channel.name) is not channel:
                    return  # everyone left meanwhile
                if channel.again:
                    continue  # the broker reconnected while the history was read
                if page.epoch != channel.epoch:
                    hub.reset(channel, page.epoch)
                    continue
                lost = page.start - 1
                if since < lost:
                    self._drop_behind(channel, lost)
                    channel.delivered = lost
                for publication in page.publications:
                    delivered = channel.delivered
                    if delivered is None or publication.offset > delivered:
                        hub.fan_out(channel, publication)
                if self._release(channel):
                    return
            self._restart_all(channel, "the node could not catch up with the channel")
            self._release(channel, everything=True)
        except BrokerUnavailable:
            return  # still held; the broker's reconnection starts the next catch-up
        finally:
            channel.filling = False

    @staticmethod
    def _since(channel: Channel) -> int | None:
        """The offset after which some subscriber still needs publications."""
        marks = [] if channel.delivered is None else [channel.delivered]
        marks += [s.offset for s in channel.catching.values() if s.pending is None]
        return min(marks) if marks else None

    def _drop_behind(self, channel: Channel, lost: int) -> None:
        """Restart the subscribers that miss publications the history no longer holds."""
        live = {session for outboxes in channel.live.values() for session in outboxes}
        for subscriber in list(channel.subscribers.values()):
            session = subscriber.session
            mark = channel.delivered if session.id in live else subscriber.offset
            if subscriber.pending is None and mark is not None and mark < lost:
                self._hub.restart(session, "missed publications the history lost")

    def _release(self, channel: Channel, *, everything: bool = False) -> bool:
        """Deliver the held publications while they follow on (``everything``: all of them).

        Returns ``True`` once none is left (the channel is live again); ``False`` at a gap,
        another stream, or an overflow, keeping the rest held for the next round.
        """
        held = channel.held
        if held is None:
            return True
        if held.overflow and not everything:
            # More arrived than could be held: the history has them; hold anew and read it.
            channel.held = Held()
            return False
        hub = self._hub
        items = held.items
        for i, (epoch, publication) in enumerate(items):
            delivered = channel.delivered
            offset = publication.offset
            if everything:
                if epoch != channel.epoch:
                    hub.reset(channel, epoch)
                elif delivered is not None and offset <= delivered:
                    continue
                hub.fan_out(channel, publication)
                continue
            if epoch != channel.epoch or (delivered is not None and offset > delivered + 1):
                channel.held = rest = Held()
                for item in items[i:]:
                    rest.add(*item)
                return False
            if delivered is None or offset > delivered:
                hub.fan_out(channel, publication)
        channel.held = None
        return True

    def _restart_all(self, channel: Channel, reason: str) -> None:
        for subscriber in list(channel.subscribers.values()):
            if subscriber.pending is None:
                self._hub.restart(subscriber.session, reason)
        channel.delivered = None
