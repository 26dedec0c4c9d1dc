"""HTTP request bodies and guest sign-in under abuse, against in-process servers (both
WebSocket implementations) over raw sockets.

docs/security.md, "HTTP request bodies": a request is authenticated from its head (the API key;
404 while the API or guest sign-in is off) before any of its body is read; a body over
``ROOMCAST_MAX_BODY_SIZE`` is refused with 413 (from ``Content-Length``, or as soon as a chunked
body passes it), and one that takes longer than ``ROOMCAST_BODY_TIMEOUT`` with 408.
docs/security.md, "Guest sign-in": guest user ids carry 64 random bits, and ``POST /auth/guest``
is rate limited per client address (429 with ``Retry-After``).

The bodies are written by hand on a blocking socket, so that a test decides how much of a body
is sent and when: a client that announces 200 MB and sends a few, one that sends a byte now and
then. Each exchange runs in a worker thread (``asyncio.to_thread``) while the server serves in
the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import httpx
import psutil
import pytest
import pytest_asyncio
from starlette.types import Message, Receive, Scope, Send

from helpers import HOST, TIMEOUT, Addressed
from roomcast.http.bodies import BodyGuard
from roomcast.http.web import AddressLimiter
from servers import AppServer, in_server_loop, serve

KEY = "bounds-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096
BODY_TIMEOUT = 1.0
GUEST_RATE, GUEST_BURST = 1, 3
#: Every route that takes a body, and a body it accepts.
BODY_ROUTES: list[tuple[str, dict[str, object]]] = [
    ("/api/publish", {"channel": "bounds:x", "data": 1}),
    ("/api/broadcast", {"channels": ["bounds:x"], "data": 1}),
    ("/api/disconnect", {"user": "nobody"}),
    ("/auth/guest", {"name": "ann"}),
]
BODY_PATHS = [path for path, _ in BODY_ROUTES]
GUESTS_ON = {"guest_channels": ["room:*"]}

T = TypeVar("T")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bounded(ws_impl: str) -> AsyncIterator[AppServer]:
    """The API and guests on, a small body limit and deadline; guest sign-in not rate limited."""
    async with serve(
        ws_impl,
        **GUESTS_ON,
        api_key=KEY,
        max_body_size=LIMIT,
        body_timeout=BODY_TIMEOUT,
        guest_rate=0,
        access_log=False,  # thousands of sign-ins below
    ) as srv:
        yield srv
    assert KEY not in srv.log(), "the API key reached the log"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited(ws_impl: str) -> AsyncIterator[AppServer]:
    """The API and guests on with the default body limit; guest sign-in rate limited."""
    async with serve(
        ws_impl, **GUESTS_ON, api_key=KEY, guest_rate=GUEST_RATE, guest_burst=GUEST_BURST
    ) as srv:
        yield srv


async def in_thread(exchange: Callable[[], T]) -> T:
    """Run a blocking exchange with the server while the server serves."""
    return await asyncio.to_thread(exchange)


# -- HTTP by hand --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Seconds from the end of the request head to the reply's head.
    after: float

    def json(self) -> object:
        return json.loads(self.body)


class RawRequest:
    """One request written by hand: its head at once, its body as the test says."""

    def __init__(
        self, server: Addressed, path: str, headers: Mapping[str, str], source: str = HOST
    ) -> None:
        self.sock = socket.create_connection((HOST, server.port), TIMEOUT, (source, 0))
        lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{server.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.sent_head = time.monotonic()
        self.sent = 0
        self.refused = False

    def send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` once the server has closed the connection."""
        if self.refused:
            return False
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.refused = True
            return False
        self.sent += len(data)
        return True

    def chunk(self, data: bytes) -> bool:
        """One chunk of a ``Transfer-Encoding: chunked`` body (``b""``: the last one)."""
        return self.send(b"%x\r\n%s\r\n" % (len(data), data))

    def reply(self, within: float = TIMEOUT) -> Reply:
        """The server's reply (its head, and a body of ``Content-Length``)."""
        buf = b""
        deadline = time.monotonic() + within
        head_at: float | None = None
        length: int | None = None
        while True:
            if head_at is None and b"\r\n\r\n" in buf:
                head_at = time.monotonic()
                head = buf.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
                found = re.search(r"content-length:\s*(\d+)", "\n".join(head).lower())
                length = int(found.group(1)) if found else 0
            if head_at is not None and length is not None:
                rest = buf.partition(b"\r\n\r\n")[2]
                if len(rest) >= length:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no complete reply within {within:.1f}s (got {buf!r})")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                raise AssertionError(f"connection closed before a complete reply: {buf!r}")
            buf += data
        head_text, _, body = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head_text.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Reply(int(status_line.split()[1]), headers, body[:length], head_at - self.sent_head)

    def closed_by_server(self, within: float = TIMEOUT) -> bool:
        """Whether the server closes the connection (after its reply) within ``within``."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def json_headers(length: int | None = None, **extra: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **extra}
    if length is None:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(length)
    return headers


def body_of(path: str, size: int, channel: str = "bounds:x") -> bytes:
    """A well-formed body for ``path`` of exactly ``size`` bytes (one long string field)."""
    template = json.loads(json.dumps(dict(BODY_ROUTES)[path]).replace("bounds:x", channel))
    field = {"/api/disconnect": "user", "/auth/guest": "name"}.get(path, "data")
    filler = size - len(json.dumps({**template, field: ""}))
    body = json.dumps({**template, field: "x" * filler}).encode()
    assert len(body) == size, (len(body), size)
    return body


def rss() -> int:
    """This process's resident memory: the in-process server's, and the test's (which sends
    one small buffer over and over)."""
    return int(psutil.Process().memory_info().rss)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def history(server: AppServer, channel: str) -> list[object]:
    async with httpx.AsyncClient(base_url=server.http_url, headers=AUTH, timeout=TIMEOUT) as c:
        reply = await c.get(f"/api/history/{channel}")
    assert reply.status_code == 200, reply.text
    publications: list[object] = reply.json()["publications"]
    return publications


# -- authentication before the body --------------------------------------------------------------


@in_server_loop
@pytest.mark.parametrize("path", ["/api/publish", "/auth/guest"])
async def test_off_route_answers_404_without_reading_a_huge_body(
    server: AppServer, path: str
) -> None:
    """The default server: no API key, and guest sign-in off (it has static tokens)."""
    chunk = b"x" * 65536

    def exchange() -> None:
        request = RawRequest(server, path, json_headers(200_000_000))
        try:
            for _ in range(8 * 16):  # 8 MiB of the 200 MB, unless the server closes first
                if not request.send(chunk):
                    break
            reply = request.reply()
            assert reply.status == 404, reply
            assert reply.after < TIMEOUT, reply
            assert reply.headers.get("connection") == "close", reply
            assert request.closed_by_server()
        finally:
            request.close()

    before = rss()
    await in_thread(exchange)
    grown = rss() - before
    assert grown < 4 << 20, f"the server grew by {grown} bytes"


@in_server_loop
@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast", "/api/disconnect"])
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}], ids=str
)
async def test_wrong_key_is_401_before_the_body(
    bounded: AppServer, path: str, headers: dict[str, str]
) -> None:
    request = await in_thread(
        lambda: RawRequest(bounded, path, json_headers(200_000_000, **headers))
    )
    try:
        reply = await in_thread(request.reply)
    finally:
        request.close()
    assert reply.status == 401, reply
    assert reply.headers["www-authenticate"] == "Bearer", reply
    assert request.sent == 0


# -- size ---------------------------------------------------------------------------------------


@in_server_loop
@pytest.mark.parametrize("path", BODY_PATHS)
async def test_content_length_over_the_limit_is_413_at_once(bounded: AppServer, path: str) -> None:
    def exchange() -> Reply:
        request = RawRequest(bounded, path, json_headers(LIMIT + 1, **AUTH))
        try:
            reply = request.reply()  # nothing of the body was sent
            assert request.closed_by_server()
        finally:
            request.close()
        return reply

    reply = await in_thread(exchange)
    assert reply.status == 413, reply
    assert str(LIMIT) in str(reply.json()), reply


@in_server_loop
@pytest.mark.parametrize("path", BODY_PATHS)
async def test_chunked_body_over_the_limit_is_413(bounded: AppServer, path: str) -> None:
    channel = unique("bounds:big-")
    body = body_of(path, 2 * LIMIT, channel)

    def exchange() -> Reply:
        request = RawRequest(bounded, path, json_headers(None, **AUTH))
        try:
            for start in range(0, len(body), 1000):
                if not request.chunk(body[start : start + 1000]):
                    break
            request.chunk(b"")
            return request.reply()
        finally:
            request.close()

    reply = await in_thread(exchange)
    assert reply.status == 413, reply
    if path.startswith(("/api/publish", "/api/broadcast")):
        assert await history(bounded, channel) == [], "an over-limit body was published"


@in_server_loop
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_served(bounded: AppServer, chunked: bool) -> None:
    channel = unique("bounds:ok-")
    body = body_of("/api/publish", LIMIT, channel)

    def exchange() -> Reply:
        headers = json_headers(None if chunked else LIMIT, **AUTH)
        request = RawRequest(bounded, "/api/publish", headers)
        try:
            if chunked:
                request.chunk(body[: LIMIT // 2])
                request.chunk(body[LIMIT // 2 :])
                request.chunk(b"")
            else:
                request.send(body)
            return request.reply()
        finally:
            request.close()

    reply = await in_thread(exchange)
    assert reply.status == 200, reply
    assert len(await history(bounded, channel)) == 1


@in_server_loop
async def test_default_limit_leaves_room_for_the_largest_publication(limited: AppServer) -> None:
    def refused() -> int:
        big = RawRequest(limited, "/api/publish", json_headers(2_000_000, **AUTH))
        try:
            return big.reply().status
        finally:
            big.close()

    assert await in_thread(refused) == 413
    data = "y" * (65536 - 2)  # the default ROOMCAST_MAX_PUBLICATION_SIZE, as JSON
    body = json.dumps({"channel": unique("bounds:largest-"), "data": data}, indent=4)
    headers = {**AUTH, "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        reply = await client.post(f"{limited.http_url}/api/publish", content=body, headers=headers)
    assert reply.status_code == 200, reply.text[:500]


# -- time ---------------------------------------------------------------------------------------


@in_server_loop
@pytest.mark.parametrize("path", ["/api/publish", "/auth/guest"])
async def test_slow_body_is_408(bounded: AppServer, path: str) -> None:
    def exchange() -> Reply:
        request = RawRequest(bounded, path, json_headers(100, **AUTH))
        try:
            request.send(b'{"name": ')
            reply = request.reply(within=BODY_TIMEOUT + TIMEOUT)
            assert request.closed_by_server()
        finally:
            request.close()
        return reply

    reply = await in_thread(exchange)
    assert reply.status == 408, reply
    assert reply.after >= BODY_TIMEOUT * 0.9, reply


@in_server_loop
async def test_slow_chunked_body_is_408(bounded: AppServer) -> None:
    def exchange() -> Reply:
        request = RawRequest(bounded, "/api/publish", json_headers(None, **AUTH))
        try:
            request.chunk(b'{"channel": ')
            return request.reply(within=BODY_TIMEOUT + TIMEOUT)
        finally:
            request.close()

    reply = await in_thread(exchange)
    assert reply.status == 408, reply


# -- guest sign-in ------------------------------------------------------------------------------


@in_server_loop
async def test_guest_ids_are_unique(bounded: AppServer) -> None:
    """3,000 guests called "ann": with 16 random bits about 70 would share an id (none with a
    probability of 1e-30); with 64 bits none do. Pipelined on one connection, 500 at a time."""
    n = 3000
    users = await in_thread(lambda: sign_in_pipelined(bounded.port, n, batch=500))
    assert len(set(users)) == n, f"{n - len(set(users))} duplicate guest ids"
    assert all(re.fullmatch(r"ann#[0-9a-f]{16}", user) for user in users), users[:5]


def sign_in_pipelined(port: int, n: int, batch: int) -> list[str]:
    """``n`` guest sign-ins as "ann", ``batch`` at a time on one connection: the user ids."""
    body = json.dumps({"name": "ann"}).encode()
    head = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    one = f"POST /auth/guest HTTP/1.1\r\nHost: {HOST}\r\n{head}".encode() + body
    users: list[str] = []
    with socket.create_connection((HOST, port), TIMEOUT) as sock:
        buf = b""
        for _ in range(n // batch):
            sock.sendall(one * batch)
            deadline = time.monotonic() + 4 * TIMEOUT
            got = 0
            while got < batch:
                head_end = buf.find(b"\r\n\r\n")
                found = re.search(rb"content-length: (\d+)", buf[:head_end].lower())
                if head_end >= 0 and found and len(buf) >= head_end + 4 + int(found.group(1)):
                    assert buf.startswith(b"HTTP/1.1 200 "), buf[:200]
                    stop = head_end + 4 + int(found.group(1))
                    users.append(json.loads(buf[head_end + 4 : stop])["user"])
                    buf = buf[stop:]
                    got += 1
                    continue
                assert time.monotonic() < deadline, f"{len(users)} replies of {n} in time"
                data = sock.recv(1 << 16)
                assert data, "the server closed the connection"
                buf += data
    return users


@in_server_loop
async def test_guest_sign_in_is_rate_limited_per_address(limited: AppServer) -> None:
    url = f"{limited.http_url}/auth/guest"
    async with httpx.AsyncClient(timeout=TIMEOUT) as here:
        for _ in range(GUEST_BURST):
            assert (await here.post(url, json={"name": "ann"})).status_code == 200
        refused = await here.post(url, json={"name": "ann"})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1, refused.headers
        # A renewal is a sign-in too.
        assert (await here.post(url, json={"renew": "x"})).status_code == 429
        # Another address (still loopback) has a bucket of its own.
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=other, timeout=TIMEOUT) as there:
            assert (await there.post(url, json={"name": "bo"})).status_code == 200
        # The bucket refills at GUEST_RATE per second.
        started = time.monotonic()
        deadline = started + 1 / GUEST_RATE + TIMEOUT
        while (reply := await here.post(url, json={"name": "ann"})).status_code == 429:
            assert time.monotonic() < deadline, "the guest rate limit never let up"
            await asyncio.sleep(0.05)
        assert reply.status_code == 200, reply.text


# -- the pieces, in process ---------------------------------------------------------------------


def test_address_limiter_refills_and_keeps_a_bounded_table() -> None:
    limiter = AddressLimiter(rate=2, burst=3, max_addresses=2)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a", now=0.0) == pytest.approx(0.5)
    assert limiter.take("a", now=0.25) == pytest.approx(0.25)  # a refusal takes nothing
    assert limiter.take("a", now=0.5) == 0
    assert limiter.take("b", now=0.5) == 0
    assert limiter.take("c", now=0.5) == 0
    assert len(limiter._buckets) == 2
    assert "a" not in limiter._buckets  # the least recently seen went first


async def test_a_body_without_a_length_is_bounded_too() -> None:
    """Over HTTP/2 a POST needs neither Content-Length nor chunked encoding."""
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = BodyGuard(app, limit=10, timeout=TIMEOUT)
    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}

    async def run(chunks: list[bytes]) -> int:
        messages: list[Message] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
        sent: list[Message] = []

        async def receive() -> Message:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await guard(scope, receive, send)
        status: int = sent[0]["status"]
        return status

    assert await run([b"12345", b"67890"]) == 204
    assert seen == [b"1234567890"]
    assert await run([b"12345", b"67890", b"!"]) == 413
    assert seen == [b"1234567890"]
