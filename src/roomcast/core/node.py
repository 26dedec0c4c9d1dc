"""The node: the coordinator of one roomcast process, and the one way in for every endpoint.

Every publication goes through :meth:`Node.publish` (the guide's chat, ``/ws``, the HTTP API);
the broker gives it its offset and delivers it to every node, where the hub
(:class:`roomcast.core.hub.Hub`) fans it out. Sessions (:class:`roomcast.core.session.Session`)
are opened, subscribed, cut, closed and ended here, so that every endpoint gets the same
outboxes, limits and recovery. The node is the broker's :class:`~roomcast.brokers.Sink`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from roomcast.auth import Authenticator, Grant
from roomcast.brokers import Broker, BrokerUnavailable, HistoryPage, Position, Publication
from roomcast.brokers import from_settings as broker_from_settings
from roomcast.closecodes import CloseCode
from roomcast.codecs import Codec
from roomcast.connection import Connection, ConnId
from roomcast.core.hub import Channel, Hub, Subscriber
from roomcast.core.outbox import Outbox
from roomcast.core.session import Session
from roomcast.counters import Tally
from roomcast.settings import Settings

__all__ = ["Node", "Subscribed"]

logger = logging.getLogger("roomcast.node")

#: Publications one session may have under way at once (see :meth:`Node.pipeline`), and their
#: bytes: enough for a burst to cross a shared broker in one round trip, few enough that a sender
#: cannot queue without bound (past either, its next message is not read until the oldest is
#: done). A publication under way costs about 1 kB besides its data.
PUBLISH_WINDOW = 256
PUBLISH_WINDOW_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Subscribed:
    """What a subscribe read of the channel's stream: for the reply, and what to replay."""

    epoch: str
    offset: int
    #: ``None`` when no recovery was asked for; else whether nothing was missed.
    recovered: bool | None
    replay: list[Publication]


class Node:
    """One process's coordinator: settings, broker, hub, sessions and connection limits."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker if broker is not None else broker_from_settings(settings)
        self.auth = auth if auth is not None else Authenticator(settings)
        #: Background tasks (leaving channels, catch-ups) and outbox writers.
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.Task[None]] = set()
        self.hub = Hub(self.broker.history, settings.history_size, self.restart, self.tasks)
        #: Sessions on this node, by id.
        self.sessions: dict[str, Session] = {}
        #: Open WebSocket connections, and their counts per client IP address and per user.
        self.connections: set[Connection] = set()
        self.per_ip: dict[str, int] = {}
        self.per_user: dict[str, int] = {}
        #: For roomcast.metrics: ended connections, refusals and cuts.
        self.tally = Tally()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker; publications flow from then on."""
        await self.broker.start(self)

    async def stop(self) -> None:
        """Cancel every writer and background task, then close the broker."""
        tasks = [*self.writers, *self.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.hub.stop()
        await self.broker.close()

    # -- the broker's sink ------------------------------------------------------------------

    def on_publication(self, channel: str, epoch: str, publication: Publication) -> None:
        """A publication from the broker: the hub fans it out."""
        self.hub.on_publication(channel, epoch, publication)

    def on_event(self, channel: str, kind: str, client: str, info: bytes) -> None:
        """A join/leave from the broker: the hub tells those who asked."""
        self.hub.on_event(channel, kind, client, info)

    def on_command(self, command: str, argument: str) -> None:
        """A command from any node (``D <user>``: disconnect that user here)."""
        if command == "D":
            self._disconnect_user(argument)

    def on_reconnect(self) -> None:
        """The broker is back: every channel catches up on what it missed."""
        self.hub.recovery.on_reconnect()

    # -- connection limits ------------------------------------------------------------------

    def claim_user(self, user: str) -> bool:
        """Count one more connection of ``user``; ``False`` (and nothing counted) at the limit."""
        held = self.per_user.get(user, 0)
        limit = self.settings.max_connections_per_user
        if limit and held >= limit:
            return False
        self.per_user[user] = held + 1
        return True

    def release_user(self, user: str) -> None:
        """A connection counted by :meth:`claim_user` ended."""
        left = self.per_user.get(user, 0) - 1
        if left > 0:
            self.per_user[user] = left
        else:
            self.per_user.pop(user, None)

    # -- sessions -------------------------------------------------------------------------

    def new_id(self) -> str:
        """A random session id, unique on this node (a ``/ws`` client id, which others see)."""
        session_id = secrets.token_hex(6)
        while session_id in self.sessions:
            session_id = secrets.token_hex(6)
        return session_id

    def open(
        self,
        conn: Connection,
        codec: Codec,
        grant: Grant,
        *,
        slow_code: CloseCode,
        info: bytes = b"",
        connected_at: str = "",
        farewell: bytes | None = None,
        session_id: str | None = None,
    ) -> Session:
        """A session for ``conn`` (registered until :meth:`detach`).

        ``session_id`` (from :meth:`new_id`) becomes the connection's id; without it the
        connection keeps its own. A user's connection was counted with :meth:`claim_user`
        already; :meth:`detach` releases it.
        """
        if session_id is not None:
            conn.id = ConnId(session_id)
        settings = self.settings
        outbox = Outbox(conn, settings.outbox_size, self.writers, settings.outbox_bytes)
        session = Session(
            self,
            conn,
            codec,
            grant,
            outbox,
            info=info,
            connected_at=connected_at,
            slow_code=slow_code,
            farewell=farewell,
        )
        self.sessions[session.id] = session
        return session

    async def detach(self, session: Session, *, notify: bool = True) -> None:
        """The connection ended: drop its subscriptions, presence and writer."""
        # Its last publications go out before its farewell (and a /ws client's replies with
        # them, while it may still read).
        await self.settle(session)
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        session.outbox.active = False
        session.cancel_timers()
        if session.user is not None:
            self.release_user(session.user)
        await self._drop_all(session, notify=notify)
        await session.outbox.finish()

    def close(self, session: Session, code: CloseCode, reason: str) -> None:
        """Close ``session`` from the server's side; it leaves its channels at once.

        What is already queued for it still goes out first (bounded by the close timeout).
        """
        outbox = session.outbox
        if not outbox.active:
            return
        logger.info("conn=%s %s closing %d: %s", session.id, session.conn.path, code, reason)
        session.cancel_timers()
        outbox.close_after_current(reason, code, grace=self.settings.close_timeout, flush=True)
        self._leave_all(session)

    def cut(self, session: Session) -> None:
        """Close a session that reads too slowly; its subscriptions end with it."""
        outbox = session.outbox
        if not outbox.active:
            return
        code = session.slow_code
        conn = session.conn
        logger.info(
            "conn=%s %s cut %d: outbox overflow (%s)", session.id, conn.path, code, outbox.overflow
        )
        self.tally.cut(conn.endpoint)
        outbox.close_after_current(
            f"too slow: {outbox.overflow}", code, grace=self.settings.close_timeout
        )
        self._leave_all(session)

    def restart(self, session: Session, reason: str) -> None:
        """Close ``session`` with 1012: its channel's stream began again, or it missed
        publications; it comes back and recovers."""
        outbox = session.outbox
        if not outbox.active:
            return
        logger.info("conn=%s %s closed %d: %s", session.id, session.conn.path, 1012, reason)
        outbox.close_after_current(
            reason, CloseCode.SERVICE_RESTART, grace=self.settings.close_timeout
        )
        self._leave_all(session)

    async def disconnect_user(self, user: str) -> int:
        """Close every connection of ``user``, on every node, with 4001.

        Returns how many this node closed (the others act on the same command).
        """
        closed = self._disconnect_user(user)
        if self.broker.shared:
            await self.broker.command("D", user)
        return closed

    def _disconnect_user(self, user: str) -> int:
        closed = 0
        for session in list(self.sessions.values()):
            if session.user == user and session.active:
                self.close(session, CloseCode.DISCONNECTED, "disconnected by the server")
                closed += 1
        return closed

    # -- publishing -----------------------------------------------------------------------

    async def publish(
        self, channel: str, data: bytes, info: bytes, *, history: bool = True
    ) -> Position:
        """Publish ``data`` on ``channel``, on every node: the one entry point.

        ``info`` names the publisher (encoded). Without ``history`` (the guide's chat rooms)
        the publication has no offset, and while a shared broker is unreachable it reaches this
        node's subscribers only, rather than being lost or failing the sender.
        """
        if history:
            return await self.broker.publish(channel, data, info)
        try:
            return await self.broker.publish(channel, data, info, history=False)
        except BrokerUnavailable:
            self.hub.on_publication(channel, "", Publication(0, data, info))
            return Position("", 0)

    async def pipeline(
        self, session: Session, work: Coroutine[Any, Any, None], size: int = 0
    ) -> None:
        """Start ``work`` (a publication of ``session``'s, and its reply) without waiting for it.

        A sender's publications then cross the broker together instead of one per round trip,
        still in the order they were sent: tasks start in the order they are created, and each
        hands its command to the broker before it first waits. ``work`` answers its own
        failures. Returns at once, unless ``PUBLISH_WINDOW`` of the session's publications are
        under way, or ``PUBLISH_WINDOW_BYTES`` of their data (``size``: this one's): then once
        enough of the oldest are done.
        """
        pending = session.publishing
        if pending is None:
            pending = session.publishing = deque()
        while pending and (
            len(pending) >= PUBLISH_WINDOW or session.publishing_bytes + size > PUBLISH_WINDOW_BYTES
        ):
            await asyncio.wait((pending[0],))
        task = asyncio.get_running_loop().create_task(work)
        pending.append(task)
        session.publishing_bytes += size
        self.tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            session.publishing_bytes -= size
            if pending[0] is task:
                pending.popleft()
            else:
                pending.remove(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                logger.error("conn=%s a publication failed", session.id, exc_info=error)

        task.add_done_callback(done)

    async def settle(self, session: Session) -> None:
        """Wait until ``session``'s publications under way are done (before its next request,
        which must see them)."""
        pending = session.publishing
        while pending:
            await asyncio.wait((pending[0],))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """Who is subscribed to ``channel``, on every node."""
        return await self.broker.presence(channel)

    async def history(
        self, channel: str, *, since: int | None = None, before: int | None = None, limit: int
    ) -> HistoryPage:
        """Stored publications of ``channel`` (see :meth:`roomcast.brokers.Broker.history`)."""
        return await self.broker.history(channel, since=since, before=before, limit=limit)

    async def channels(self) -> dict[str, int]:
        """Channels with subscribers, on every node, and how many each has."""
        return await self.broker.channels()

    # -- subscribing ------------------------------------------------------------------------

    async def join(self, session: Session, channel: str) -> Subscriber:
        """Subscribe ``session`` to a channel without history (a chat room), not live yet.

        Waits until the broker delivers the channel here, so that once the session goes live
        (:meth:`go_live`) it gets everything published after that, whichever node publishes.
        An unreachable broker leaves the channel local until it is back.
        """
        subscriber = self.hub.add(session, channel, history=False, join_leave=False)
        try:
            await self.broker.subscribe(channel)
        except BrokerUnavailable:
            logger.warning("conn=%s %s local only: broker unreachable", session.id, channel)
        except BaseException:
            await self.drop(session, channel, notify=False)
            raise
        return subscriber

    def go_live(self, subscriber: Subscriber) -> None:
        """``subscriber`` (from :meth:`join`) gets every publication from now on."""
        channel = self.hub.channels.get(subscriber.channel)
        if channel is not None and channel.subscribers.get(subscriber.session.id) is subscriber:
            channel.go_live(subscriber)

    async def subscribe(
        self,
        session: Session,
        channel: str,
        *,
        recover: tuple[int, str] | None = None,
        join_leave: bool = False,
    ) -> tuple[Subscribed, Callable[[list[bytes]], None] | None]:
        """Subscribe ``session`` to a channel with history, recovering from ``(offset, epoch)``.

        Returns what the reply says, and what to call (with the replay's encoded frames) right
        after the reply was sent: it sends the replay and what arrived meanwhile, then the
        subscription is live. ``None`` if the session was closed meanwhile (no reply reaches
        it).
        """
        hub = self.hub
        subscriber = hub.add(session, channel, history=True, join_leave=join_leave)
        local = hub.channels[channel]
        try:
            # Every subscriber waits until the broker delivers the channel to this node (the
            # first one asked; the others wait for the same confirmation), and only then reads
            # the position: a position read earlier could miss publications made in between.
            await self.broker.subscribe(channel)
            subscribed = await self._read_stream(local, subscriber, recover)

            def current() -> bool:
                return session.active and session.subscriptions.get(channel) is subscriber

            # The server may close the session while the broker answers (too slow, token
            # expired, /api/disconnect): it leaves its channels at once (_leave_all), removing
            # its presence entry. An entry added after that would outlive it, kept alive by
            # this node's presence heartbeat; so add it only for a current subscription, and
            # take it back if the session was closed during the add.
            entry = {
                "client": session.id,
                "user": session.user,
                "connected_at": session.connected_at,
            }
            if current():
                try:
                    await self.broker.presence_add(channel, session.id, entry)
                finally:
                    if not current():
                        await self.broker.presence_remove(channel, session.id)
        except BaseException:
            # A failed broker call, or the server stopping: leave no half subscription behind.
            # (A session closed meanwhile has left already: then drop finds nothing to do.)
            await self.drop(session, channel, notify=False)
            raise
        if not current():
            return subscribed, None
        await self.broker.emit(channel, "join", session.id, session.info)

        def go_live(replay: list[bytes]) -> None:
            if session.subscriptions.get(channel) is subscriber:
                hub.start_live(local, subscriber, replay)

        return subscribed, go_live

    async def _read_stream(
        self, local: Channel, subscriber: Subscriber, recover: tuple[int, str] | None
    ) -> Subscribed:
        """The channel's position, or its history after ``recover``'s offset."""
        channel = local.name
        limit = max(1, self.settings.history_size)
        if recover is None:
            position = await self.broker.position(channel)
            self.hub.learn_stream(local, position.epoch, position.offset, subscriber)
            subscriber.offset = position.offset
            return Subscribed(position.epoch, position.offset, None, [])
        offset, epoch = recover
        page = await self.broker.history(channel, since=offset, limit=limit)
        recovered = False
        replay: list[Publication] = []
        if page.epoch == epoch:
            if offset <= page.offset:
                recovered = page.start <= offset + 1
                replay = page.publications
        else:
            # The stream the client knew is gone and a new one began after it: what happened
            # in between is lost, but everything the new stream still holds is news to it.
            page = await self.broker.history(channel, since=0, limit=limit)
            replay = page.publications
        self.hub.learn_stream(local, page.epoch, page.offset, subscriber)
        subscriber.offset = page.offset
        return Subscribed(page.epoch, page.offset, recovered, replay)

    async def unsubscribe(self, session: Session, channel: str) -> None:
        """End ``session``'s subscription to ``channel`` (others hear it left)."""
        await self.drop(session, channel, notify=True)

    def _leave_all(self, session: Session) -> None:
        """A session being closed by the server leaves its channels now, not when it is gone.

        Its close may take until the close timeout (a peer that does not read); meanwhile it
        must not appear in presence nor receive publications.
        """
        if not session.subscriptions:
            return
        self.hub.forget(session)
        task = asyncio.get_running_loop().create_task(
            self._drop_all(session), name=f"roomcast-leave-{session.id}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drop_all(self, session: Session, *, notify: bool = True) -> None:
        for channel in list(session.subscriptions):
            try:
                await self.drop(session, channel, notify=notify)
            except BrokerUnavailable:
                # The broker forgets the entry by itself (presence entries expire).
                logger.info("conn=%s broker unavailable while leaving %s", session.id, channel)

    async def drop(self, session: Session, channel: str, *, notify: bool) -> None:
        """End ``session``'s subscription to ``channel`` here and in the broker.

        ``notify``: a ``/ws`` channel's subscribers hear a ``leave``; a chat room's members
        hear the session's farewell.
        """
        subscriber = session.subscriptions.pop(channel, None)
        if subscriber is None:
            return
        local = self.hub.channels.get(channel)
        history = local is None or local.history
        if self.hub.remove(session, channel):
            await self.broker.unsubscribe(channel)
            local = None
        if history:
            await self.broker.presence_remove(channel, session.id)
            if notify:
                await self.broker.emit(channel, "leave", session.id, session.info)
        elif notify and session.farewell is not None and (local is not None or self.broker.shared):
            # The last local member leaving still has an audience on other nodes.
            await self.publish(channel, session.farewell, b"", history=False)

    # -- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts for ``/stats``."""
        return {
            "connections": len(self.connections),
            **self.hub.stats(),
            "writer_tasks": len(self.writers),
            "ws_clients": sum(1 for s in self.sessions.values() if s.conn.endpoint == "/ws"),
            "ws_writer_tasks": len(self.tasks),
        }
