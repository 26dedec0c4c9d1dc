"""Sans-I/O WebSocket connection state (RFC 6455 sections 5.5 and 7), server side.

:class:`ConnectionState` is one connection after its request head was read, in the manner of
python-websockets' ``protocol.py``: no socket, no event loop, no clock, no timer. The asyncio
protocol (:mod:`roomcast.transport.protocol`) feeds it the bytes it reads
(:meth:`~ConnectionState.receive_data`), takes events from it (:meth:`~ConnectionState.next_event`),
writes the bytes it produces (:meth:`~ConnectionState.data_to_send`), and tells it when the
transport is full (:meth:`~ConnectionState.pause_writing`) and what time it is
(:meth:`~ConnectionState.keepalive`). Framing is :class:`~roomcast.transport.frames.FrameReader`,
messages are :class:`~roomcast.transport.messages.MessageAssembler`; this module decides what
each frame does to the connection::

    CONNECTING --accept()--> OPEN --send_close(), failure--> CLOSING --peer's close--> CLOSED
                               `--peer's close, no pong in time---------------------^
    any state --abort() (handshake refused, TCP connection gone)--> CLOSED

:meth:`~ConnectionState.next_event` returns, one at a time:

- ``str`` or ``bytes``: a whole message for the app (only while OPEN);
- :data:`REPLY`: a pong is waiting in :meth:`~ConnectionState.data_to_send`;
- :data:`PONG`: the pong to our keepalive ping came: call :meth:`~ConnectionState.keepalive`;
- :class:`CloseReceived`: the peer's close frame: the closing handshake is over (CLOSED);
- :class:`Failure`: the peer broke the protocol (section 7.1.7);
- ``None``: nothing more until more bytes arrive (or the connection cannot read any more).

Safety, each tied to a test: invalid UTF-8 fails the connection with 1007 (one failure reported,
however many broken frames follow); a message's size is bounded in total, however it is
fragmented; compressed data is inflated only up to the size limit (no deflate bomb); pongs for a
peer that does not read them are not queued.
"""

from __future__ import annotations

import enum
import random
import struct
from dataclasses import dataclass
from typing import Final

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from roomcast.closecodes import CloseCode
from roomcast.transport.frames import (
    FIN,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    RSV1,
    RSV_ALL,
    FrameReader,
    WebSocketProtocolError,
    build_close_payload,
    build_frame,
    parse_close_payload,
)
from roomcast.transport.messages import MessageAssembler

__all__ = [
    "CLOSED",
    "CLOSING",
    "CONNECTING",
    "OPEN",
    "PONG",
    "REPLY",
    "CloseReceived",
    "ConnectionState",
    "Event",
    "Failure",
    "Signal",
    "State",
]


class State(enum.IntEnum):
    """Where a connection is in its life (RFC 6455 sections 4 and 7)."""

    #: The request head was read; the app has not accepted (or refused) yet.
    CONNECTING = 0
    OPEN = 1
    #: Our close frame is sent; waiting for the peer's.
    CLOSING = 2
    CLOSED = 3


CONNECTING: Final = State.CONNECTING
OPEN: Final = State.OPEN
CLOSING: Final = State.CLOSING
CLOSED: Final = State.CLOSED


class Signal(enum.Enum):
    """An event that carries nothing but its meaning."""

    #: A pong is waiting in :meth:`ConnectionState.data_to_send`: write it before reading on,
    #: so that the transport's high-water mark is met as soon as a peer stops reading.
    REPLY = "reply"
    #: The pong to our keepalive ping arrived: call :meth:`ConnectionState.keepalive` now, which
    #: schedules the next ping.
    PONG = "pong"


REPLY: Final = Signal.REPLY
PONG: Final = Signal.PONG


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's close frame (section 5.5.1): the connection is CLOSED.

    The server closes the TCP connection first (section 7.1.1), at once.
    """

    code: int
    reason: str
    #: The connection was open: our echo of the close is waiting in
    #: :meth:`ConnectionState.data_to_send`, and the app must be told.
    echoed: bool


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke the protocol: the connection is failed with :attr:`code` (section 7.1.7).

    Only the first failure is reported with ``first`` set: the data frames that follow it are
    dropped unread, so a flood of broken frames costs one log line, not one per frame. Frames
    are still read to find the peer's close frame.
    """

    code: CloseCode
    reason: str
    #: The connection's first failure: the one worth a log line.
    first: bool
    #: The connection was open: our close frame is waiting in
    #: :meth:`ConnectionState.data_to_send`, the app must be told, and the peer gets the close
    #: timeout to answer. The TCP connection may be half-closed after the close frame: a peer
    #: whose own close was malformed will not send another (Autobahn 7.3.6).
    sent_close: bool
    #: Close the TCP connection now, without waiting for the peer's close: the stream cannot be
    #: parsed past this point, or the peer's close frame itself was malformed.
    drop: bool


#: What :meth:`ConnectionState.next_event` returns besides ``None``.
Event = str | bytes | Signal | CloseReceived | Failure

#: Control opcodes: RSV1 (compression) is never allowed on them (RFC 7692 section 6.1).
_NO_RSV1: Final = (OP_CONT, OP_CLOSE, OP_PING, OP_PONG)

#: A timer may fire up to its clock's resolution before its deadline (libuv counts whole
#: milliseconds): a deadline that close counts as reached, so the caller's timer, set for the
#: deadline, never has to be set again for the same one.
_CLOCK_SLACK: Final = 0.001

# Keepalive phases.
_KA_OFF: Final = 0  # no keepalive (not configured, or the connection is not open)
_KA_PING: Final = 1  # keepalive_at: the next ping is due
_KA_PONG: Final = 2  # keepalive_at: the pong to our ping is due
_KA_PONGED: Final = 3  # the pong came; the next ping is scheduled at the next keepalive()


def _close_frame(code: int, reason: str) -> bytes:
    # 1005 means "no status": a close frame without a payload (section 7.1.5).
    payload = b"" if code == CloseCode.NO_STATUS else build_close_payload(code, reason)
    return build_frame(OP_CLOSE, payload)


class ConnectionState:
    """One server-side WebSocket connection: its state, and what each frame does to it.

    ``max_size`` bounds a frame and a message (section 10.4). ``ping_interval`` (seconds, or
    ``None``/0 for no keepalive) is how long after the last pong the next ping goes out, and
    ``ping_timeout`` (``None``/0: no deadline) how long its pong may take.
    """

    __slots__ = (
        "_broken",
        "_deflate",
        "_failed",
        "_keepalive_phase",
        "_messages",
        "_ping_interval",
        "_ping_payload",
        "_ping_timeout",
        "_pong_due",
        "_reader",
        "_writes",
        "keepalive_at",
        "state",
        "writable",
    )

    def __init__(
        self,
        max_size: int,
        *,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        #: Where the connection is; see :class:`State`.
        self.state = CONNECTING
        #: ``False`` while the transport is over its high-water mark (:meth:`pause_writing`).
        self.writable = True
        #: When :meth:`keepalive` must be called next (the caller's clock), or ``None``.
        self.keepalive_at: float | None = None
        self._ping_interval = ping_interval or 0.0
        self._ping_timeout = ping_timeout or 0.0
        self._keepalive_phase = _KA_OFF
        self._ping_payload = b""
        self._reader = FrameReader(max_size)
        self._messages = MessageAssembler(max_size)
        self._deflate: PerMessageDeflate | None = None
        self._writes: list[bytes] = []
        #: The payload of the latest ping not answered yet (the transport was full).
        self._pong_due: bytes | None = None
        #: Set by the first protocol failure (:meth:`_fail`).
        self._failed = False
        #: Set when the frame stream cannot be parsed any further.
        self._broken = False

    # -- the opening handshake and the end ------------------------------------------------

    def accept(self, now: float, deflate: PerMessageDeflate | None = None) -> None:
        """The app accepted the connection: OPEN, with the negotiated permessage-deflate.

        ``now`` starts the keepalive clock: the first ping is due ``ping_interval`` later.
        """
        if self.state is not CONNECTING:
            raise RuntimeError(f"cannot accept a connection that is {self.state.name}")
        self.state = OPEN
        self._deflate = self._messages.deflate = deflate
        if self._ping_interval:
            self._keepalive_phase = _KA_PING
            self.keepalive_at = now + self._ping_interval

    def abort(self) -> None:
        """CLOSED without a closing handshake: the handshake was refused, or TCP is gone."""
        self.state = CLOSED
        self._stop_keepalive()

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the network; then call :meth:`next_event` for what they mean.

        Bytes that arrive before the connection is open are kept until it is.
        """
        self._reader.feed(data)

    @property
    def unparsed(self) -> int:
        """Bytes received and not yet parsed into frames."""
        return self._reader.buffered

    def next_event(self) -> Event | None:
        """The next event the bytes received so far make, or ``None``.

        Frames are read only while the connection is OPEN or CLOSING. While CLOSING, data
        frames are checked for their place in the stream and dropped: only the peer's close
        frame matters then. After any event but a message, :meth:`data_to_send` may hold bytes.
        """
        state = self.state
        if state is OPEN:
            keep = True
        elif state is CLOSING:
            keep = False
        else:
            return None
        reader = self._reader
        while True:
            try:
                frame = reader.next_frame()
            except WebSocketProtocolError as error:
                if self._broken:
                    return None
                self._broken = True
                return self._fail(error.code, error.reason, drop=True)
            if frame is None:
                return None
            first, payload = frame
            opcode = first & 0x0F
            event: Event | None
            if first & RSV_ALL and (
                first & RSV_ALL != RSV1 or self._deflate is None or opcode in _NO_RSV1
            ):
                event = self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            elif opcode >= OP_CLOSE:
                event = self._control(opcode, first, payload)
            elif self._failed:
                continue  # the stream is broken: only the peer's close frame matters now
            else:
                try:
                    message = self._messages.frame(first, payload, keep=keep)
                except WebSocketProtocolError as error:
                    event = self._fail(error.code, error.reason)
                else:
                    if message is None:
                        continue
                    return message
            if event is not None:
                return event

    def _control(self, opcode: int, first: int, payload: bytes) -> Event | None:
        if not first & FIN or len(payload) > 125:
            return self._fail(CloseCode.PROTOCOL_ERROR, "control frames must be whole and short")
        if opcode == OP_PING:
            return self._answer_ping(payload)
        if opcode == OP_PONG:
            if self._keepalive_phase == _KA_PONG and payload == self._ping_payload:
                self._keepalive_phase = _KA_PONGED
                self.keepalive_at = None
                return PONG
            return None  # unsolicited (section 5.5.3), or not ours
        if opcode == OP_CLOSE:
            return self._close_received(payload)
        return self._fail(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")

    def _answer_ping(self, payload: bytes) -> Signal | None:
        """Pong now, or once the transport drains if it is full (RFC 6455 section 5.5.3).

        A peer that sends pings and reads nothing would otherwise fill the transport's buffer
        with pongs without bound. While the buffer is over its high-water mark only the latest
        ping's payload is kept, and answered on :meth:`resume_writing`: section 5.5.3 allows
        answering only the most recently processed ping. A closing connection answers none.
        """
        if self.state is not OPEN:
            return None
        if self.writable:
            self._writes.append(build_frame(OP_PONG, payload))
            return REPLY
        self._pong_due = payload
        return None

    def _close_received(self, payload: bytes) -> CloseReceived | Failure | None:
        try:
            code, reason = parse_close_payload(payload)
        except WebSocketProtocolError as error:
            return self._fail(error.code, error.reason, drop=True)
        echoed = self.state is OPEN
        if echoed:
            # Echo the code (section 5.5.1); the reason is the peer's to give, not ours.
            self._writes.append(_close_frame(code, ""))
        self.state = CLOSED
        self._stop_keepalive()
        return CloseReceived(code, reason, echoed)

    def _fail(self, code: CloseCode, reason: str, *, drop: bool = False) -> Failure | None:
        """Fail the connection (section 7.1.7): our close frame if open, then CLOSING.

        After the first failure only a failure that must drop the TCP connection is reported.
        """
        if self._failed:
            return Failure(code, reason, first=False, sent_close=False, drop=True) if drop else None
        self._failed = True
        sent_close = self.state is OPEN
        if sent_close:
            self._writes.append(_close_frame(code, reason))
            self.state = CLOSING
            self._stop_keepalive()
        self._messages.reset()
        return Failure(code, reason, first=True, sent_close=sent_close, drop=drop)

    # -- sending ---------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The bytes to write, in order; call after any event but a message, and after any of
        :meth:`send_close`, :meth:`keepalive` and :meth:`resume_writing`."""
        writes, self._writes = self._writes, []
        return writes

    def data_frame(self, opcode: int, payload: bytes) -> bytes:
        """The frame that carries one message of the app's (OPEN only), ready to write.

        Compressed when permessage-deflate was negotiated; its context carries over from one
        message to the next, so the frames must be written in the order they are made.
        """
        deflate = self._deflate
        if deflate is not None and payload:
            frame = deflate.encode(Frame(Opcode(opcode), payload))
            return build_frame(opcode, bytes(frame.data), rsv1=frame.rsv1)
        return build_frame(opcode, payload)

    def send_close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (section 7.1.2): our close frame, then CLOSING.

        Code 1005 sends a close frame without a payload.
        """
        if self.state is not OPEN:
            raise RuntimeError(f"cannot close a connection that is {self.state.name}")
        self._writes.append(_close_frame(code, reason))
        self.state = CLOSING
        self._stop_keepalive()

    # -- flow control ----------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport is over its high-water mark: hold pongs back."""
        self.writable = False

    def resume_writing(self) -> None:
        """The transport drained: the latest ping held back is answered now (if still OPEN)."""
        self.writable = True
        pong = self._pong_due
        if pong is not None:
            self._pong_due = None
            if self.state is OPEN:
                self._writes.append(build_frame(OP_PONG, pong))

    # -- keepalive -------------------------------------------------------------------------

    def keepalive(self, now: float) -> bool:
        """Run the keepalive clock at ``now``: ping when one is due; ``True`` if the peer is dead.

        Call it at :attr:`keepalive_at` and on the :data:`PONG` event. A ping goes out
        ``ping_interval`` after the connection opened or the previous pong came (or after the
        previous ping, with no ``ping_timeout``). A peer whose pong has not come
        ``ping_timeout`` after our ping is dead: our close frame (1011) is waiting in
        :meth:`data_to_send`, the connection is CLOSED, and the TCP connection should be
        dropped without waiting for its buffers to drain.
        """
        phase = self._keepalive_phase
        if phase == _KA_OFF or self.state is not OPEN:
            return False
        if phase == _KA_PONGED:
            self._keepalive_phase = _KA_PING
            self.keepalive_at = now + self._ping_interval
            return False
        due = self.keepalive_at
        if due is None or now < due - _CLOCK_SLACK:
            return False
        if phase == _KA_PONG:
            self._writes.append(_close_frame(CloseCode.INTERNAL_ERROR, "keepalive ping timeout"))
            self.state = CLOSED
            self._stop_keepalive()
            return True
        # A fresh payload each time, so a late pong to an earlier ping does not count.
        self._ping_payload = struct.pack("!I", random.getrandbits(32))
        self._writes.append(build_frame(OP_PING, self._ping_payload))
        if self._ping_timeout:
            self._keepalive_phase = _KA_PONG
            self.keepalive_at = now + self._ping_timeout
        else:
            self.keepalive_at = now + self._ping_interval
        return False

    def _stop_keepalive(self) -> None:
        self._keepalive_phase = _KA_OFF
        self.keepalive_at = None
