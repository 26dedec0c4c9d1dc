"""What a broker is: where channels' offsets, history and presence live, and how a publication
reaches every node.

A node (one roomcast process) hands its broker a :class:`Sink` at start. The broker calls the
sink for every publication and presence event of a channel the node subscribed to, wherever it
was published. ``memory://`` does that synchronously inside ``publish``; a networked broker does
it when the message comes back from the network, so a node must cope with publications that
arrive while it is still awaiting the broker (see :mod:`roomcast.channels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Broker", "BrokerUnavailable", "HistoryPage", "Position", "Sink"]


class BrokerUnavailable(Exception):
    """The broker cannot be reached now; requests get ``unavailable`` and may be retried."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel's history stream is: its epoch and its latest offset (0: none yet)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Publications of a channel in increasing offset order, and the stream around them."""

    epoch: str
    #: The channel's latest offset.
    offset: int
    #: The lowest offset the history still holds (``offset + 1`` when it holds none).
    start: int
    #: Encoded ``publication`` frames with their offsets, oldest first.
    publications: list[tuple[int, bytes]]


class Sink(Protocol):
    """The node side: what a broker delivers to."""

    def on_publication(self, channel: str, epoch: str, offset: int, frame: bytes) -> None:
        """A publication of ``channel`` (its encoded ``publication`` frame), in offset order.

        ``epoch`` names the stream the offset belongs to: a new epoch means the stream began
        again (its history was lost or may have been rolled back), and the sink resets the
        subscribers of the old one. A gap in the offsets is the sink's to fill from the history.
        """

    def on_event(self, channel: str, frame: bytes, client: str) -> None:
        """A ``join``/``leave`` event of ``channel`` about ``client``."""

    def on_reconnect(self) -> None:
        """The broker was unreachable and is back: publications may have been missed.

        Called before any publication that arrives through the new connection, so that the
        sink can hold live publications back until it has caught up from the history.
        """


class Broker(Protocol):
    """The interface every broker implements (``memory://``, ``redis://``)."""

    #: True when other processes see this broker's channels (a shared broker).
    shared: bool
    #: False while the broker cannot be reached (the node then reports not ready).
    available: bool

    async def start(self, sink: Sink) -> None:
        """Connect and start delivering to ``sink``."""

    async def close(self) -> None:
        """Stop delivering and release connections and tasks."""

    async def subscribe(self, channel: str) -> None:
        """Deliver ``channel``'s publications to this node from now on (first local subscriber)."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel`` to this node (its last local subscriber left)."""

    async def publish(self, channel: str, data: bytes, info: bytes) -> Position:
        """Give the next offset to a publication, store it in history and deliver it everywhere.

        ``data`` and ``info`` are encoded JSON; returns the publication's position.
        """

    async def position(self, channel: str) -> Position:
        """The channel's epoch and latest offset."""

    async def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        before: int | None = None,
        limit: int,
    ) -> HistoryPage:
        """Stored publications: after ``since`` (oldest first), or the newest ``limit`` of them
        (before ``before`` if given)."""

    async def presence_add(self, channel: str, client: str, entry: dict[str, Any]) -> None:
        """Record ``client`` as subscribed to ``channel``."""

    async def presence_remove(self, channel: str, client: str) -> None:
        """Forget ``client``'s subscription to ``channel``."""

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """The clients subscribed to ``channel``, in the order they subscribed."""

    async def emit(self, channel: str, frame: bytes, client: str) -> None:
        """Deliver a ``join``/``leave`` event about ``client`` to every node."""

    async def channels(self) -> dict[str, int]:
        """Channels with at least one subscriber, and how many each has."""

    # -- the guide's chat rooms and node commands -------------------------------------------

    def on_room(self, deliver: Callable[[str, str], None]) -> None:
        """Deliver chat room messages, from every node, to ``deliver(room, text)``."""

    def on_control(self, deliver: Callable[[str, str], None]) -> None:
        """Deliver node commands, from every node, to ``deliver(command, argument)``."""

    async def join_room(self, room: str) -> None:
        """Deliver chat room ``room`` to this node (its first local member joined)."""

    async def leave_room(self, room: str) -> None:
        """Stop delivering ``room`` to this node (its last local member left)."""

    async def room_publish(self, room: str, text: str) -> None:
        """Send ``text`` to every member of chat room ``room`` on every node."""

    async def command(self, command: str, argument: str) -> int:
        """Send a command to every node, this one included; returns how many got it."""
