"""The hub: every channel with a subscriber on this node, and the one fan-out loop.

The broker delivers each publication to the node once (:class:`~roomcast.brokers.Sink`); the hub
encodes it once per codec in use on the channel and writes the same bytes to every live
subscriber through their bounded outboxes (:func:`roomcast.core.outbox.broadcast`): a subscriber
that reads too slowly is cut and never slows the others. The guide's chat rooms are channels
without history (offset 0); ``/ws`` channels have offsets, and for them the hub keeps delivery
gapless:

A new subscription starts *pending*. Publications that arrive while the node is still asking
the broker for the channel's position or history are kept in the subscription's pending list.
When the answer comes, the reply goes out, then the replayed publications, then the pending ones
newer than the last replayed. The subscription then *catches up*: it is sent each publication
newer than the last one it got, until the first such one, after which (publications reach a node
in offset order) nothing older can arrive any more and it joins the channel's *live* outboxes.
A publication past the next offset means the node missed some (its connection to the broker
dropped them): :mod:`roomcast.core.recovery` holds the live ones back and fills the gap from the
history first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from roomcast.brokers.base import Publication
from roomcast.codecs import Codec
from roomcast.core.outbox import Outbox, broadcast
from roomcast.core.recovery import Held, HistoryReader, Recovery
from roomcast.counters import FANOUT_BUCKETS, LocalHistogram

if TYPE_CHECKING:
    from roomcast.core.session import Session

__all__ = ["Channel", "Hub", "Subscriber"]


class Subscriber:
    """A session's subscription to one channel."""

    __slots__ = ("channel", "epoch", "join_leave", "offset", "pending", "session")

    def __init__(
        self, session: Session, channel: str, join_leave: bool = False, history: bool = True
    ) -> None:
        self.session = session
        self.channel = channel
        self.join_leave = join_leave
        #: The offset of the last publication sent to the session (or its starting point).
        self.offset = 0
        #: The epoch of the stream the session follows (from its subscribe reply).
        self.epoch = ""
        #: Publications that arrived before the subscribe reply was sent; ``None`` once live
        #: (from the start on a channel without history: nothing is replayed there).
        self.pending: list[Publication] | None = [] if history else None


class Channel:
    """A channel with subscribers on this node."""

    __slots__ = (
        "again",
        "catching",
        "delivered",
        "endpoint",
        "epoch",
        "fanout_time",
        "filling",
        "held",
        "history",
        "live",
        "name",
        "sent",
        "sent_bytes",
        "subscribers",
    )

    def __init__(self, name: str, history: bool, endpoint: str, fanout: LocalHistogram) -> None:
        self.name = name
        #: False for the guide's chat rooms: no offsets, no recovery, no presence.
        self.history = history
        #: Every local subscriber, in the order they subscribed.
        self.subscribers: dict[str, Subscriber] = {}
        #: The outboxes of the live subscribers, by codec (the fan-out's hot loop).
        self.live: dict[Codec, dict[str, Outbox]] = {}
        #: Subscribers pending or catching up (checked one by one).
        self.catching: dict[str, Subscriber] = {}
        #: The highest offset this node has delivered on the channel (``None``: not known yet,
        #: for a new channel or a new stream). Publications reach the node in offset order, so
        #: the next one must be ``delivered + 1``: anything else is a gap to fill.
        self.delivered: int | None = None
        #: The epoch of the stream the node delivers.
        self.epoch: str | None = None
        #: While the node catches up from the history: the live publications that arrive
        #: meanwhile, held back in order (``None`` otherwise); see roomcast.core.recovery.
        self.held: Held | None = None
        #: Whether a catch-up task runs, and whether it must read the history again.
        self.filling = False
        self.again = False
        #: The metrics' endpoint label (its first subscriber's route), what its fan-outs
        #: delivered, and their durations (by kind: chat or channel).
        self.endpoint = endpoint
        self.sent = 0
        self.sent_bytes = 0
        self.fanout_time = fanout

    def go_live(self, subscriber: Subscriber) -> None:
        """``subscriber`` gets every publication from now on through the fan-out loop."""
        session = subscriber.session
        self.catching.pop(session.id, None)
        if session.active:
            self.live.setdefault(session.codec, {})[session.id] = session.outbox

    def forget(self, session: str) -> None:
        """Stop delivering to ``session`` (the subscriber itself may stay a moment longer)."""
        for outboxes in self.live.values():
            outboxes.pop(session, None)
        self.catching.pop(session, None)


class Hub:
    """The channels of one node, where the broker's publications are delivered.

    ``history`` reads a channel's history (the broker's), for the catch-ups of
    :class:`~roomcast.core.recovery.Recovery`; ``restart(session, reason)`` closes a session
    with 1012 so that it recovers. Every method is synchronous.
    """

    def __init__(
        self,
        history: HistoryReader,
        history_size: int,
        restart: Callable[[Session, str], None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self.channels: dict[str, Channel] = {}
        self._restart = restart
        self.recovery = Recovery(self, history, history_size, tasks)
        #: For roomcast.metrics: fan-out durations by kind, and deliveries of channels gone
        #: (by endpoint); the live channels count their own.
        self.fanout_time = {
            "chat": LocalHistogram(FANOUT_BUCKETS),
            "channel": LocalHistogram(FANOUT_BUCKETS),
        }
        self.sent: dict[str, int] = {}
        self.sent_bytes: dict[str, int] = {}
        self.deliveries = {"chat": 0, "channel": 0}

    # -- membership -----------------------------------------------------------------------

    def add(self, session: Session, name: str, *, history: bool, join_leave: bool) -> Subscriber:
        """Register ``session`` on channel ``name`` (created on first use), not live yet."""
        channel = self.channels.get(name)
        if channel is None:
            kind = "channel" if history else "chat"
            channel = self.channels[name] = Channel(
                name, history, session.conn.endpoint, self.fanout_time[kind]
            )
        subscriber = Subscriber(session, name, join_leave, history)
        session.subscriptions[name] = subscriber
        channel.subscribers[session.id] = subscriber
        if history:
            channel.catching[session.id] = subscriber
        return subscriber

    def remove(self, session: Session, name: str) -> bool:
        """Drop ``session``'s subscriber of ``name``; ``True`` if the channel has none left."""
        channel = self.channels.get(name)
        if channel is None:
            return False
        channel.forget(session.id)
        channel.subscribers.pop(session.id, None)
        if channel.subscribers:
            return False
        del self.channels[name]
        self._keep_counts(channel)
        return True

    def forget(self, session: Session) -> None:
        """Stop every delivery to ``session`` now (it is being closed; it leaves later)."""
        for name in session.subscriptions:
            channel = self.channels.get(name)
            if channel is not None:
                channel.forget(session.id)

    def learn_stream(self, channel: Channel, epoch: str, top: int, mine: Subscriber) -> None:
        """A subscribe reply read the channel's stream (``epoch``, last offset ``top``).

        The broker delivers the channel to this node since before the read, so every
        publication after ``top`` reaches the node: a node that knew nothing of the channel
        knows where it stands now. A new epoch resets the subscribers of the old one.
        """
        mine.epoch = epoch
        if channel.epoch != epoch:
            if channel.epoch is not None:
                self.reset(channel, epoch)
            channel.epoch = epoch
        if channel.delivered is None:
            channel.delivered = top

    def start_live(self, channel: Channel, subscriber: Subscriber, replay: list[bytes]) -> None:
        """Send a subscribe reply's replay, then what arrived meanwhile; then live if it can.

        Called right after the reply went out.
        """
        session = subscriber.session
        for frame in replay:
            session.send(frame, force=True)
        pending = subscriber.pending or ()
        subscriber.pending = None
        codec = session.codec
        for publication in pending:
            if publication.offset > subscriber.offset:
                subscriber.offset = publication.offset
                session.send(codec.publication(channel.name, publication))
        delivered = channel.delivered
        if delivered is not None and delivered >= subscriber.offset and session.active:
            # Nothing it already has can still arrive: straight to the live outboxes.
            channel.go_live(subscriber)

    # -- deliveries from the broker ---------------------------------------------------------

    def on_publication(self, name: str, epoch: str, publication: Publication) -> None:
        """A publication from the broker: fan it out, unless it is not the next one.

        Publications reach the node in offset order. One from another stream resets the
        subscribers of the old one; one past the next offset means the node missed some: it
        holds the live ones back and fills the gap from the history first. Nothing is skipped
        without the subscribers being told.
        """
        channel = self.channels.get(name)
        if channel is None:
            return
        if not channel.history:
            self.fan_out(channel, publication)
            return
        held = channel.held
        if held is not None:
            held.add(epoch, publication)
            return
        if epoch != channel.epoch:
            if channel.epoch is not None:
                self.reset(channel, epoch)
            channel.epoch = epoch
        delivered = channel.delivered
        if delivered is not None:
            offset = publication.offset
            if offset <= delivered:
                return  # delivered already (a catch-up overlapping the live stream)
            if offset != delivered + 1:
                self.recovery.catch_up(channel).add(epoch, publication)
                return
        self.fan_out(channel, publication)

    def fan_out(self, channel: Channel, publication: Publication) -> None:
        """Write the next publication, encoded once per codec, to every live subscriber."""
        if channel.history:
            channel.delivered = publication.offset
        start = perf_counter()
        name = channel.name
        refused: list[Outbox] | None = None
        for codec, outboxes in channel.live.items():
            if not outboxes:
                continue
            payload = codec.publication(name, publication)
            slow = broadcast(outboxes.values(), payload, codec.text)
            reached = len(outboxes) - len(slow)
            channel.sent += reached
            channel.sent_bytes += reached * len(payload)
            if slow:
                refused = slow if refused is None else refused + slow
        channel.fanout_time.observe(perf_counter() - start)
        if channel.catching:
            self._deliver_catching(channel, publication)
        if refused is not None:
            subscribers = channel.subscribers
            for outbox in refused:
                subscriber = subscribers.get(str(outbox.conn.id))
                if subscriber is not None:
                    subscriber.session.node.cut(subscriber.session)

    def _deliver_catching(self, channel: Channel, publication: Publication) -> None:
        offset = publication.offset
        for subscriber in list(channel.catching.values()):
            pending = subscriber.pending
            if pending is not None:
                pending.append(publication)
                continue
            if offset <= subscriber.offset:
                continue  # it had this one from its replay
            subscriber.offset = offset
            session = subscriber.session
            session.send(session.codec.publication(channel.name, publication))
            # Newer than its starting point: everything older has arrived, so it is live now.
            if session.id in channel.catching:
                channel.go_live(subscriber)

    def on_event(self, name: str, kind: str, client: str, info: bytes) -> None:
        """Push a join/leave event to the channel's subscribers that asked for them."""
        channel = self.channels.get(name)
        if channel is None:
            return
        frames: dict[Codec, bytes] = {}
        for subscriber in list(channel.subscribers.values()):
            session = subscriber.session
            if subscriber.join_leave and subscriber.pending is None and session.id != client:
                codec = session.codec
                frame = frames.get(codec)
                if frame is None:
                    frame = frames[codec] = codec.event(name, kind, info)
                session.send(frame)

    def restart(self, session: Session, reason: str) -> None:
        """Close ``session`` with 1012 (it recovers when it comes back)."""
        self._restart(session, reason)

    def reset(self, channel: Channel, epoch: str) -> None:
        """The channel's stream began again as ``epoch``: the old one's offsets mean nothing.

        Its subscribers are closed with 1012 so that they reconnect and subscribe with
        ``recover``: the reply then says ``recovered: false`` and replays what the new stream
        holds. Those that already follow ``epoch`` (their reply read it) stay.
        """
        channel.epoch = epoch
        channel.delivered = None
        for subscriber in list(channel.subscribers.values()):
            if not subscriber.epoch:
                # Its reply, still to come, reads the stream as it is now; what it was given
                # meanwhile belongs to the old one.
                if subscriber.pending:
                    subscriber.pending.clear()
            elif subscriber.epoch != epoch:
                self._restart(subscriber.session, f"the history of {channel.name} was reset")

    # -- counts ---------------------------------------------------------------------------

    def _keep_counts(self, channel: Channel) -> None:
        if channel.sent:
            endpoint = channel.endpoint
            self.sent[endpoint] = self.sent.get(endpoint, 0) + channel.sent
            self.sent_bytes[endpoint] = self.sent_bytes.get(endpoint, 0) + channel.sent_bytes
            kind = "channel" if channel.history else "chat"
            self.deliveries[kind] += channel.sent
            channel.sent = channel.sent_bytes = 0

    def delivered(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """What every fan-out delivered so far: messages and bytes by endpoint, and messages
        by kind (``chat``, ``channel``)."""
        sent = dict(self.sent)
        sent_bytes = dict(self.sent_bytes)
        deliveries = dict(self.deliveries)
        for channel in self.channels.values():
            if channel.sent:
                endpoint = channel.endpoint
                sent[endpoint] = sent.get(endpoint, 0) + channel.sent
                sent_bytes[endpoint] = sent_bytes.get(endpoint, 0) + channel.sent_bytes
                deliveries["channel" if channel.history else "chat"] += channel.sent
        return sent, sent_bytes, deliveries

    def stats(self) -> dict[str, int]:
        """Counts for ``/stats``: chat rooms and members, ``/ws`` channels and subscriptions."""
        rooms = members = channels = subscriptions = 0
        for channel in self.channels.values():
            if channel.history:
                channels += 1
                subscriptions += len(channel.subscribers)
            else:
                rooms += 1
                members += len(channel.subscribers)
        return {
            "rooms": rooms,
            "chat_members": members,
            "ws_channels": channels,
            "ws_subscriptions": subscriptions,
        }

    def stop(self) -> None:
        """Keep the counts of every channel (server shutdown)."""
        for channel in self.channels.values():
            self._keep_counts(channel)
        self.channels.clear()
