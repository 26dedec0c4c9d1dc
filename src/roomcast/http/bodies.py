"""HTTP request bodies: the request head is checked first, then the body is read with bounds.

FastAPI reads a route's body (to fill its pydantic body parameter) *before* it runs the route's
dependencies, so a dependency that checks an API key comes after the whole body is in memory:
a 200 MB ``POST /api/publish`` to a server with the API off was read in full and then answered
422. :class:`BodyGuard`, a pure ASGI middleware in front of the app, does it the other way
round (docs/security.md, "HTTP request bodies"):

1. its *gates* look at the request head only (the API key, whether a route is on, a rate limit)
   and may refuse the request before a byte of its body is read;
2. a ``Content-Length`` over the limit is refused at once with 413;
3. the body is read here, up to the limit (413 as soon as a chunked body passes it) and within
   the body deadline (408), and then handed to the app as one message.

A refusal sent while the client may still be sending its body also closes the connection
(``Connection: close``): the rest of the body is not read, and a client cannot keep the
connection busy by sending it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyGuard", "Gate", "Refusal", "header", "route_path"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP error answer: ``{"detail": ...}`` with ``status`` and extra ``headers``."""

    status: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


#: A check of a request's head (scope): a :class:`Refusal`, or ``None`` to let it through.
Gate = Callable[[Scope], Refusal | None]


#: Methods whose requests are taken to have no body unless they announce one.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class _TooLarge(Exception):
    pass


def header(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of the request (``name`` in lower case), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def route_path(scope: Scope) -> str:
    """The request's path within the app (without the ``root_path`` it is mounted at)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class BodyGuard:
    """Gates on the request head, then a bounded read of the body (see the module docstring).

    ``limit`` is the largest body in bytes, ``timeout`` the seconds the whole body may take to
    arrive. WebSocket connections pass untouched; requests without a body only go through the
    gates.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, timeout: float, gates: Sequence[Gate] = ()
    ) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.gates = tuple(gates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length_header = header(scope, b"content-length")
        chunked = header(scope, b"transfer-encoding") is not None
        announced = chunked or length_header not in (None, "0")
        for gate in self.gates:
            refusal = gate(scope)
            if refusal is not None:
                await self._refuse(scope, receive, send, refusal, unread=announced)
                return
        # HTTP/1.1 announces every body; over HTTP/2 a POST may send one without a length.
        if not announced and (length_header == "0" or scope["method"] in _BODYLESS):
            await self.app(scope, receive, send)
            return
        too_large = Refusal(413, f"the request body is over {self.limit} bytes")
        if length_header is not None and not chunked:
            # (uvicorn's parser already refuses a Content-Length that is not a number.)
            try:
                length = int(length_header)
            except ValueError:
                length = -1
            if length < 0:
                bad = Refusal(400, "Content-Length is not a number")
                await self._refuse(scope, receive, send, bad, unread=True)
                return
            if length > self.limit:
                await self._refuse(scope, receive, send, too_large, unread=True)
                return
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            slow = Refusal(408, f"the request body did not arrive within {self.timeout:g} s")
            await self._refuse(scope, receive, send, slow, unread=True)
            return
        except _TooLarge:
            await self._refuse(scope, receive, send, too_large, unread=True)
            return
        if body is None:
            return  # the client went away

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what comes after the body: http.disconnect

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` if the client disconnected; :class:`_TooLarge` past
        the limit (at most ``limit`` bytes plus one message are ever held)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, refusal: Refusal, *, unread: bool
    ) -> None:
        headers = dict(refusal.headers)
        if unread:
            headers["Connection"] = "close"
        response = JSONResponse(
            {"detail": refusal.detail}, status_code=refusal.status, headers=headers
        )
        await response(scope, receive, send)
