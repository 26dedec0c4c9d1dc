"""roomcast's WebSocket protocol for uvicorn: full ASGI, plus pre-framed broadcast writes.

uvicorn hands an upgrade request to the class named by its ``ws`` setting;
``roomcast serve`` names :class:`RoomcastWebSocketProtocol`. Framing and the handshake are the
sans-I/O modules beside this one; this module moves bytes between them, the transport and the
ASGI app.

Beyond plain ASGI it advertises the ``roomcast.frames`` extension in ``scope["extensions"]``:

- ``write(frame) -> bool`` writes an already built frame now, if the connection is open and its
  transport is under its high-water mark; ``False`` means "queue it and use ``send``".
- ``send(frame)`` (a coroutine) waits until the transport can take more, then writes.
- ``buffered() -> int``: bytes taken and not yet handed to the kernel (the transport's write
  buffer and the frames corked this turn), which the hub counts against a connection's bound.

A broadcast builds one frame and hands the same bytes to every member (server frames are not
masked, RFC 6455 section 5.1), instead of one ASGI message, one encode and one frame per member.

Safety, each tied to a test: invalid UTF-8 ends the connection with 1007 and one log line; a
message's size is bounded in total, however it is fragmented (each continuation frame counts,
empty ones too); compressed data is inflated only up to the size limit (no deflate bomb); pongs
for a peer that does not read them are not queued; the closing handshake is bounded by a timer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import deque
from typing import Any, ClassVar, Final
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode

from roomcast.closecodes import CloseCode
from roomcast.logs import log_safe
from roomcast.transport.frames import (
    FIN,
    FRAMES_EXTENSION,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV_ALL,
    FrameReader,
    WebSocketProtocolError,
    build_close_payload,
    build_frame,
    parse_close_payload,
)
from roomcast.transport.handshake import (
    MAX_HEAD,
    HandshakeError,
    build_accept_response,
    build_http_response,
    negotiate_deflate,
    parse_upgrade_request,
)
from roomcast.transport.messages import MessageAssembler

__all__ = ["FRAMES_EXTENSION", "RoomcastWebSocketProtocol", "protocol_class"]

logger = logging.getLogger("roomcast.transport")
access_logger = logging.getLogger("uvicorn.error")

# Connection states.
_HANDSHAKE: Final = 0  # waiting for the request head
_CONNECTING: Final = 1  # app running, not accepted yet
_OPEN: Final = 2
_CLOSING: Final = 3  # our close frame is sent; waiting for the peer's
_CLOSED: Final = 4

#: Control opcodes: RSV1 (compression) is never allowed on them (RFC 7692 section 6.1).
_CONTROL: Final = (OP_CLOSE, OP_PING, OP_PONG)
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
        "_app_task",
        "_close_timer",
        "_corked",
        "_corked_size",
        "_deflate",
        "_denial",
        "_drain_waiter",
        "_ext_header",
        "_failed",
        "_frames_ext",
        "_head",
        "_inbox",
        "_messages",
        "_ping_payload",
        "_ping_timer",
        "_pong_due",
        "_pong_timer",
        "_read_paused",
        "_reader",
        "_recv_waiter",
        "_request_key",
        "_state",
        "_writable",
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
        self._state = _HANDSHAKE
        self._head = b""
        self._request_key = b""
        self._reader = FrameReader(config.ws_max_size)
        self._inbox: deque[dict[str, Any]] = deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writable = True
        self._read_paused = False
        self._deflate: PerMessageDeflate | None = None
        self._ext_header: str | None = None
        self._denial: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None
        self._messages = MessageAssembler(config.ws_max_size)
        self._app_task: asyncio.Task[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload = b""
        self._frames_ext: dict[str, Any] | None = None
        self._corked: list[bytes] | None = None
        self._corked_size = 0
        #: The payload of the latest ping not answered yet (the transport was full).
        self._pong_due: bytes | None = None
        #: Set by the first protocol failure (:meth:`_fail`).
        self._failed = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)  # type: ignore[arg-type]
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        was = self._state
        self._state = _CLOSED
        self._corked = None
        self._cancel_timers()
        if was in (_CONNECTING, _OPEN):
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
        self._wake_writers()
        if self._recv_waiter is not None and not self._recv_waiter.done():
            self._recv_waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        pong = self._pong_due
        if pong is not None:
            self._pong_due = None
            if self._state == _OPEN:
                self._out(build_frame(OP_PONG, pong))
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        if self._state == _HANDSHAKE:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._refuse(HandshakeError(431, "request head too large"))
                return
            head, rest = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._start(head)
            if rest:
                self._reader.feed(rest)
            return
        self._reader.feed(data)
        self._parse()

    # -- uvicorn's server hooks ----------------------------------------------------------

    def shutdown(self) -> None:
        """Server shutdown: close 1012 (service restart) to an open connection."""
        if self._state == _OPEN:
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.SERVICE_RESTART})
            self._write_close(CloseCode.SERVICE_RESTART, "server shutting down")
            self._state = _CLOSING
            self.transport.close()
        elif self._state in (_HANDSHAKE, _CONNECTING):
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
            self.transport.write(build_http_response(503, b"server shutting down"))
            self._state = _CLOSED
            self.transport.close()
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
            # Same parameters as uvicorn's own protocols; broadcasts go uncompressed anyway.
            factory = ServerPerMessageDeflateFactory(
                server_max_window_bits=12,
                client_max_window_bits=12,
                compress_settings={"memLevel": 5},
            )
            negotiated = negotiate_deflate(request.extensions, factory)
            if negotiated is not None:
                self._ext_header, self._deflate = negotiated
                self._messages.deflate = self._deflate
        raw_path, _, query = request.target.partition("?")
        root = self.config.root_path
        self._frames_ext = {
            "write": self.write_frame,
            "send": self.send_frame,
            "buffered": self.buffered,
        }
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
            "extensions": {"websocket.http.response": {}, FRAMES_EXTENSION: self._frames_ext},
        }
        self._state = _CONNECTING
        self._inbox.append({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_asgi())
        self._app_task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(self, error: HandshakeError) -> None:
        logger.info(
            "%s refused WebSocket handshake %d: %s", self._peer(), error.status, error.reason
        )
        self.transport.write(build_http_response(error.status, error.reason.encode()))
        self._state = _CLOSED
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
            if self._state == _CONNECTING:
                access_logger.error("ASGI callable returned without completing handshake.")
                self._abort_app(CloseCode.INTERNAL_ERROR)
            elif result is not None:
                access_logger.error("ASGI callable should return None, but returned %r.", result)
        # An app that returns without closing: close normally (RFC 6455 section 7.1.2).
        if self._state == _OPEN:
            self._begin_close(CloseCode.NORMAL, "")

    def _abort_app(self, code: CloseCode) -> None:
        if self._state == _CONNECTING:
            self.transport.write(build_http_response(500, b"Internal Server Error"))
            self._state = _CLOSED
            self.transport.close()
        elif self._state == _OPEN:
            self._begin_close(code, "")

    async def receive(self) -> dict[str, Any]:
        """ASGI receive: the next event for the app."""
        inbox = self._inbox
        while not inbox:
            if self._state == _CLOSED:
                return {"type": "websocket.disconnect", "code": CloseCode.ABNORMAL}
            waiter = self._recv_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = inbox.popleft()
        if (self._read_paused or self._reader.buffered) and len(inbox) < _INBOX_LIMIT:
            self._parse()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI send."""
        kind = message["type"]
        # A close does not wait for the peer to read what is queued: its close timer bounds
        # it, and a peer that stopped reading must not keep its connection open forever.
        if not self._writable and self._state == _OPEN and kind != "websocket.close":
            await self._wait_writable()
        state = self._state
        if state == _OPEN:
            if kind == "websocket.send":
                data = message.get("bytes")
                if data is not None:
                    self._write_data(OP_BINARY, data)
                else:
                    self._write_data(OP_TEXT, message["text"].encode())
            elif kind == "websocket.close":
                code = message.get("code") or CloseCode.NORMAL
                self._deliver({"type": "websocket.disconnect", "code": code})
                self._begin_close(code, message.get("reason") or "")
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} on an open WebSocket")
        elif state == _CONNECTING:
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
            self._state = _OPEN
            self._log_access("[accepted]")
            self._start_keepalive()
            if self._reader.buffered:
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
                self.transport.write(build_http_response(status, b"".join(body), headers))
                self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
                self._state = _CLOSED
                self.transport.close()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} before the handshake")

    def _refuse_after_app(self, status: int, body: bytes) -> None:
        self.transport.write(build_http_response(status, body))
        self._deliver({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
        self._state = _CLOSED
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
        if self._state != _OPEN or not self._writable:
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
        if self._state == _CLOSED:
            return 0
        corked = self._corked_size if self._corked is not None else 0
        return self.transport.get_write_buffer_size() + corked

    async def send_frame(self, frame: bytes) -> None:
        """Write a prepared frame once the transport is under its high-water mark."""
        if not self._writable and self._state == _OPEN:
            await self._wait_writable()
        if self._state != _OPEN:
            raise ClientDisconnected()
        self._out(frame)

    def _uncork(self) -> None:
        corked = self._corked
        if corked is not None:
            self._corked = None
            self._corked_size = 0
            if self._state != _CLOSED:
                self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _out(self, data: bytes) -> None:
        """Write after whatever frames are corked, keeping the order they were taken in."""
        if self._corked is not None:
            self._uncork()
        self.transport.write(data)

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

    # -- writing -------------------------------------------------------------------------

    def _write_data(self, opcode: int, payload: bytes) -> None:
        deflate = self._deflate
        if deflate is not None and payload:
            frame = deflate.encode(Frame(Opcode(opcode), payload))
            self._out(build_frame(opcode, bytes(frame.data), rsv1=frame.rsv1))
        else:
            self._out(build_frame(opcode, payload))

    def _write_close(self, code: int, reason: str) -> None:
        payload = b"" if code == CloseCode.NO_STATUS else build_close_payload(code, reason)
        self._out(build_frame(OP_CLOSE, payload))

    def _begin_close(self, code: int, reason: str) -> None:
        """Send our close frame and give the peer ``close timeout`` seconds to answer."""
        self._write_close(code, reason)
        self._state = _CLOSING
        self._stop_keepalive()
        self._close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
        if self._read_paused:
            # Reading paused for an app that is behind (or gone): the peer's close frame must
            # still be read, and nothing read from now on is delivered.
            self.loop.call_soon(self._parse)

    def _fail(self, code: CloseCode, reason: str) -> None:
        """The peer broke the protocol: one log line, then close with ``code`` (section 7.1.7).

        Only the first failure counts: the data frames that follow it are dropped unread (see
        :meth:`_frame`), so a flood of broken frames costs one log line, not one per frame.
        """
        if self._failed:
            return
        self._failed = True
        logger.info("%s WebSocket closed %d: %s", self._peer(), code, reason)
        if self._state == _OPEN:
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
            self._begin_close(code, reason)
            # Half-close after our close frame: the peer sees the end at once (Autobahn 7.3.6:
            # a peer whose own close was malformed will not send another), while we can still
            # read its close frame. The close timer bounds the rest.
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self._messages.reset()

    # -- reading -------------------------------------------------------------------------

    def _deliver(self, event: dict[str, Any]) -> None:
        self._inbox.append(event)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _parse(self) -> None:
        reader = self._reader
        inbox = self._inbox
        # Once closing, frames are read to find the peer's close and are not delivered, so
        # the app being behind no longer holds reading back.
        while self._state == _CLOSING or (self._state == _OPEN and len(inbox) < _INBOX_LIMIT):
            try:
                frame = reader.next_frame()
            except WebSocketProtocolError as error:
                # The stream cannot be parsed past this point: close without waiting.
                self._fail(error.code, error.reason)
                self.transport.close()
                return
            if frame is None:
                break
            self._frame(frame[0], frame[1])
        # Backpressure: stop reading while the app is behind. With room in the inbox every
        # complete frame has been parsed, so the buffer holds at most one partial frame, which
        # the reader bounds by the size limit.
        behind = len(inbox) >= _INBOX_LIMIT and self._state == _OPEN
        if behind and not self._read_paused and self._state != _CLOSED:
            self._read_paused = True
            self.transport.pause_reading()
        elif not behind and self._read_paused and self._state != _CLOSED:
            self._read_paused = False
            self.transport.resume_reading()

    def _frame(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if first & RSV_ALL and (
            first & RSV_ALL != RSV1 or self._deflate is None or opcode in (OP_CONT, *_CONTROL)
        ):
            self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            return
        if opcode >= OP_CLOSE:
            if not first & FIN or len(payload) > 125:
                self._fail(CloseCode.PROTOCOL_ERROR, "control frames must be whole and short")
            elif opcode == OP_PING:
                if self._state == _OPEN:
                    self._answer_ping(payload)
            elif opcode == OP_PONG:
                self._pong(payload)
            elif opcode == OP_CLOSE:
                self._peer_close(payload)
            else:
                self._fail(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
            return
        if self._failed:
            return  # the stream is broken: only the peer's close frame matters now
        try:
            message = self._messages.frame(first, payload, keep=self._state == _OPEN)
        except WebSocketProtocolError as error:
            self._fail(error.code, error.reason)
            return
        if message is None:
            return
        if type(message) is str:
            self._deliver({"type": "websocket.receive", "text": message})
        else:
            self._deliver({"type": "websocket.receive", "bytes": message})

    def _answer_ping(self, payload: bytes) -> None:
        """Pong now, or once the transport drains if it is full (RFC 6455 section 5.5.3).

        A peer that sends pings and reads nothing would otherwise fill the transport's buffer
        with pongs without bound. While the buffer is over its high-water mark only the latest
        ping's payload is kept, and answered when the transport resumes: section 5.5.3 allows
        answering only the most recently processed ping.
        """
        if self._writable:
            self._out(build_frame(OP_PONG, payload))
        else:
            self._pong_due = payload

    def _peer_close(self, payload: bytes) -> None:
        try:
            code, reason = parse_close_payload(payload)
        except WebSocketProtocolError as error:
            self._fail(error.code, error.reason)
            self.transport.close()
            return
        if self._state == _OPEN:
            # Echo the close (section 5.5.1), then the server closes TCP first (section 7.1.1).
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
            self._write_close(code, "")
            self._stop_keepalive()
        self._state = _CLOSED
        self._cancel_timers()
        self.transport.close()

    # -- keepalive -----------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self.config.ws_ping_interval
        if interval:
            self._ping_timer = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self._state != _OPEN:
            return
        self._ping_payload = struct.pack("!I", random.getrandbits(32))
        self._out(build_frame(OP_PING, self._ping_payload))
        timeout = self.config.ws_ping_timeout
        if timeout:
            self._pong_timer = self.loop.call_later(timeout, self._pong_missed)
        else:
            self._start_keepalive()

    def _pong(self, payload: bytes) -> None:
        if self._pong_timer is not None and payload == self._ping_payload:
            self._pong_timer.cancel()
            self._pong_timer = None
            self._start_keepalive()

    def _pong_missed(self) -> None:
        self._pong_timer = None
        if self._state == _OPEN:
            logger.info("%s WebSocket closed %d: no pong in time", self._peer(), 1011)
            self._deliver({"type": "websocket.disconnect", "code": CloseCode.INTERNAL_ERROR})
            self._write_close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            self._state = _CLOSED
            self._cancel_timers()
            # The peer is unresponsive: do not wait for its buffers to drain.
            self.transport.abort()

    def _stop_keepalive(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None

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
