"""Shared helpers for the real-socket tests: waits, clients, and ``roomcast serve`` processes.

The clients here talk over loopback to any server with an address (:class:`Addressed`): a
``python -m roomcast serve`` subprocess (:class:`RoomcastServer`) or an in-process server
(tests/servers.py). All waits derive from ``TIMEOUT`` and every loop is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.speedups import apply_mask

TIMEOUT = float(os.environ.get("ROOMCAST_TEST_TIMEOUT", "5"))

HOST = "127.0.0.1"
TOKENS_JSON = '{"secret-token": "authenticated_user"}'
GOOD_TOKEN = "secret-token"
USER = "authenticated_user"
LEFT = "A client left the chat"

_POLL = 0.02

ServerFactory = Callable[..., "RoomcastServer"]


class Addressed(Protocol):
    """A server the clients here can reach: a subprocess or an in-process one."""

    port: int

    def url(self, path: str) -> str:
        """``ws://host:port`` + ``path``."""
        ...


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def base_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment for a server: ours minus any ROOMCAST_* settings, plus test defaults.

    A value of ``None`` in ``overrides`` removes the variable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env["ROOMCAST_TOKENS"] = TOKENS_JSON
    # Most suites test the channel protocol, not access control (test_security.py does, with
    # its own settings): anonymous clients may use every channel and nothing is rate limited.
    env["ROOMCAST_ANONYMOUS_SUBSCRIBE"] = '["*"]'
    env["ROOMCAST_ANONYMOUS_PUBLISH"] = '["*"]'
    env["ROOMCAST_RATE_LIMIT"] = "0"
    # Uvicorn's access log goes to stdout, which is block-buffered when redirected to a file.
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def spawn(
    argv: Sequence[str],
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, its output (both streams) to ``log_path``."""
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, bounded wait, SIGKILL fallback (nothing to do if ``proc`` has exited)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def wait_until(
    predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(_POLL)


class HasStats(Protocol):
    """A server whose ``/stats`` a test can read."""

    async def astats(self) -> dict[str, int]: ...


async def await_stats(
    server: HasStats,
    predicate: Callable[[dict[str, int]], bool],
    within: float = TIMEOUT,
    what: str = "",
) -> dict[str, int]:
    """Wait until ``server``'s ``/stats`` satisfies ``predicate``; returns the last read."""
    last: dict[str, int] = {}

    async def check() -> bool:
        nonlocal last
        last = await server.astats()
        return predicate(last)

    try:
        await async_wait_until(check, within, what or "stats condition")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last /stats: {last}") from None
    return last


class RoomcastServer:
    """A roomcast server subprocess whose stdout+stderr go to ``log_dir/server.log``.

    Use as a context manager: ``with RoomcastServer(log_dir, env={...}) as srv: ...``.
    """

    live: ClassVar[list[RoomcastServer]] = []

    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str | None] | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        argv: Sequence[str] | None = None,
        startup_timeout: float = 4 * TIMEOUT,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "server.log"
        self.port = port if port is not None else free_port()
        self.env = base_env(env)
        if argv is None:
            argv = [
                sys.executable, "-m", "roomcast", "serve",
                "--host", HOST, "--port", str(self.port), *extra_args,
            ]  # fmt: skip
        self.argv = list(argv)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RoomcastServer:
        self.proc = spawn(self.argv, self.log_path, self.log_dir, env=self.env)
        RoomcastServer.live.append(self)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._forget()
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before it was ready:\n"
                    f"{self.log()}"
                )
            try:
                resp = httpx.get(f"{self.http_url}/health", timeout=TIMEOUT)
                if resp.status_code == 200 and resp.json() == {"status": "ok"}:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"server not ready after {self.startup_timeout:.1f}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; raise subprocess.TimeoutExpired if it does not."""
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout=timeout)
        self._forget()
        return self.returncode

    def stop(self, timeout: float = 3 * TIMEOUT) -> int | None:
        """SIGTERM, bounded wait, SIGKILL fallback. Returns the exit code."""
        if self.proc is None:
            return None
        terminate(self.proc, timeout)
        self.returncode = self.proc.returncode
        self._forget()
        return self.returncode

    def _forget(self) -> None:
        with contextlib.suppress(ValueError):
            RoomcastServer.live.remove(self)

    def __enter__(self) -> RoomcastServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.ws_url}{path}"

    # -- log ---------------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def assert_no_traceback(self) -> None:
        text = self.log()
        assert "Traceback" not in text, f"server log contains a traceback:\n{text[-8000:]}"

    # -- stats -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        resp = httpx.get(f"{self.http_url}/stats", timeout=TIMEOUT)
        resp.raise_for_status()
        data: dict[str, int] = resp.json()
        return data

    async def astats(self) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            resp = await client.get(f"{self.http_url}/stats")
        resp.raise_for_status()
        data: dict[str, int] = resp.json()
        return data

    def wait_stats(
        self, predicate: Callable[[dict[str, int]], bool], timeout: float = TIMEOUT, what: str = ""
    ) -> dict[str, int]:
        last: dict[str, int] = {}

        def check() -> bool:
            nonlocal last
            last = self.stats()
            return predicate(last)

        try:
            wait_until(check, timeout, what or "stats condition")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last /stats: {last}") from None
        return last

    async def await_stats(
        self, predicate: Callable[[dict[str, int]], bool], within: float = TIMEOUT, what: str = ""
    ) -> dict[str, int]:
        return await await_stats(self, predicate, within, what)


async def async_wait_until(
    predicate: Callable[[], Any], within: float = TIMEOUT, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (plain or async) until truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:.1f}s waiting for {what}")
        await asyncio.sleep(_POLL)


def ws_connect(server: Addressed, path: str, **kwargs: Any) -> connect:
    """``websockets`` client connect with test-friendly timeouts."""
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("close_timeout", TIMEOUT)
    # Unbounded client queue: a test client that has not read yet must still see close frames
    # (with the default of 16 the client stops reading its socket until recv() is called).
    kwargs.setdefault("max_queue", None)
    return connect(server.url(path), **kwargs)


async def recv(ws: ClientConnection, within: float = TIMEOUT) -> str | bytes:
    async with asyncio.timeout(within):
        return await ws.recv()


async def recv_until_closed(ws: ClientConnection, within: float = TIMEOUT) -> list[str | bytes]:
    """Receive until the connection closes; return what arrived. Fails after ``within``."""
    got: list[str | bytes] = []
    async with asyncio.timeout(within):
        while True:
            try:
                got.append(await ws.recv())
            except ConnectionClosed:
                return got


def close_code_lines(text: str, code: int) -> list[str]:
    """Log lines that carry a connection id and mention ``code`` as a whole word."""
    pattern = re.compile(rf"(?<!\w){code}(?!\w)")
    return [line for line in text.splitlines() if "conn=" in line and pattern.search(line)]


def kernel_send_buffer_max() -> int:
    """The most a server socket's send buffer can grow to (tcp_wmem max), 4 MiB if unknown."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


# -- raw WebSocket client (for peers that must not read / must not answer pings) -------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def raw_ws_handshake(
    port: int,
    path: str,
    rcvbuf: int | None = None,
    timeout: float = TIMEOUT,
    request_headers: Sequence[str] = (),
    response_headers: dict[str, str] | None = None,
) -> tuple[socket.socket, bytes]:
    """Open a TCP socket and complete the WebSocket upgrade by hand.

    ``request_headers`` are extra header lines (e.g. an extension offer); the response's
    headers are stored into ``response_headers`` when given. Returns the socket and any bytes
    received after the response headers.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((HOST, port))
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            + "".join(f"{line}\r\n" for line in request_headers)
            + "\r\n"
        )
        sock.sendall(request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            assert len(buf) < 65536, "handshake response too long"
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed during handshake: {buf!r}")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), f"upgrade refused: {head!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        assert headers.get("sec-websocket-accept") == expected, f"bad accept header: {head!r}"
        if response_headers is not None:
            response_headers.update(headers)
        return sock, rest
    except BaseException:
        sock.close()
        raise


class RawFrameReader:
    """Minimal reader of server-to-client frames (unmasked, no extensions)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(initial)
        self.total = len(initial)

    def _fill(self, n: int, deadline: float, max_bytes: int) -> None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete frame before the deadline")
            if self.total > max_bytes:
                raise AssertionError(f"read more than {max_bytes} bytes without a close frame")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by peer without a close frame")
            self.buf += chunk
            self.total += len(chunk)

    def read_frame(self, deadline: float, max_bytes: int = 64 << 20) -> tuple[int, bytes]:
        self._fill(2, deadline, max_bytes)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames must not be masked"
        length = b1 & 0x7F
        header = 2
        if length == 126:
            self._fill(4, deadline, max_bytes)
            length = struct.unpack("!H", self.buf[2:4])[0]
            header = 4
        elif length == 127:
            self._fill(10, deadline, max_bytes)
            length = struct.unpack("!Q", self.buf[2:10])[0]
            header = 10
        self._fill(header + length, deadline, max_bytes)
        payload = bytes(self.buf[header : header + length])
        del self.buf[: header + length]
        return b0 & 0x0F, payload

    def frames_until_close(
        self, timeout: float = TIMEOUT, max_bytes: int = 64 << 20
    ) -> tuple[list[tuple[int, bytes]], int | None, str]:
        """Read frames until a close frame; return (frames before it, close code, reason)."""
        deadline = time.monotonic() + timeout
        frames: list[tuple[int, bytes]] = []
        while True:
            opcode, payload = self.read_frame(deadline, max_bytes)
            if opcode == 8:
                if len(payload) >= 2:
                    code = struct.unpack("!H", payload[:2])[0]
                    return frames, code, payload[2:].decode("utf-8", "replace")
                return frames, None, ""
            frames.append((opcode, payload))


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame (RFC 6455 section 5.2), for raw-socket tests."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    return header + mask + apply_mask(payload, mask)


@contextlib.contextmanager
def closing_socket(sock: socket.socket) -> Iterator[socket.socket]:
    try:
        yield sock
    finally:
        sock.close()
