"""Sans-I/O opening handshake (RFC 6455 section 4.2): check the upgrade request, build replies.

The request reaching here was already parsed and re-serialised by uvicorn's HTTP protocol, so
its syntax is sound; what is checked is what makes it a valid WebSocket upgrade.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.headers import build_extension, parse_extension

__all__ = [
    "HandshakeError",
    "UpgradeRequest",
    "accept_key",
    "build_accept_response",
    "build_http_response",
    "negotiate_deflate",
    "parse_upgrade_request",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest request head accepted (request line + headers).
MAX_HEAD: Final = 16 * 1024
#: permessage-deflate with uvicorn's own protocols' parameters; broadcasts go uncompressed
#: anyway. The factory only holds settings: each negotiation makes its own extension.
_DEFLATE: Final = ServerPerMessageDeflateFactory(
    server_max_window_bits=12,
    client_max_window_bits=12,
    compress_settings={"memLevel": 5},
)


class HandshakeError(Exception):
    """The request is not a WebSocket upgrade roomcast can accept; answer with :attr:`status`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class UpgradeRequest:
    """What the server needs from an upgrade request."""

    method: str
    target: str
    #: Header names lower-cased, in request order, as ASGI wants them.
    headers: list[tuple[bytes, bytes]]
    key: bytes
    subprotocols: list[str] = field(default_factory=list)
    extensions: str = ""


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (section 4.2.2, step 5.4)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")}


def parse_upgrade_request(head: bytes) -> UpgradeRequest:
    """Parse and check the request head (everything before the blank line)."""
    lines = head.split(b"\r\n")
    try:
        method, target, _version = lines[0].split(b" ", 2)
    except ValueError:
        raise HandshakeError(400, "malformed request line") from None
    headers: list[tuple[bytes, bytes]] = []
    connection: set[bytes] = set()
    upgrade: set[bytes] = set()
    key = version = b""
    protocols: list[str] = []
    extensions: list[bytes] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise HandshakeError(400, "malformed header line")
        name = name.strip().lower()
        value = value.strip()
        headers.append((name, value))
        if name == b"connection":
            connection |= _tokens(value)
        elif name == b"upgrade":
            upgrade |= _tokens(value)
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"sec-websocket-protocol":
            protocols.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
        elif name == b"sec-websocket-extensions":
            extensions.append(value)
    if method != b"GET":
        raise HandshakeError(405, "a WebSocket handshake is a GET request")
    if b"upgrade" not in connection or b"websocket" not in upgrade:
        raise HandshakeError(426, "missing Connection: Upgrade / Upgrade: websocket")
    if version != b"13":
        raise HandshakeError(426, "Sec-WebSocket-Version must be 13")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    except binascii.Error:
        raise HandshakeError(400, "Sec-WebSocket-Key is not base64") from None
    return UpgradeRequest(
        method=method.decode("latin-1"),
        target=target.decode("latin-1"),
        headers=headers,
        key=key,
        subprotocols=protocols,
        extensions=", ".join(e.decode("latin-1") for e in extensions),
    )


def negotiate_deflate(
    offer: str, factory: ServerPerMessageDeflateFactory = _DEFLATE
) -> tuple[str, PerMessageDeflate] | None:
    """Accept the first acceptable permessage-deflate offer (RFC 7692), if any.

    Returns the response header value and the extension that compresses and decompresses.
    Negotiation rules (window bits, context takeover) are websockets' well-tested ones.
    """
    if not offer:
        return None
    try:
        offers = parse_extension(offer)
    except Exception:  # websockets raises InvalidHeaderFormat; an odd header is no offer
        return None
    for name, params in offers:
        if name != factory.name:
            continue
        try:
            response_params, extension = factory.process_request_params(params, [])
        except Exception:  # NegotiationError: try the client's next offer (RFC 7692 5.1)
            continue
        return build_extension([(name, response_params)]), extension
    return None


def build_accept_response(
    key: bytes,
    subprotocol: str | None,
    extensions: str | None,
    extra_headers: Iterable[tuple[bytes, bytes]],
) -> bytes:
    """The ``101 Switching Protocols`` response."""
    parts = [
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n"
    ]
    if subprotocol:
        parts.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1") + b"\r\n")
    if extensions:
        parts.append(b"Sec-WebSocket-Extensions: " + extensions.encode("latin-1") + b"\r\n")
    for name, value in extra_headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def build_http_response(
    status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete HTTP/1.1 response that ends the connection (a refused handshake)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    names = {name.lower() for name, _ in headers}
    lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")]
    lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
    if b"content-type" not in names:
        lines.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    if b"content-length" not in names:
        lines.append(b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    lines.append(b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n")
    lines.append(b"Connection: close\r\n\r\n")
    return b"".join(lines) + body
