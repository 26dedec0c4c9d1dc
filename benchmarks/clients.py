"""The harness's WebSocket clients, on picows + uvloop: connecting, echo loops, idle clients.

picows parses frames in Cython and calls back ``on_ws_frame`` synchronously, so one core can
drive far more messages than a uvicorn server can produce; the chat fan-out lives in
``chat.py`` on top of the helpers here. What does not depend on the client library (opening
many connections at once, waiting with time and idle limits, percentiles) is
:mod:`roomcast.tools.loadgen`, which ``roomcast bench`` uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from cpu import CpuProbe, Usage, measuring
from roomcast.tools.loadgen import OpenFailed, open_all, percentile, wait_until

CONNECT_CONCURRENCY = 50
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 120.0
CLOSE_TIMEOUT_S = 5.0


class Client(WSListener):
    """Base listener: keeps its transport and answers a server CLOSE by closing too."""

    transport: WSTransport

    def __init__(self) -> None:
        """Start with no close code seen."""
        super().__init__()
        self.close_code: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Remember the transport once the handshake is done."""
        self.transport = transport

    def handle_control(self, transport: WSTransport, frame: WSFrame) -> bool:
        """Handle a non-text frame; return True when it was a CLOSE from the server."""
        if frame.msg_type != WSMsgType.CLOSE:
            return False
        self.close_code = frame.get_close_code().value
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()
        return True


L = TypeVar("L", bound=Client)


async def connect_many(
    url: str,
    factory: Callable[[], L],
    count: int,
    concurrency: int = CONNECT_CONCURRENCY,
) -> list[L]:
    """Open ``count`` WebSocket connections to ``url``, at most ``concurrency`` at a time.

    Raises RuntimeError naming the first failure if any connection could not be opened; the
    ones that did open are closed first.
    """

    async def one() -> L:
        _, listener = await ws_connect(
            factory, url, websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S
        )
        return cast(L, listener)

    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await open_all(one, count, concurrency=concurrency, close=close_all)
    except OpenFailed as error:
        raise RuntimeError(
            f"{len(error.failures)} of {count} connections to {url} failed; "
            f"first: {error.failures[0]!r}"
        ) from None


async def close_all(clients: Sequence[Client], limit_s: float = CLOSE_TIMEOUT_S) -> None:
    """Disconnect every client and wait (bounded) until their transports are closed."""
    for client in clients:
        transport = client.transport
        if not transport.is_disconnected:
            transport.disconnect(graceful=False)
    await wait_closed(clients, limit_s)


async def wait_closed(clients: Sequence[Client], limit_s: float = CLOSE_TIMEOUT_S) -> bool:
    """Wait (bounded) until every client's transport is closed; return whether all were."""
    waiters = [asyncio.ensure_future(c.transport.wait_disconnected()) for c in clients]
    if not waiters:
        return True
    _, pending = await asyncio.wait(waiters, timeout=limit_s)
    for task in pending:
        task.cancel()
    for task in waiters:
        if task.done() and not task.cancelled():
            # A local failure re-raised by wait_disconnected() is of no interest at teardown.
            with contextlib.suppress(WSError, OSError):
                task.result()
    return not pending


# --------------------------------------------------------------------------------------------
# echo: closed-loop round trips


@dataclass
class EchoState:
    """Shared state of one echo run."""

    measuring: bool = False
    stopping: bool = False
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    active: int = 0
    all_done: asyncio.Event = field(default_factory=asyncio.Event)


class EchoClient(Client):
    """Sends a message, waits for ``Echo: <message>``, checks it, and sends the next one."""

    def __init__(self, state: EchoState, index: int) -> None:
        """Bind the client to the run's shared state."""
        super().__init__()
        self.state = state
        self.index = index
        self.seq = 0
        self.sent_at = 0.0
        self.expected = b""
        self.finished = False

    def send_next(self) -> None:
        """Send the next numbered message and remember what the reply must be."""
        self.seq += 1
        payload = b"c%04d-%010d" % (self.index, self.seq)
        self.expected = b"Echo: " + payload
        self.sent_at = time.perf_counter()
        self.transport.send(WSMsgType.TEXT, payload)

    def finish(self) -> None:
        """Stop this client's loop and tell the run when the last one stopped."""
        if not self.finished:
            self.finished = True
            self.state.active -= 1
            if self.state.active <= 0:
                self.state.all_done.set()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Check the reply, record its latency while measuring, and loop."""
        now = time.perf_counter()
        state = self.state
        if frame.msg_type != WSMsgType.TEXT:
            if self.handle_control(transport, frame):
                state.errors += 1
                self.finish()
            return
        if frame.get_payload_as_bytes() != self.expected:
            state.errors += 1
        if state.measuring:
            state.latencies.append(now - self.sent_at)
        if state.stopping:
            self.finish()
        else:
            self.send_next()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """A connection lost mid-run counts as an error unless the run was stopping."""
        if not self.state.stopping:
            self.state.errors += 1
        self.finish()


@dataclass
class EchoResult:
    """Figures of one echo run."""

    connections: int
    window_s: float
    round_trips: int
    rtps: float
    p50_us: float | None
    p99_us: float | None
    errors: int
    usage: Usage


async def run_echo(
    url: str, connections: int, warmup_s: float, duration_s: float, server_cpu: CpuProbe
) -> EchoResult:
    """Run ``connections`` closed send→reply loops; measure for ``duration_s`` after warm-up."""
    state = EchoState()
    counter = iter(range(connections))
    clients = await connect_many(url, lambda: EchoClient(state, next(counter)), connections)
    try:
        state.active = len(clients)
        for client in clients:
            client.send_next()
        await asyncio.sleep(warmup_s)
        with measuring(server_cpu) as meter:
            state.measuring = True
            start = time.perf_counter()
            await asyncio.sleep(duration_s)
            state.measuring = False
            window = time.perf_counter() - start
            usage = meter.stop()
            state.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await state.all_done.wait()
    finally:
        await close_all(clients)
    lat = state.latencies
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return EchoResult(
        connections=connections,
        window_s=window,
        round_trips=len(lat),
        rtps=len(lat) / window,
        p50_us=None if p50 is None else p50 * 1e6,
        p99_us=None if p99 is None else p99 * 1e6,
        errors=state.errors,
        usage=usage,
    )


# --------------------------------------------------------------------------------------------
# memory: idle connections


class IdleClient(Client):
    """Connects and does nothing; remembers the last text it got and answers CLOSE."""

    def __init__(self) -> None:
        """Start with nothing received."""
        super().__init__()
        self.last_text: bytes | None = None
        self.texts: Counter[bytes] = Counter()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Keep text frames' payloads; handle CLOSE."""
        if frame.msg_type == WSMsgType.TEXT:
            self.last_text = frame.get_payload_as_bytes()
            self.texts[self.last_text] += 1
        else:
            self.handle_control(transport, frame)


@dataclass
class MemoryPoint:
    """Server RSS once ``connections`` idle connections were open (and settled)."""

    connections: int
    rss: int
    connect_s: float


@dataclass
class MemoryResult:
    """Server RSS before opening idle connections, and at each checkpoint after."""

    rss_before: int
    points: list[MemoryPoint]

    def kib_per_conn(self, point: MemoryPoint) -> float:
        """Return the RSS growth per connection at ``point``, in KiB."""
        return (point.rss - self.rss_before) / point.connections / 1024


async def run_idle(
    url: str,
    counts: Sequence[int],
    expected_reply: bytes,
    settle_s: float,
    rss: Callable[[], int],
    stop_server: Callable[[], Awaitable[None]],
) -> MemoryResult:
    """Measure server RSS growth as idle connections to ``url`` are opened.

    ``counts`` are increasing checkpoints (e.g. 2,000 then 5,000): connections are added up to
    each one, and RSS is read ``settle_s`` after the last of them opened, so one server gives
    every figure. One connection first sends ``warm`` and waits for ``expected_reply`` so that
    lazily imported code is loaded before the "before" reading. The server is stopped (by
    ``stop_server``) before the clients close, so that the guide's chat does not spend its last
    seconds broadcasting "A client left the chat" to thousands of closing members.
    """
    warm = await connect_many(url, IdleClient, 1)
    try:
        warm[0].transport.send(WSMsgType.TEXT, b"warm")
        outcome = await wait_until(lambda: warm[0].last_text == expected_reply, limit_s=10.0)
        if outcome != "done":
            raise RuntimeError(f"warm-up reply from {url} was {warm[0].last_text!r}")
    finally:
        await close_all(warm)
    await asyncio.sleep(settle_s)
    before = rss()
    clients: list[IdleClient] = []
    points = []
    try:
        for count in sorted(counts):
            start = time.perf_counter()
            clients += await connect_many(url, IdleClient, count - len(clients))
            connect_s = time.perf_counter() - start
            await asyncio.sleep(settle_s)
            points.append(MemoryPoint(count, rss(), connect_s))
    finally:
        await stop_server()
        await close_all(clients)
    return MemoryResult(before, points)
