"""One client connection on a classic endpoint, spoken in raw ASGI.

The classic endpoints talk to the ASGI server directly instead of through Starlette's
``WebSocket`` wrapper: each message is one ``receive()`` or ``send()`` of the server, with the
checks roomcast needs (frame type, size) and nothing else on the per-message path.

A :class:`Connection` never raises for a peer that went away: receiving returns ``None`` and
sending returns ``False``, so handlers end by falling out of their loop, not through an
exception and a traceback.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any, NewType
from urllib.parse import parse_qsl

from starlette.types import Message, Receive, Scope, Send

from roomcast.closecodes import CloseCode
from roomcast.errors import ClientError, MessageTooBig, RateLimited, UnsupportedData
from roomcast.logs import log_safe

__all__ = ["ConnId", "Connection", "redacted_path"]

logger = logging.getLogger("roomcast.connection")

#: A connection's id: short, unique within the process, present in every log line about it.
ConnId = NewType("ConnId", str)

_ids = itertools.count(1)


def redacted_path(scope: Scope) -> str:
    """The request path for logs: query string left out (it may hold a token), control
    characters percent-encoded."""
    return log_safe(scope.get("path", ""))


class Connection:
    """An accepted (or about to be accepted) WebSocket on a classic endpoint."""

    __slots__ = (
        "_allowance",
        "_burst",
        "_rate",
        "_receive",
        "_send",
        "_stamp",
        "close_code",
        "closed",
        "endpoint",
        "id",
        "max_size",
        "opened",
        "path",
        "received",
        "received_bytes",
        "refused",
        "scope",
        "sent",
        "sent_bytes",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        max_size: int,
        rate: float = 0.0,
        burst: int = 1,
        endpoint: str = "",
    ) -> None:
        self.scope = scope
        #: The route's path template (the metrics' endpoint label).
        self.endpoint = endpoint
        #: True once accepted. Messages received and sent (direct sends, not fan-out) and their
        #: payload sizes (characters for text): plain ints that roomcast.metrics reads.
        self.opened = False
        self.received = 0
        self.received_bytes = 0
        self.sent = 0
        self.sent_bytes = 0
        # A token bucket: ``rate`` messages per second, ``burst`` at once; rate 0: no limit.
        self._rate = rate
        self._burst = float(burst)
        self._allowance = float(burst)
        self._stamp = 0.0
        #: Messages refused since the bucket was last full.
        self.refused = 0
        self._receive = receive
        self._send = send
        self.max_size = max_size
        self.id = ConnId(f"{next(_ids):x}")
        self.path = redacted_path(scope)
        #: True once a close frame was sent or the peer disconnected.
        self.closed = False
        #: The close code seen when the connection ended (sent or received).
        self.close_code: int | None = None

    # -- handshake ------------------------------------------------------------------------

    def query(self) -> dict[str, str]:
        """The query string's parameters (the last value wins for a repeated name)."""
        raw: bytes = self.scope.get("query_string", b"")
        return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))

    async def accept(
        self, headers: Iterable[tuple[bytes, bytes]] = (), subprotocol: str | None = None
    ) -> bool:
        """Complete the handshake; ``False`` if the client left before it completed."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self.closed = True
            return False
        accept: dict[str, Any] = {"type": "websocket.accept", "headers": list(headers)}
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        try:
            await self._send(accept)
        except OSError:
            self.closed = True
            return False
        self._stamp = time.monotonic()
        self.opened = True
        return True

    async def accept_and_close(self, code: CloseCode, reason: str) -> None:
        """Complete the handshake only to close at once: a browser can read the reason."""
        if not await self.accept():
            return
        logger.info("conn=%s %s refused %d: %s", self.id, self.path, code, reason)
        await self.close(code, reason)

    async def deny(self, reason: str) -> None:
        """Refuse the handshake: the client gets HTTP 403 and the WebSocket never opens.

        A close before accept is the one refusal every ASGI server supports (ASGI spec,
        ``websocket.close`` while connecting). Custom statuses through the
        ``websocket.http.response`` extension would be nicer, but uvicorn's websockets-sansio
        protocol logs an ERROR for each one, which a client could flood.
        """
        self.closed = True
        self.close_code = int(CloseCode.POLICY_VIOLATION)
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return
        try:
            await self._send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
        except OSError:
            return
        logger.info("conn=%s %s refused with HTTP 403: %s", self.id, self.path, reason)

    # -- receiving ------------------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        """The next message, text or bytes; ``None`` once the peer has disconnected.

        Raises :class:`MessageTooBig` for a message over :attr:`max_size` bytes. The ASGI
        server usually enforces the limit itself (uvicorn's ``ws_max_size``, closing with 1009
        before the message is even assembled); this check covers servers configured otherwise.
        """
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text: str | None = message.get("text")
            self.received += 1
            if text is not None:
                self.received_bytes += len(text)
                # len(text) <= len(utf-8 bytes) <= 4 * len(text): encode only when in doubt.
                if len(text) * 4 > self.max_size and len(text.encode()) > self.max_size:
                    raise MessageTooBig(f"message over {self.max_size} bytes")
                if self._rate and not self._admit():
                    raise RateLimited(f"over {self._rate:g} messages per second", text)
                return text
            data: bytes = message.get("bytes") or b""
            self.received_bytes += len(data)
            if len(data) > self.max_size:
                raise MessageTooBig(f"message over {self.max_size} bytes")
            if self._rate and not self._admit():
                raise RateLimited(f"over {self._rate:g} messages per second", data)
            return data
        self._disconnected(message)
        return None

    def _admit(self) -> bool:
        """Take a token from the bucket; ``False`` (and one more refusal) if it is empty."""
        now = time.monotonic()
        allowance = self._allowance + (now - self._stamp) * self._rate
        self._stamp = now
        if allowance >= self._burst:
            allowance = self._burst
            self.refused = 0
        if allowance >= 1.0:
            self._allowance = allowance - 1.0
            return True
        self._allowance = allowance
        self.refused += 1
        return False

    async def receive_text(self) -> str | None:
        """The next text message; ``None`` after a disconnect. A binary frame is an error."""
        data = await self.receive()
        if isinstance(data, bytes):
            raise UnsupportedData(f"{self.path} takes text frames, not binary")
        return data

    async def receive_bytes(self) -> bytes | None:
        """The next binary message; ``None`` after a disconnect. A text frame is an error."""
        data = await self.receive()
        if isinstance(data, str):
            raise UnsupportedData(f"{self.path} takes binary frames, not text")
        return data

    def _disconnected(self, message: Message) -> None:
        self.closed = True
        code = message.get("code")
        if code is not None and self.close_code is None:
            self.close_code = int(code)
            if code == CloseCode.MESSAGE_TOO_BIG:
                # The ASGI server cut an oversize message before the app saw it.
                logger.info(
                    "conn=%s %s closed %d: message over %d bytes",
                    self.id,
                    self.path,
                    code,
                    self.max_size,
                )

    # -- sending --------------------------------------------------------------------------

    async def send_text(self, text: str) -> bool:
        """Send a text message; ``False`` if the peer is gone."""
        self.sent += 1
        self.sent_bytes += len(text)
        return await self.send_message({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> bool:
        """Send a binary message; ``False`` if the peer is gone."""
        self.sent += 1
        self.sent_bytes += len(data)
        return await self.send_message({"type": "websocket.send", "bytes": data})

    async def send_message(self, message: dict[str, Any]) -> bool:
        """Send a prepared ASGI ``websocket.send`` message (shared by a broadcast's members)."""
        if self.closed:
            return False
        try:
            await self._send(message)
        except OSError:
            # uvicorn raises ClientDisconnected (an OSError) for a peer that is gone.
            self.closed = True
            return False
        except RuntimeError:
            # The ASGI server closed the connection itself (e.g. 1009 for an oversize
            # message) while this send was queued: uvicorn's protocols raise RuntimeError.
            self.closed = True
            return False
        return True

    async def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Send a close frame, once; a peer that is already gone is not an error."""
        if self.closed:
            return
        self.closed = True
        self.close_code = int(code)
        try:
            await self._send({"type": "websocket.close", "code": int(code), "reason": reason})
        except (OSError, RuntimeError):  # gone, or already closed by the ASGI server
            return

    async def fail(self, error: ClientError) -> None:
        """End the connection for a client error, with one log line and no traceback."""
        logger.info("conn=%s %s closed %d: %s", self.id, self.path, error.close_code, error.reason)
        await self.close(error.close_code, error.reason)
