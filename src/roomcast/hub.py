"""Local fan-out: rooms of members, each with a bounded outbox drained by a writer task.

A broadcast encodes its message once. On roomcast's own transport (the ``roomcast.frames`` ASGI
extension) it builds one WebSocket frame and writes the same bytes straight to every member
whose transport can take them; elsewhere it builds one ASGI message shared by every member.
Either way it never awaits anyone's socket, so a member that stops reading cannot stall the room.

Backpressure: a member whose transport is over its high-water mark (or that already has
messages waiting) gets the message in its outbox instead, and a writer task sends it when the
transport drains, in order.

Overflow policy: an outbox is bounded in messages (``outbox_size``) and in bytes
(``outbox_bytes``). A member whose outbox already holds ``outbox_size`` messages, or whose
transport buffer and outbox together would hold more than ``outbox_bytes`` with the new one,
is *cut*: removed from its room at once, its outbox dropped, and close 1013 (try again later)
queued behind the message its writer is sending. The room's other members are told it left, as
for any other departure. (An outbox with nothing in it takes any one message, however large:
the message size limits bound that one.)

Counting the transport's buffer matters on roomcast's own transport, where a member under its
high-water mark is written to directly: a peer that never reads still reaches the bound, once
its transport is full and the rest waits in the outbox. The transport keeps its own buffer
near its high-water mark (see :meth:`roomcast.transport.RoomcastWebSocketProtocol.write_frame`),
so what a peer that never reads can pin on the server is about ``outbox_bytes`` plus one
message (its kernel socket buffers aside).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Final

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection, ConnId
from roomcast.metrics import FANOUT_BUCKETS, LocalHistogram
from roomcast.transport.frames import FRAMES_EXTENSION, OP_TEXT, build_frame

__all__ = ["DEFAULT_OUTBOX_BYTES", "Hub", "Member", "Room", "item_size"]

logger = logging.getLogger("roomcast.hub")

#: Marks the end of an outbox: the writer closes the connection when it reaches it.
_CLOSE: Final[dict[str, Any]] = {"type": "roomcast.close"}

#: An outbox holds prepared frames (fast path) or ASGI messages (plain ASGI).
Item = bytes | dict[str, Any]

#: Bytes a connection's outbox and transport buffer may hold (``ROOMCAST_OUTBOX_BYTES``).
DEFAULT_OUTBOX_BYTES: Final = 4 << 20


def item_size(item: Item) -> int:
    """What an outbox item weighs: a frame's bytes, an ASGI message's text or bytes length."""
    if isinstance(item, bytes):
        return len(item)
    data = item.get("text")
    if data is None:
        data = item.get("bytes") or b""
    return len(data)


class Member:
    """A connection's membership in one room: its outbox and the task that drains it."""

    __slots__ = (
        "_buffered",
        "_busy",
        "_close_code",
        "_close_reason",
        "_outbox",
        "_queued",
        "_send_frame",
        "_sending",
        "_wakeup",
        "_write_frame",
        "_writer",
        "_writers",
        "active",
        "conn",
        "fast",
        "limit",
        "max_bytes",
        "overflow",
        "room",
    )

    def __init__(
        self,
        conn: Connection,
        room: str,
        limit: int,
        writers: set[asyncio.Task[None]],
        max_bytes: int = DEFAULT_OUTBOX_BYTES,
    ) -> None:
        self.conn = conn
        self.room = room
        #: The outbox's bounds: messages, and bytes (the transport's buffer included).
        self.limit = limit
        self.max_bytes = max_bytes
        #: Which bound the last refused push met, for the close reason and the log.
        self.overflow = f"more than {limit} messages unread"
        #: Bytes of the items in the outbox, and of the one being sent (until it is written).
        self._queued = 0
        self._sending = 0
        #: False once the member left or was cut; its messages are no longer broadcast.
        self.active = True
        self._outbox: deque[Item] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writers = writers
        #: True while the writer has an item in flight (a direct write now would overtake it).
        self._busy = False
        self._close_reason = ""
        self._close_code = CloseCode.TRY_AGAIN_LATER
        frames = conn.scope.get("extensions", {}).get(FRAMES_EXTENSION)
        self._write_frame: Callable[[bytes], bool] | None = frames["write"] if frames else None
        self._send_frame: Callable[[bytes], Awaitable[None]] | None = (
            frames["send"] if frames else None
        )
        #: Bytes waiting in the transport's buffer (roomcast's own transport only).
        self._buffered: Callable[[], int] | None = frames.get("buffered") if frames else None
        #: Whether this member takes prepared frames (roomcast's own transport).
        self.fast = self._write_frame is not None
        if self._write_frame is None:
            # Plain ASGI: every message goes through the outbox, so keep one writer for life.
            self._start_writer()

    def offer(self, frame: bytes) -> bool:
        """Write ``frame`` now if nothing is ahead of it and the transport takes it."""
        write = self._write_frame
        return write is not None and not self._outbox and not self._busy and write(frame)

    def push(self, item: Item, *, force: bool = False) -> bool:
        """Queue an item for this member; ``False`` if that would pass a bound (see the module).

        ``force`` queues it even past the bounds: for a burst the server itself bounds, such as
        a recovery's replay (at most the history size), not for anything a peer can repeat. The
        bytes it adds still count, so the next push that is not forced meets the bound.
        """
        if self.conn.closed:
            return True  # the peer is gone: drop it; the member's handler is leaving
        outbox = self._outbox
        size = item_size(item)
        if not force:
            if len(outbox) >= self.limit:
                self.overflow = f"more than {self.limit} messages unread"
                return False
            queued = self._queued
            if queued:
                buffered = self._buffered
                if buffered is not None:
                    queued += buffered()
                if queued + size > self.max_bytes:
                    self.overflow = f"more than {self.max_bytes} bytes unread"
                    return False
        outbox.append(item)
        self._queued += size
        self._wake()
        return True

    def close_after_current(
        self,
        reason: str,
        code: CloseCode = CloseCode.TRY_AGAIN_LATER,
        *,
        grace: float | None = None,
        flush: bool = False,
    ) -> None:
        """Have the writer close with ``code`` once its current send is done.

        The outbox is dropped (a member too slow to read it), or with ``flush`` sent first (a
        close for another reason: the replies already queued still reach the peer; the outbox
        bound and ``grace`` bound that).
        """
        self.active = False
        self._close_reason = reason
        self._close_code = code
        if not flush:
            self._outbox.clear()
            self._queued = self._sending
        self._outbox.append(_CLOSE)
        self._wake()
        if grace is not None:
            # The writer is stuck on a peer that does not read: give it `grace` seconds, then
            # stop waiting and close over the top of the unfinished send.
            asyncio.get_running_loop().call_later(grace, self._force_close)

    def _force_close(self) -> None:
        if self.conn.closed:
            return
        writer = self._writer
        if writer is not None:
            writer.cancel()
        closer = asyncio.get_running_loop().create_task(
            self.conn.close(self._close_code, self._close_reason),
            name=f"roomcast-closer-{self.conn.id}",
        )
        self._writers.add(closer)
        closer.add_done_callback(self._writers.discard)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        elif self._writer is None:
            self._start_writer()

    def _start_writer(self) -> None:
        writer = asyncio.get_running_loop().create_task(
            self._write(), name=f"roomcast-writer-{self.conn.id}"
        )
        self._writer = writer
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)

    async def _write(self) -> None:
        outbox = self._outbox
        send = self.conn.send_message
        send_frame = self._send_frame
        loop = asyncio.get_running_loop()
        try:
            while True:
                while outbox:
                    item = outbox.popleft()
                    if item is _CLOSE:
                        await self.conn.close(self._close_code, self._close_reason)
                        return
                    self._busy = True
                    # Still counted while it waits for the transport: it is still held here.
                    self._sending = item_size(item)
                    if type(item) is bytes:
                        assert send_frame is not None
                        try:
                            await send_frame(item)
                        except OSError:
                            self._gone()
                            return
                    elif not await send(item):  # type: ignore[arg-type]
                        self._gone()
                        return
                    self._queued -= self._sending
                    self._sending = 0
                    self._busy = False
                if send_frame is not None:
                    return  # fast path: no writer while there is nothing to wait for
                self._wakeup = loop.create_future()
                await self._wakeup
        finally:
            self._queued -= self._sending
            self._sending = 0
            self._busy = False
            self._writer = None

    def _gone(self) -> None:
        """The peer went away mid-send: nothing more will reach it."""
        self.active = False
        self._outbox.clear()
        self._queued = self._sending

    async def finish(self) -> None:
        """Cancel the writer, if one runs, and wait for it to end."""
        writer = self.stop()
        if writer is not None:
            try:
                await writer
            except asyncio.CancelledError:
                # Re-raise only if *we* are being cancelled, not just the writer.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the writer, if one runs; returns it so the caller can await it."""
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            return writer
        return None


class Room:
    """Members of one room, in join order, and what the others hear when one leaves."""

    __slots__ = ("endpoint", "leave_notice", "members", "name", "sent", "sent_bytes")

    def __init__(self, name: str, leave_notice: str | None, endpoint: str = "") -> None:
        self.name = name
        self.leave_notice = leave_notice
        self.members: dict[ConnId, Member] = {}
        #: The members' route (the metrics' endpoint label), and what its fan-outs delivered.
        self.endpoint = endpoint
        self.sent = 0
        self.sent_bytes = 0


class Hub:
    """Rooms of one process; every method is synchronous except :meth:`stop`."""

    def __init__(
        self,
        outbox_size: int,
        close_timeout: float = 5.0,
        outbox_bytes: int = DEFAULT_OUTBOX_BYTES,
    ) -> None:
        self.outbox_size = outbox_size
        self.outbox_bytes = outbox_bytes
        #: Seconds a cut member's writer may stay stuck on its current send before the close.
        self.close_timeout = close_timeout
        self._rooms: dict[str, Room] = {}
        self._writers: set[asyncio.Task[None]] = set()
        self._departures: deque[tuple[str, str]] = deque()
        self._telling = False
        #: With a shared broker, leave notices go to every node through this (room, text)
        #: callback instead of straight to the local members.
        self.relay: Callable[[str, str], None] | None = None
        #: For roomcast.metrics: fan-out durations; deliveries of rooms gone, by endpoint;
        #: members cut for being slow, by endpoint.
        self.fanout_time = LocalHistogram(FANOUT_BUCKETS)
        self.sent: dict[str, int] = {}
        self.sent_bytes: dict[str, int] = {}
        self.slow: dict[str, int] = {}

    def join(self, conn: Connection, room: str, leave_notice: str | None = None) -> Member:
        """Add ``conn`` to ``room`` (created on first join) and start its writer."""
        entry = self._rooms.get(room)
        if entry is None:
            entry = self._rooms[room] = Room(room, leave_notice, conn.endpoint)
        member = Member(conn, room, self.outbox_size, self._writers, self.outbox_bytes)
        entry.members[conn.id] = member
        return member

    def broadcast(self, room: str, text: str) -> int:
        """Queue ``text`` for every member of ``room``; returns how many members got it."""
        reached = self._fan_out(room, text)
        self._tell_departures()
        return reached

    def _fan_out(self, room: str, text: str) -> int:
        entry = self._rooms.get(room)
        if entry is None:
            return 0
        start = perf_counter()
        frame: bytes | None = None
        message: dict[str, Any] | None = None
        overflowed: list[Member] | None = None
        for member in entry.members.values():
            item: Item
            if member.fast:
                if frame is None:
                    frame = build_frame(OP_TEXT, text.encode())
                if member.offer(frame):
                    continue
                item = frame
            else:
                if message is None:
                    message = {"type": "websocket.send", "text": text}
                item = message
            if not member.push(item):
                if overflowed is None:
                    overflowed = []
                overflowed.append(member)
        reached = len(entry.members)
        delivered = reached if overflowed is None else reached - len(overflowed)
        self.fanout_time.observe(perf_counter() - start)
        entry.sent += delivered
        entry.sent_bytes += delivered * len(text)
        if overflowed is not None:
            for member in overflowed:
                self._cut(member)
        return reached

    def _cut(self, member: Member) -> None:
        logger.info(
            "conn=%s %s cut %d: outbox overflow (%s)",
            member.conn.id,
            member.conn.path,
            CloseCode.TRY_AGAIN_LATER,
            member.overflow,
        )
        endpoint = member.conn.endpoint
        self.slow[endpoint] = self.slow.get(endpoint, 0) + 1
        member.close_after_current(f"too slow: {member.overflow}", grace=self.close_timeout)
        self._remove(member, notify=True)

    def _remove(self, member: Member, notify: bool) -> None:
        member.active = False
        entry = self._rooms.get(member.room)
        if entry is None or entry.members.pop(member.conn.id, None) is None:
            return
        if not entry.members:
            del self._rooms[member.room]
            self._keep_counts(entry)
        # The last local member leaving still has an audience on other nodes (relay).
        if notify and entry.leave_notice is not None and (entry.members or self.relay):
            self._departures.append((member.room, entry.leave_notice))

    def _tell_departures(self) -> None:
        # A leave notice can overflow another member's outbox, whose cut makes another notice:
        # a work list instead of recursion keeps that cascade flat (one notice per departure).
        if self._telling:
            return
        self._telling = True
        try:
            relay = self.relay
            while self._departures:
                room, text = self._departures.popleft()
                if relay is not None:
                    relay(room, text)
                else:
                    self._fan_out(room, text)
        finally:
            self._telling = False

    async def leave(self, member: Member, *, notify: bool = True) -> None:
        """Remove ``member`` (if still in its room), tell the room, and stop its writer.

        ``notify=False`` skips the leave notice, e.g. when the whole server is shutting down
        and every member is leaving anyway.
        """
        self._remove(member, notify)
        self._tell_departures()
        await member.finish()

    def _keep_counts(self, entry: Room) -> None:
        if entry.sent:
            endpoint = entry.endpoint
            self.sent[endpoint] = self.sent.get(endpoint, 0) + entry.sent
            self.sent_bytes[endpoint] = self.sent_bytes.get(endpoint, 0) + entry.sent_bytes

    def delivered(self) -> tuple[dict[str, int], dict[str, int]]:
        """Messages and payload characters every fan-out delivered so far, by endpoint."""
        sent = dict(self.sent)
        sent_bytes = dict(self.sent_bytes)
        for entry in self._rooms.values():
            if entry.sent:
                endpoint = entry.endpoint
                sent[endpoint] = sent.get(endpoint, 0) + entry.sent
                sent_bytes[endpoint] = sent_bytes.get(endpoint, 0) + entry.sent_bytes
        return sent, sent_bytes

    def stats(self) -> dict[str, int]:
        """Counts for ``/stats``: rooms, members and live writer tasks."""
        return {
            "rooms": len(self._rooms),
            "chat_members": sum(len(room.members) for room in self._rooms.values()),
            "writer_tasks": len(self._writers),
        }

    def members(self, room: str) -> list[Member]:
        """The members of ``room`` in join order (empty for an unknown room)."""
        entry = self._rooms.get(room)
        return list(entry.members.values()) if entry is not None else []

    async def stop(self) -> None:
        """Cancel every writer (server shutdown, after handlers had their drain time)."""
        writers = list(self._writers)
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        for entry in self._rooms.values():
            self._keep_counts(entry)
        self._rooms.clear()
