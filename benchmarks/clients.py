"""Load generator building blocks on picows + uvloop: connecting, echo loops, idle clients.

picows parses frames in Cython and calls back ``on_ws_frame`` synchronously, so one core can
drive far more messages than a uvicorn server can produce; the chat fan-out lives in
``chat.py`` on top of the helpers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import psutil
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECT_CONCURRENCY = 50
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 120.0
CLOSE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.005

CpuProbe = Callable[[], float]


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
    sem = asyncio.Semaphore(concurrency)

    async def one() -> L:
        async with sem:
            _, listener = await ws_connect(
                factory, url, websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
            return cast(L, listener)

    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_all(clients)
        raise RuntimeError(
            f"{len(failures)} of {count} connections to {url} failed; first: {failures[0]!r}"
        )
    return clients


class Receipts:
    """What the shared receipt counters of a fan-out run (chat or ``/ws``) have in common.

    ``count[i]``: deliveries of measured message i, all receivers together; ``others``: every
    other frame received.
    """

    count: list[int]
    others: int

    @property
    def measured(self) -> int:
        """Return how many measured messages arrived so far, all receivers together."""
        return sum(self.count)

    def progress(self) -> int:
        """Return a counter of every frame received so far (for the idle timeouts)."""
        return sum(self.count) + self.others


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


async def wait_until(
    done: Callable[[], bool],
    limit_s: float,
    idle: float | None = None,
    progress: Callable[[], float] | None = None,
) -> str:
    """Poll until ``done()``; return "done", "timeout" (after ``limit_s``) or "idle".

    "idle" means that ``progress()`` (a counter of useful events) did not change for ``idle``
    seconds; without ``progress`` a run is never idle.
    """
    start = last_change = time.perf_counter()
    seen = progress() if progress is not None else 0.0
    while True:
        if done():
            return "done"
        now = time.perf_counter()
        if now - start > limit_s:
            return "timeout"
        if progress is not None:
            value = progress()
            if value != seen:
                seen, last_change = value, now
            elif idle is not None and now - last_change > idle:
                return "idle"
        await asyncio.sleep(POLL_INTERVAL_S)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Return the ``pct`` percentile (nearest-rank on sorted data), or None if empty."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


def percentile_ms(values: Sequence[float], pct: float) -> float | None:
    """Return the ``pct`` percentile of ``values`` (seconds) in milliseconds, or None if empty."""
    p = percentile(values, pct)
    return None if p is None else p * 1e3


@dataclass
class Usage:
    """CPU use of both sides over a measurement window, as a fraction of one core."""

    loadgen: float
    server: float
    wall_s: float
    other: float

    @property
    def loadgen_cpu_s(self) -> float:
        """Return the load generator's CPU seconds over the window."""
        return self.loadgen * self.wall_s


class UsageMeter:
    """Measure load generator and server CPU over a window of wall-clock time."""

    def __init__(self, server_cpu: CpuProbe) -> None:
        """Take the starting readings."""
        self._server_cpu = server_cpu
        self._wall = time.perf_counter()
        self._proc = time.process_time()
        self._srv = server_cpu()
        self._busy = _machine_busy_seconds()

    def stop(self) -> Usage:
        """Return the CPU fractions since construction.

        ``other`` is the CPU the rest of the machine used meanwhile (other processes and
        hypervisor steal; interrupt time, which the kernel charges to no process, is left out):
        a noise indicator.
        """
        wall = max(time.perf_counter() - self._wall, 1e-9)
        loadgen = (time.process_time() - self._proc) / wall
        server = (self._server_cpu() - self._srv) / wall
        busy = (_machine_busy_seconds() - self._busy) / wall
        return Usage(loadgen, server, wall, max(0.0, busy - loadgen - server))


async def background_load(window_s: float = 0.5) -> float:
    """Return the CPU (in cores) the machine used over ``window_s``, this process excluded.

    Call it while the servers under test are idle: then it is other people's work.
    """
    busy0, own0, t0 = _machine_busy_seconds(), time.process_time(), time.perf_counter()
    await asyncio.sleep(window_s)
    wall = time.perf_counter() - t0
    own = time.process_time() - own0
    return max(0.0, (_machine_busy_seconds() - busy0 - own) / wall)


def _machine_busy_seconds() -> float:
    """Return the CPU seconds all cores spent running processes (or stolen) since boot."""
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "steal")
    return float(sum(getattr(t, name, 0.0) for name in fields))


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
        gc.collect()
        gc.disable()
        try:
            meter = UsageMeter(server_cpu)
            state.measuring = True
            start = time.perf_counter()
            await asyncio.sleep(duration_s)
            state.measuring = False
            window = time.perf_counter() - start
            usage = meter.stop()
            state.stopping = True
        finally:
            gc.enable()
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


def median(values: Sequence[float]) -> float:
    """Return the median of a non-empty sequence."""
    return float(statistics.median(values))
