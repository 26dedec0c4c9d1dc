"""uvicorn's httptools protocol with a deadline on the request head (slow-handshake guard).

uvicorn times out idle keep-alive connections, but not a client that sends its request line
and headers one byte every few seconds: each such client holds a socket and a parser forever.
Every request head, the WebSocket upgrade included, must now be complete within
``head_timeout`` seconds of its first byte (or of the connection, for the first request).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = ["HeadTimeoutHttpProtocol", "http_protocol_class"]

logger = logging.getLogger("roomcast.transport")


class HeadTimeoutHttpProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that drops a connection whose request head is too slow."""

    #: Seconds a request head may take; :func:`http_protocol_class` sets the configured value.
    head_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            logger.info("%s dropped: request head not complete in %gs", client, self.head_timeout)
            self.transport.abort()


def http_protocol_class(head_timeout: float) -> type[HeadTimeoutHttpProtocol]:
    """:class:`HeadTimeoutHttpProtocol` with the configured deadline."""
    return type(
        "HeadTimeoutHttpProtocol",
        (HeadTimeoutHttpProtocol,),
        {"head_timeout": head_timeout, "__module__": __name__},
    )
