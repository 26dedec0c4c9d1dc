"""What a broker is: where channels' offsets, history and presence live, and how a publication
reaches every node.

A node (one roomcast process) hands its broker a :class:`Sink` at start. The broker calls the
sink for every publication and presence event of a channel the node subscribed to, wherever it
was published. ``memory://`` does that synchronously inside ``publish``; a networked broker does
it when the message comes back from the network, so a node must cope with publications that
arrive while it is still awaiting the broker (see :mod:`roomcast.core.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Broker", "BrokerUnavailable", "HistoryPage", "Position", "Publication", "Sink"]


class BrokerUnavailable(Exception):
    """The broker cannot be reached now; requests get ``unavailable`` and may be retried."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel's history stream is: its epoch and its latest offset (0: none yet)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication as the broker stores and carries it: bytes it does not parse.

    ``offset`` is its place in the channel's stream (0 for a channel without history, such as a
    chat room); ``data`` and ``info`` are what the publisher gave (the core's encoding, opaque
    here). Each node's codecs turn it into their own wire frames.
    """

    offset: int
    data: bytes
    info: bytes


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Publications of a channel in increasing offset order, and the stream around them."""

    epoch: str
    #: The channel's latest offset.
    offset: int
    #: The lowest offset the history still holds (``offset + 1`` when it holds none).
    start: int
    #: The stored publications, oldest first.
    publications: list[Publication]


class Sink(Protocol):
    """The node side: what a broker delivers to."""

    def on_publication(self, channel: str, epoch: str, publication: Publication) -> None:
        """A publication of ``channel``, in offset order.

        ``epoch`` names the stream the offset belongs to: a new epoch means the stream began
        again (its history was lost or may have been rolled back), and the sink resets the
        subscribers of the old one. A gap in the offsets is the sink's to fill from the history.
        A publication without history has offset 0 and epoch ``""``.
        """

    def on_event(self, channel: str, kind: str, client: str, info: bytes) -> None:
        """A ``join`` or ``leave`` of ``client`` (described by ``info``) on ``channel``."""

    def on_command(self, command: str, argument: str) -> None:
        """A command to every node (``D``: disconnect the user named by ``argument``)."""

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

    async def publish(
        self, channel: str, data: bytes, info: bytes, *, history: bool = True
    ) -> Position:
        """Deliver a publication to every node; returns its position.

        With ``history`` it gets the channel's next offset and is stored; without (a chat
        room) it is only delivered, with offset 0, and the position is ``("", 0)``.
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

    async def emit(self, channel: str, kind: str, client: str, info: bytes) -> None:
        """Deliver a ``join``/``leave`` event about ``client`` to every node."""

    async def channels(self) -> dict[str, int]:
        """Channels with at least one subscriber, and how many each has."""

    async def command(self, command: str, argument: str) -> int:
        """Send a command to every node, this one included; returns how many got it."""
