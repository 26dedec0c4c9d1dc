"""The connect scenario: new WebSocket connections per second on /ws/echo.

K client tasks each loop: open a TCP connection, do the upgrade, send one text message, await
``Echo: hello``, send a close frame, await the server's close frame and the end of the TCP
connection; then the next. Connections per second count complete cycles; the connect latency
is TCP connect + upgrade (until the 101 response was read and checked).

The client is a plain asyncio protocol with pre-built bytes (the upgrade request with a fixed
key, the masked frames) instead of picows: ``ws_connect`` costs about 200 µs of client CPU per
connection (URL parsing, headers, futures), which would make the load generator the limit for
the fastest servers. It still checks what matters: status 101, the ``Sec-WebSocket-Accept``
value, the exact reply, and a close frame from the server.

Every run opens at most ``limit`` connections (loopback ports and TIME_WAIT entries are finite),
and the measured window ends early when that budget runs out.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Final

from cpu import CpuProbe, Usage, measuring
from roomcast.tools.loadgen import percentile, wait_until
from staller import parse_frame

perf_counter = time.perf_counter
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY: Final = base64.b64encode(b"roomcast--bench!")
# Compared against the lower-cased response head (header names are case-insensitive).
ACCEPT_LINE: Final = (
    b"sec-websocket-accept: " + base64.b64encode(hashlib.sha1(KEY + WS_GUID).digest())
).lower()
MASK: Final = b"\x37\xfa\x21\x3d"
TEXT: Final = b"hello"
REPLY: Final = b"Echo: hello"
OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9
MAX_HEAD: Final = 16 * 1024
CYCLE_TIMEOUT_S: Final = 10.0
ERROR_PAUSE_S: Final = 0.01
# Phases of one cycle.
HANDSHAKE, REPLYING, CLOSING, DONE = 0, 1, 2, 3


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """Return a final client frame (masked with MASK) carrying ``payload`` (< 126 bytes)."""
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK + masked


TEXT_FRAME: Final = masked_frame(OP_TEXT, TEXT)
CLOSE_FRAME: Final = masked_frame(OP_CLOSE, struct.pack("!H", 1000))


def upgrade_request(host: str, port: int, path: str) -> bytes:
    """Return the HTTP upgrade request for ``path`` (fixed key)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def take_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one unmasked server frame off the front of ``buf``: (opcode, payload), or None."""
    parsed = parse_frame(buf)
    if parsed is None:
        return None
    opcode, payload, used = parsed
    del buf[:used]
    return opcode, payload


class CycleProtocol(asyncio.Protocol):
    """One connection of the connect scenario, driven by the bytes that arrive."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        """Prepare the request to send and the future that ends the cycle."""
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.phase = HANDSHAKE
        self.handshake_at = 0.0
        self.reply = b""
        self.problem = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def fail(self, problem: str) -> None:
        """Give up on this connection (the cycle counts as an error)."""
        if not self.problem:
            self.problem = problem
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Check the 101 response, then the reply, then the server's close frame."""
        buf = self.buf
        buf += data
        if self.phase == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.fail("response head too large")
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101") or ACCEPT_LINE not in head.lower():
                self.fail(f"handshake refused: {head[:40]!r}")
                return
            self.handshake_at = perf_counter()
            self.phase = REPLYING
            assert self.transport is not None
            self.transport.write(TEXT_FRAME)
        while self.phase in (REPLYING, CLOSING):
            frame = take_frame(buf)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == OP_PING:
                continue  # no keepalive is due in a cycle this short
            if self.phase == REPLYING:
                if opcode != OP_TEXT:
                    self.fail(f"opcode {opcode} before the reply")
                    return
                self.reply = payload
                self.phase = CLOSING
                assert self.transport is not None
                self.transport.write(CLOSE_FRAME)
            elif opcode == OP_CLOSE:
                self.phase = DONE
                assert self.transport is not None
                self.transport.close()
            else:
                self.fail(f"opcode {opcode} while closing")

    def connection_lost(self, exc: Exception | None) -> None:
        """End the cycle (successful only if the server's close frame came first)."""
        if self.phase != DONE and not self.problem:
            self.problem = f"connection lost in phase {self.phase}" + (f" ({exc})" if exc else "")
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class ConnectState:
    """Shared state of one connect run."""

    limit: int
    started: int = 0
    measuring: bool = False
    stopping: bool = False
    completed: int = 0
    handshakes: list[float] = field(default_factory=list)
    cycles: list[float] = field(default_factory=list)
    errors: int = 0
    wrong: int = 0
    first_error: str = ""

    def fail(self, reason: str) -> None:
        """Count a failed cycle and keep the first reason."""
        self.errors += 1
        if not self.first_error:
            self.first_error = reason[:200]


async def _cycle(host: str, port: int, request: bytes, state: ConnectState) -> None:
    """One connection: connect, upgrade, one round trip, close; record the figures."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    proto = CycleProtocol(request, done)
    t0 = perf_counter()
    try:
        async with asyncio.timeout(CYCLE_TIMEOUT_S):
            await loop.create_connection(lambda: proto, host, port)
            await done
    except (OSError, TimeoutError) as exc:
        if proto.transport is not None:
            proto.transport.abort()
        state.fail(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(ERROR_PAUSE_S)
        return
    if proto.problem:
        state.fail(proto.problem)
        await asyncio.sleep(ERROR_PAUSE_S)
        return
    if proto.reply != REPLY:
        state.wrong += 1
    if state.measuring:
        state.completed += 1
        state.handshakes.append(proto.handshake_at - t0)
        state.cycles.append(perf_counter() - t0)


async def _worker(host: str, port: int, path: str, state: ConnectState) -> None:
    """Run cycles back to back until the run stops or the connection budget is spent."""
    request = upgrade_request(host, port, path)
    while not state.stopping and state.started < state.limit:
        state.started += 1
        await _cycle(host, port, request, state)


@dataclass
class ConnectResult:
    """Figures of one connect run."""

    clients: int
    window_s: float
    completed: int
    cps: float
    handshake_p50_ms: float | None
    handshake_p99_ms: float | None
    cycle_p50_ms: float | None
    errors: int
    wrong: int
    first_error: str
    started: int
    budget_spent: bool
    usage: Usage


async def run_connect(
    host: str,
    port: int,
    path: str,
    clients: int,
    warmup_s: float,
    duration_s: float,
    limit: int,
    server_cpu: CpuProbe,
) -> ConnectResult:
    """Run ``clients`` connect → round trip → close loops for ``warmup_s`` + ``duration_s``
    (measured), opening at most ``limit`` connections in all."""
    state = ConnectState(limit)
    workers = [asyncio.create_task(_worker(host, port, path, state)) for _ in range(clients)]
    try:
        await asyncio.sleep(warmup_s)
        with measuring(server_cpu) as meter:
            try:
                state.measuring = True
                start = perf_counter()
                await wait_until(lambda: state.started >= limit, duration_s)
                state.measuring = False
                window = perf_counter() - start
                usage = meter.stop()
            finally:
                state.stopping = True
        await asyncio.wait(workers, timeout=CYCLE_TIMEOUT_S)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    hs, cyc = state.handshakes, state.cycles
    p50, p99, c50 = percentile(hs, 50), percentile(hs, 99), percentile(cyc, 50)
    return ConnectResult(
        clients=clients,
        window_s=window,
        completed=state.completed,
        cps=state.completed / window,
        handshake_p50_ms=None if p50 is None else p50 * 1e3,
        handshake_p99_ms=None if p99 is None else p99 * 1e3,
        cycle_p50_ms=None if c50 is None else c50 * 1e3,
        errors=state.errors,
        wrong=state.wrong,
        first_error=state.first_error,
        started=state.started,
        budget_spent=state.started >= limit,
        usage=usage,
    )
