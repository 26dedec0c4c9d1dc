"""roomcast's WebSocket protocol for uvicorn: full ASGI, plus pre-framed broadcast writes.

uvicorn hands an upgrade request to the class named by its ``ws`` setting;
``roomcast serve`` names :class:`RoomcastWebSocketProtocol`. Framing and the handshake are the
sans-I/O modules beside this one, and so is the connection's state
(:class:`~roomcast.transport.state.ConnectionState`: what each frame does, the closing handshake,
keepalive decisions); this module moves bytes between them, the transport and the ASGI app, and
owns the timers, the corked writes and flow control.

Beyond plain ASGI it advertises the ``roomcast.frames`` extension in ``scope["extensions"]``:

- ``write(frame) -> bool`` writes an already built frame now, if the connection is open and its
  transport is under its high-water mark; ``False`` means "queue it and use ``send``".
- ``send(frame)`` (a coroutine) waits until the transport can take more, then writes.
- ``buffered() -> int``: bytes taken and not yet handed to the kernel (the transport's write
  buffer and the frames corked this turn), which the hub counts against a connection's bound.

A broadcast builds one frame and hands the same bytes to every member (server frames are not
masked, RFC 6455 section 5.1), instead of one ASGI message, one encode and one frame per member.
The closing handshake is bounded by a timer (``close_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar, Final
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState
from websockets.extensions.permessage_deflate import PerMessageDeflate

from roomcast.closecodes import CloseCode
from roomcast.logs import log_safe
from roomcast.transport.frames import FRAMES_EXTENSION, OP_BINARY, OP_TEXT
from roomcast.transport.handshake import (
    MAX_HEAD,
    HandshakeError,
    build_accept_response,
    build_http_response,
    negotiate_deflate,
    parse_upgrade_request,
)
from roomcast.transport.state import (
    CLOSED,
    CLOSING,
    CONNECTING,
    OPEN,
    PONG,
    REPLY,
    CloseReceived,
    ConnectionState,
    Event,
    Failure,
)

__all__ = ["FRAMES_EXTENSION", "RoomcastWebSocketProtocol", "protocol_class"]

logger = logging.getLogger("roomcast.transport")
access_logger = logging.getLogger("uvicorn.error")

#: Corked frames written at once, before the end of the loop turn, past this many...
_CORK_LIMIT: Final = 256
#: ... or past this many bytes (the transport's default high-water mark): the transport only
#: pauses, and refuses more frames, once it was written to, so without this a turn's frames
#: could pass its high-water mark by any amount.
_CORK_BYTES: Final = 64 * 1024
#: Complete messages held for the app before frames are left unparsed and reading pauses.
_INBOX_LIMIT: Final = 4


class RoomcastWebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection served by uvicorn (``uvicorn.Config(ws=this class)``)."""

    #: Seconds the peer gets to answer our close frame before the TCP connection is dropped.
    #: :func:`protocol_class` makes a subclass with the configured value.
    close_timeout: ClassVar[float] = 5.0

    __slots__ = (
        "_close_timer",
        "_corked",
        "_corked_size",
        "_deflate",
        "_denial",
        "_drain_waiter",
        "_ext_header",
        "_head",
        "_inbox",
        "_keepalive_timer",
        "_read_paused",
        "_recv_waiter",
        "_request_key",
        "_ws",
        "app",
        "app_state",
        "client",
        "config",
        "connections",
        "default_headers",
        "loop",
        "scope",
        "server",
        "tasks",
        "transport",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scope: dict[str, Any] = {}
        #: The connection's state; CONNECTING from the first byte until the app accepts.
        self._ws = ConnectionState(
            config.ws_max_size,
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
        )
        #: The request head so far; ``None`` once it was read (or refused).
        self._head: bytes | None = b""
        self._request_key = b""
        self._inbox: deque[dict[str, Any]] = deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._deflate: PerMessageDeflate | None = None
        self._ext_header: str | None = None
        self._denial: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._corked: list[bytes] | None = None
        self._corked_size = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)  # type: ignore[arg-type]
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        ws = self._ws
        was = ws.state
        ws.abort()
        self._corked = None
        self._cancel_timers()
        # The app runs from the end of the request head (CONNECTING with no head left).
        if was is OPEN or (was is CONNECTING and self._head is None):
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
        self._wake_writers()
        if self._recv_waiter is not None and not self._recv_waiter.done():
            self._recv_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._ws.pause_writing()

    def resume_writing(self) -> None:
        self._ws.resume_writing()
        self._flush()  # the pong held back while the transport was full, if any
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        so_far = self._head
        if so_far is not None:
            so_far += data
            end = so_far.find(b"\r\n\r\n")
            if end < 0:
                if len(so_far) > MAX_HEAD:
                    self._refuse(HandshakeError(431, "request head too large"))
                else:
                    self._head = so_far
                return
            self._head = None
            self._start(so_far[:end])
            rest = so_far[end + 4 :]
            if rest:
                self._ws.receive_data(rest)
            return
        self._ws.receive_data(data)
        self._parse()

    # -- uvicorn's server hooks ----------------------------------------------------------

    def shutdown(self) -> None:
        """Server shutdown: close 1012 (service restart) to an open connection."""
        ws = self._ws
        if ws.state is OPEN:
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.SERVICE_RESTART})
            self._write_close(CloseCode.SERVICE_RESTART, "server shutting down")
            self.transport.close()
        elif ws.state is CONNECTING:
            self._refuse_after_app(503, b"server shutting down")
        else:
            self.transport.close()

    # -- handshake -----------------------------------------------------------------------

    def _start(self, head: bytes) -> None:
        try:
            request = parse_upgrade_request(head)
        except HandshakeError as error:
            self._refuse(error)
            return
        self._request_key = request.key
        if self.config.ws_per_message_deflate and request.extensions:
            negotiated = negotiate_deflate(request.extensions)
            if negotiated is not None:
                self._ext_header, self._deflate = negotiated
        raw_path, _, query = request.target.partition("?")
        root = self.config.root_path
        frames = {"write": self.write_frame, "send": self.send_frame, "buffered": self.buffered}
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": self.server,
            "client": self.client,
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": (root + raw_path).encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": request.headers,
            "subprotocols": request.subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}, FRAMES_EXTENSION: frames},
        }
        self._inbox.append({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_asgi())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(self, error: HandshakeError) -> None:
        logger.info(
            "%s refused WebSocket handshake %d: %s", self._peer(), error.status, error.reason
        )
        self.transport.write(build_http_response(error.status, error.reason.encode()))
        self._head = None
        self._ws.abort()
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "-"

    def _log_access(self, outcome: str) -> None:
        if self.config.access_log:
            query = self.scope.get("query_string", b"")
            path = self.scope.get("path", "") + (f"?{query.decode('latin-1')}" if query else "")
            access_logger.info('%s - "WebSocket %s" %s', self._peer(), log_safe(path), outcome)

    # -- the ASGI app --------------------------------------------------------------------

    async def _run_asgi(self) -> None:
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except asyncio.CancelledError:
            self._abort_app(CloseCode.SERVICE_RESTART)
            raise
        except BaseException:
            access_logger.exception("Exception in ASGI application\n")
            self._abort_app(CloseCode.INTERNAL_ERROR)
        else:
            if self._ws.state is CONNECTING:
                access_logger.error("ASGI callable returned without completing handshake.")
                self._abort_app(CloseCode.INTERNAL_ERROR)
            elif result is not None:
                access_logger.error("ASGI callable should return None, but returned %r.", result)
        # An app that returns without closing: close normally (RFC 6455 section 7.1.2).
        if self._ws.state is OPEN:
            self._begin_close(CloseCode.NORMAL, "")

    def _abort_app(self, code: CloseCode) -> None:
        ws = self._ws
        if ws.state is CONNECTING:
            self.transport.write(build_http_response(500, b"Internal Server Error"))
            ws.abort()
            self.transport.close()
        elif ws.state is OPEN:
            self._begin_close(code, "")

    async def receive(self) -> dict[str, Any]:
        """ASGI receive: the next event for the app."""
        inbox = self._inbox
        while not inbox:
            if self._ws.state is CLOSED:
                return {"type": "websocket.disconnect", "code": CloseCode.ABNORMAL}
            waiter = self._recv_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = inbox.popleft()
        # Complete frames are left unparsed only while reading is paused: each _parse reads
        # every complete frame or pauses (a partial frame waits for bytes, not for a parse).
        if self._read_paused and len(inbox) < _INBOX_LIMIT:
            self._parse()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI send."""
        kind = message["type"]
        # A close does not wait for the peer to read what is queued: its close timer bounds
        # it, and a peer that stopped reading must not keep its connection open forever.
        ws = self._ws
        if not ws.writable and ws.state is OPEN and kind != "websocket.close":
            await self._wait_writable()
        state = ws.state
        if state is OPEN:
            if kind == "websocket.send":
                data = message.get("bytes")
                if data is not None:
                    self._out(ws.data_frame(OP_BINARY, data))
                else:
                    self._out(ws.data_frame(OP_TEXT, message["text"].encode()))
            elif kind == "websocket.close":
                code = message.get("code") or CloseCode.NORMAL
                self._deliver({"type": "websocket.disconnect", "code": code})
                self._begin_close(code, message.get("reason") or "")
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} on an open WebSocket")
        elif state is CONNECTING:
            self._send_before_accept(message)
        elif kind == "websocket.close" or kind.startswith("websocket.http.response"):
            return
        else:
            raise ClientDisconnected()

    def _send_before_accept(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            headers = list(self.default_headers) + [
                (bytes(k), bytes(v)) for k, v in message.get("headers") or ()
            ]
            self.transport.write(
                build_accept_response(
                    self._request_key, message.get("subprotocol"), self._ext_header, headers
                )
            )
            ws = self._ws
            ws.accept(self.loop.time(), self._deflate)
            self._log_access("[accepted]")
            self._arm_keepalive()
            if ws.unparsed:
                self._parse()
        elif kind == "websocket.close":
            self._log_access("403")
            self._refuse_after_app(403, b"")
        elif kind == "websocket.http.response.start":
            self._denial = (int(message["status"]), list(message.get("headers") or ()), [])
        elif kind == "websocket.http.response.body" and self._denial is not None:
            status, headers, body = self._denial
            body.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self._denial = None
                self._log_access(str(status))
                self._refuse_after_app(status, b"".join(body), headers)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} before the handshake")

    def _refuse_after_app(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer the upgrade request with an HTTP response instead, while the app runs."""
        self.transport.write(build_http_response(status, body, headers))
        self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
        self._head = None
        self._ws.abort()
        self.transport.close()

    # -- the roomcast.frames extension ---------------------------------------------------

    def write_frame(self, frame: bytes) -> bool:
        """Take a prepared frame for writing if the connection can take it; else ``False``.

        Frames taken in one turn of the event loop leave in one write at its end: a burst of
        publications costs each member one system call, not one per message. Past 256 frames or
        64 KiB they are written at once, so that the transport pauses (and this refuses more)
        as soon as its buffer passes its high-water mark: the buffer then holds at most the
        high-water mark, 64 KiB and one frame.
        """
        ws = self._ws
        if ws.state is not OPEN or not ws.writable:
            return False
        corked = self._corked
        if corked is None:
            corked = self._corked = []
            self._corked_size = 0
            self.loop.call_soon(self._uncork)
        corked.append(frame)
        self._corked_size += len(frame)
        if len(corked) > _CORK_LIMIT or self._corked_size >= _CORK_BYTES:
            self._uncork()
        return True

    def buffered(self) -> int:
        """Bytes taken for writing that the kernel has not taken yet."""
        if self._ws.state is CLOSED:
            return 0
        corked = self._corked_size if self._corked is not None else 0
        return self.transport.get_write_buffer_size() + corked

    async def send_frame(self, frame: bytes) -> None:
        """Write a prepared frame once the transport is under its high-water mark."""
        ws = self._ws
        if not ws.writable and ws.state is OPEN:
            await self._wait_writable()
        if ws.state is not OPEN:
            raise ClientDisconnected()
        self._out(frame)

    def _uncork(self) -> None:
        # Frames are corked only while OPEN, and every close writes through _out first, so
        # what is corked always goes out before the connection's close frame.
        corked = self._corked
        if corked is not None:
            self._corked = None
            self._corked_size = 0
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _out(self, data: bytes) -> None:
        """Write after whatever frames are corked, keeping the order they were taken in."""
        if self._corked is not None:
            self._uncork()
        self.transport.write(data)

    def _flush(self) -> None:
        """Write what the connection's state produced (pongs, pings, close frames)."""
        for data in self._ws.data_to_send():
            self._out(data)

    async def _wait_writable(self) -> None:
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self.loop.create_future()
        # shield: one cancelled sender must not cancel the wait of the others.
        await asyncio.shield(waiter)

    def _wake_writers(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    # -- closing -------------------------------------------------------------------------

    def _write_close(self, code: int, reason: str) -> None:
        """Start the closing handshake: our close frame, after whatever frames are corked."""
        self._ws.send_close(code, reason)
        self._flush()

    def _begin_close(self, code: int, reason: str) -> None:
        """Send our close frame and give the peer ``close timeout`` seconds to answer."""
        self._write_close(code, reason)
        self._await_close()

    def _await_close(self) -> None:
        """Our close frame is out: wait for the peer's, at most ``close_timeout`` seconds."""
        self._stop_keepalive()
        self._close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
        if self._read_paused:
            # Reading paused for an app that is behind (or gone): the peer's close frame must
            # still be read, and nothing read from now on is delivered.
            self.loop.call_soon(self._parse)

    # -- reading -------------------------------------------------------------------------

    def _deliver(self, event: dict[str, Any]) -> None:
        self._inbox.append(event)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _parse(self) -> None:
        ws = self._ws
        inbox = self._inbox
        # Once closing, frames are read to find the peer's close and are not delivered, so
        # the app being behind no longer holds reading back.
        while ws.state is CLOSING or (ws.state is OPEN and len(inbox) < _INBOX_LIMIT):
            event = ws.next_event()
            if event is None:
                break
            # A message: what _deliver does, inline on the hot path.
            if type(event) is str:
                inbox.append({"type": "websocket.receive", "text": event})
            elif type(event) is bytes:
                inbox.append({"type": "websocket.receive", "bytes": event})
            else:
                self._handle(event)
                continue
            waiter = self._recv_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        # Backpressure: stop reading while the app is behind. With room in the inbox every
        # complete frame has been parsed, so the buffer holds at most one partial frame, which
        # the reader bounds by the size limit.
        behind = len(inbox) >= _INBOX_LIMIT and ws.state is OPEN
        if behind and not self._read_paused and ws.state is not CLOSED:
            self._read_paused = True
            self.transport.pause_reading()
        elif not behind and self._read_paused and ws.state is not CLOSED:
            self._read_paused = False
            self.transport.resume_reading()

    def _handle(self, event: Event) -> None:
        """Act on an event of the connection's state other than a message."""
        if event is REPLY:
            self._flush()
        elif event is PONG:
            self._keepalive()
        elif isinstance(event, CloseReceived):
            if event.echoed:
                self._deliver(
                    {"type": "websocket.disconnect", "code": event.code, "reason": event.reason}
                )
                self._flush()
            # The closing handshake is over: the server closes TCP first (section 7.1.1).
            self._cancel_timers()
            self.transport.close()
        elif isinstance(event, Failure):
            # The peer broke the protocol (section 7.1.7): one log line, then close.
            if event.first:
                logger.info("%s WebSocket closed %d: %s", self._peer(), event.code, event.reason)
                if event.sent_close:
                    self._deliver(
                        {"type": "websocket.disconnect", "code": event.code, "reason": event.reason}
                    )
                    self._flush()
                    self._await_close()
                    # Half-close after our close frame: the peer sees the end at once (Autobahn
                    # 7.3.6: a peer whose own close was malformed will not send another), while
                    # we can still read its close frame. The close timer bounds the rest.
                    if self.transport.can_write_eof():
                        self.transport.write_eof()
            if event.drop:
                # The stream cannot be parsed past this point: close without waiting.
                self.transport.close()

    # -- keepalive -----------------------------------------------------------------------

    def _keepalive(self) -> None:
        """Run the keepalive clock: on its timer, and when the peer answers our ping."""
        if self._ws.keepalive(self.loop.time()):
            logger.info("%s WebSocket closed %d: no pong in time", self._peer(), 1011)
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.INTERNAL_ERROR})
            self._flush()
            self._cancel_timers()
            # The peer is unresponsive: do not wait for its buffers to drain.
            self.transport.abort()
            return
        self._flush()
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        """Set the keepalive timer for the connection's next keepalive deadline, if any."""
        self._stop_keepalive()
        at = self._ws.keepalive_at
        if at is not None:
            self._keepalive_timer = self.loop.call_at(at, self._keepalive)

    def _stop_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _cancel_timers(self) -> None:
        self._stop_keepalive()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None


def protocol_class(close_timeout: float) -> type[RoomcastWebSocketProtocol]:
    """:class:`RoomcastWebSocketProtocol` with roomcast's settings, for ``uvicorn.Config(ws=)``."""
    return type(
        "RoomcastWebSocketProtocol",
        (RoomcastWebSocketProtocol,),
        {"__slots__": (), "close_timeout": close_timeout, "__module__": __name__},
    )
