"""A connection's outbox: bounded, drained by one writer task, shared by everything it hears.

Every connection that can receive publications (a chat member, a ``/ws`` client) has one
:class:`Outbox`, whatever it subscribed to. :func:`broadcast` hands one message to many outboxes
and encodes it once: on roomcast's own transport (the ``roomcast.frames`` ASGI extension) one
WebSocket frame whose bytes are written straight to every connection that can take them;
elsewhere one ASGI message shared by all. It never awaits anyone's socket, so a connection that
stops reading cannot stall the others.

Backpressure: a connection whose transport is over its high-water mark (or that already has
messages waiting) gets the message in its outbox instead, and the writer task sends it when the
transport drains, in order.

Overflow policy: an outbox is bounded in messages (``outbox_size``) and in bytes
(``outbox_bytes``). A push that would pass either bound is refused; the caller then *cuts* the
connection (close 1013 on the guide's chat, 4008 on ``/ws``): its outbox is dropped and the close
is queued behind the message its writer is sending. (An outbox with nothing in it takes any one
message, however large: the message size limits bound that one.)

Counting the transport's buffer matters on roomcast's own transport, where a connection under
its high-water mark is written to directly: a peer that never reads still reaches the bound,
once its transport is full and the rest waits in the outbox. The transport keeps its own buffer
near its high-water mark (see :meth:`roomcast.transport.RoomcastWebSocketProtocol.write_frame`),
so what a peer that never reads can pin on the server is about ``outbox_bytes`` plus one
message (its kernel socket buffers aside).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from roomcast.closecodes import CloseCode
from roomcast.connection import Connection
from roomcast.transport.frames import FRAMES_EXTENSION, OP_BINARY, OP_TEXT, build_frame

__all__ = ["DEFAULT_OUTBOX_BYTES", "Outbox", "broadcast", "item_size"]

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


class Outbox:
    """A connection's bounded outbox and the task that drains it (whatever it subscribed to)."""

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
    )

    def __init__(
        self,
        conn: Connection,
        limit: int,
        writers: set[asyncio.Task[None]],
        max_bytes: int = DEFAULT_OUTBOX_BYTES,
    ) -> None:
        self.conn = conn
        #: The outbox's bounds: messages, and bytes (the transport's buffer included).
        self.limit = limit
        self.max_bytes = max_bytes
        #: Which bound the last refused push met, for the close reason and the log (written
        #: then, not for every connection up front).
        self.overflow = ""
        #: Bytes of the items in the outbox, and of the one being sent (until it is written).
        self._queued = 0
        self._sending = 0
        #: False once the connection is being closed or gone; nothing more is queued for it.
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
        #: Whether this connection takes prepared frames (roomcast's own transport).
        self.fast = self._write_frame is not None
        if self._write_frame is None:
            # Plain ASGI: every message goes through the outbox, so keep one writer for life.
            self._start_writer()

    def send(self, payload: bytes, text: bool = True, *, force: bool = False) -> bool:
        """Queue one message for this connection alone; ``False`` if that passes a bound.

        ``force``: see :meth:`push`.
        """
        if self.fast:
            frame = build_frame(OP_TEXT if text else OP_BINARY, payload)
            return self.offer(frame) or self.push(frame, force=force)
        return self.push(_message(payload, text), force=force)

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
            return True  # the peer is gone: drop it; the connection's handler is leaving
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

        The outbox is dropped (a peer too slow to read it), or with ``flush`` sent first (a
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


def _message(payload: bytes, text: bool) -> dict[str, Any]:
    if text:
        return {"type": "websocket.send", "text": payload.decode()}
    return {"type": "websocket.send", "bytes": payload}


def broadcast(outboxes: Iterable[Outbox], payload: bytes, text: bool = True) -> list[Outbox]:
    """Queue one message for every outbox, encoded once; returns those it did not fit.

    The caller cuts the outboxes returned (they passed a bound); every other one has the message.
    """
    frame: bytes | None = None
    message: dict[str, Any] | None = None
    refused: list[Outbox] = []
    for outbox in outboxes:
        if outbox.fast:
            if frame is None:
                frame = build_frame(OP_TEXT if text else OP_BINARY, payload)
            if outbox.offer(frame) or outbox.push(frame):
                continue
        else:
            if message is None:
                message = _message(payload, text)
            if outbox.push(message):
                continue
        refused.append(outbox)
    return refused
