"""``roomcast bench``: load generators for a user's own server, on the ``websockets`` client.

Two scenarios (docs/cli.md):

- :class:`EchoBench`: N connections to an echo endpoint, each sending a message and waiting for
  the answer in a loop for a fixed time; round trips per second and round-trip latency.
- :class:`FanoutBench`: N subscribers on one channel of the ``/ws`` protocol
  (docs/protocol.md) and one publisher sending M publications, at most ``window`` unanswered;
  every subscriber checks what it receives. Deliveries per second, latency from publish to
  receipt, and anything lost, duplicated or out of order.

Both run in one process, so the latency of a publication is measured with one clock: the
publisher puts ``time.perf_counter()`` into the publication's ``data``. Every wait is bounded by
``timeout``. benchmarks/ (picows, uvloop, a machine description, comparisons with other servers)
is the project's own, heavier, measurement; this module needs nothing but roomcast's
dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

__all__ = [
    "BenchError",
    "BenchResult",
    "EchoBench",
    "FanoutBench",
    "results_table",
    "with_progress",
    "write_histogram",
]

perf_counter = time.perf_counter
#: Handshakes in flight at once while connecting (a burst of thousands would overflow the
#: server's accept backlog and look like a failure of the server).
CONNECT_CONCURRENCY = 64
#: How often progress bars and "is it done yet" checks run.
POLL_S = 0.05


class BenchError(Exception):
    """The benchmark could not run (refused handshake, refused publish...): the message says why."""


class Bench(Protocol):
    async def run(self, progress: Progress) -> BenchResult: ...


# -- results ---------------------------------------------------------------------------------

#: Every metric a result may have: key (as in --json) → label (as in the table) and format.
_METRICS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "url": ("url", str),
    "channel": ("channel", str),
    "connections": ("connections", str),
    "subscribers": ("subscribers", str),
    "publications": ("publications", str),
    "duration_s": ("duration", lambda v: f"{v:.1f} s"),
    "deliveries": ("deliveries", lambda v: f"{v:,}"),
    "expected": ("expected", lambda v: f"{v:,}"),
    "deliveries_per_s": ("deliveries/s", lambda v: f"{v:,.0f}"),
    "latency_p50_ms": ("latency p50", lambda v: _ms(v)),
    "latency_p90_ms": ("latency p90", lambda v: _ms(v)),
    "latency_p99_ms": ("latency p99", lambda v: _ms(v)),
    "latency_max_ms": ("latency max", lambda v: _ms(v)),
    "lost": ("lost", str),
    "duplicates": ("duplicates", str),
    "out_of_order": ("out of order", str),
    "closed_early": ("closed early", lambda v: _closes(v)),
    "elapsed_s": ("elapsed", lambda v: f"{v:.2f} s"),
}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _closes(closed: dict[str, int]) -> str:
    if not closed:
        return "none"
    return ", ".join(f"{count} with {code}" for code, count in sorted(closed.items()))


@dataclass
class BenchResult:
    """What a run measured: ``metrics`` (keys of ``_METRICS``) and every latency, in seconds."""

    kind: str
    metrics: dict[str, Any]
    latencies: list[float] = field(repr=False)

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated, reordered, and no connection closed by the server."""
        m = self.metrics
        return not (
            m.get("lost") or m.get("duplicates") or m.get("out_of_order") or m.get("closed_early")
        )

    def summary(self) -> dict[str, Any]:
        return {"scenario": self.kind, **self.metrics, "ok": self.ok}


def percentile_ms(values: Sequence[float], pct: float) -> float | None:
    """The ``pct`` percentile (nearest rank) of ``values`` (seconds, sorted), in milliseconds."""
    if not values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1] * 1000


def _latency_metrics(latencies: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)
    return {
        "latency_p50_ms": percentile_ms(ordered, 50),
        "latency_p90_ms": percentile_ms(ordered, 90),
        "latency_p99_ms": percentile_ms(ordered, 99),
        "latency_max_ms": percentile_ms(ordered, 100),
    }


def results_table(result: BenchResult) -> Table:
    """A Rich table of ``result``: one metric per row."""
    from rich.table import Table

    verdict = "ok" if result.ok else "PROBLEMS: see lost / duplicates / closed early"
    table = Table(title=f"roomcast bench {result.kind}", caption=verdict)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        label, fmt = _METRICS[key]
        bad = key in ("lost", "duplicates", "out_of_order", "closed_early") and bool(value)
        table.add_row(label, fmt(value), style="bold red" if bad else None)
    return table


def write_histogram(result: BenchResult, path: str) -> str | None:
    """Write a latency histogram of ``result`` to ``path``; return a problem, or None."""
    if not result.latencies:
        return "no latency was measured: no histogram written"
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return (
            f"matplotlib is not installed (pip install matplotlib): no histogram written to {path}"
        )
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    values = [latency * 1000 for latency in result.latencies]
    p50 = result.metrics.get("latency_p50_ms")
    p99 = result.metrics.get("latency_p99_ms")
    figure, axes = plt.subplots(figsize=(8, 4.5))
    try:
        axes.hist(values, bins=60, color="#4c72b0")
        for value, name, style in ((p50, "p50", "--"), (p99, "p99", ":")):
            if value is not None:
                axes.axvline(value, color="black", linestyle=style, label=f"{name} {value:.2f} ms")
        axes.set_xlabel("latency (ms)")
        axes.set_ylabel("messages")
        what = "publish to receipt" if result.kind == "fanout" else "round trip"
        axes.set_title(f"roomcast bench {result.kind}: {what}, {len(values):,} messages")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    except OSError as error:
        return f"cannot write {path}: {error}"
    finally:
        plt.close(figure)
    return None


# -- connections -----------------------------------------------------------------------------


def _with_default_path(url: str, path: str) -> str:
    """``url`` with ``http(s)`` turned into ``ws(s)`` and ``path`` when it has none."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme, path=parts.path.rstrip("/") or path))


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, InvalidStatus):
        return f"handshake refused: HTTP {error.response.status_code}"
    if isinstance(error, TimeoutError):
        return f"no handshake within {timeout:g} s"
    return str(error) or type(error).__name__


def _raise_file_limit(wanted: int) -> None:
    """Allow ``wanted`` open sockets if the hard limit lets us (best effort)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _open_many(
    url: str, count: int, token: str | None, wait_s: float, progress: Progress, label: str
) -> list[ClientConnection]:
    """Open ``count`` connections or none: on any failure close the others and raise."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    task = progress.add_task(label, total=count)

    async def one() -> ClientConnection:
        async with limit:
            ws = await connect(
                url,
                additional_headers=headers,
                open_timeout=wait_s,
                close_timeout=wait_s,
                ping_interval=None,  # a busy client must not be cut for a late pong
                max_size=16 << 20,
            )
        progress.advance(task)
        return ws

    _raise_file_limit(count + 64)
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    progress.remove_task(task)
    opened = [r for r in results if isinstance(r, ClientConnection)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await _close_all(opened, wait_s)
        for error in failed:
            if not isinstance(error, Exception):  # CancelledError, KeyboardInterrupt
                raise error
        raise BenchError(
            f"{len(failed)} of {count} connections to {url} failed: {_describe(failed[0], wait_s)}"
        )
    return opened


async def _close_all(connections: Sequence[ClientConnection], wait_s: float) -> None:
    """Close every connection with 1000, waiting at most ``wait_s`` for the handshakes."""
    if not connections:
        return
    tasks = [asyncio.create_task(ws.close()) for ws in connections]
    _, pending = await asyncio.wait(tasks, timeout=wait_s)
    for task in pending:
        task.cancel()
    for ws in connections:
        if ws.state.name != "CLOSED":
            ws.transport.abort()
    await asyncio.gather(*tasks, return_exceptions=True)


def _close_code(ws: ClientConnection) -> str:
    received = ws.protocol.close_rcvd
    return str(received.code) if received is not None else "1006"


async def _ticker(interval: float, tick: Callable[[], None]) -> None:
    while True:
        tick()
        await asyncio.sleep(interval)


# -- echo ------------------------------------------------------------------------------------


@dataclass
class EchoBench:
    url: str
    connections: int = 64
    duration: float = 5.0
    size: int = 64
    rate: float = 0.0
    token: str | None = None
    timeout: float = 10.0

    async def run(self, progress: Progress) -> BenchResult:
        url = _with_default_path(self.url, "/ws/echo")
        conns = await _open_many(
            url, self.connections, self.token, self.timeout, progress, "connecting"
        )
        latencies: list[float] = []
        sent = received = 0
        closed: Counter[str] = Counter()
        interval = 1 / self.rate if self.rate else 0.0
        start = perf_counter()
        stop_at = start + self.duration

        async def loop(index: int, ws: ClientConnection) -> None:
            nonlocal sent, received
            tag = f"{index:06d} "
            payload = tag + "x" * max(0, self.size - len(tag))
            next_at = perf_counter()
            while perf_counter() < stop_at:
                if interval:
                    next_at += interval
                    delay = next_at - perf_counter()
                    if delay > 0:
                        await asyncio.sleep(min(delay, max(0.0, stop_at - perf_counter())))
                        if perf_counter() >= stop_at:
                            return
                t0 = perf_counter()
                try:
                    await ws.send(payload)
                    sent += 1
                    async with asyncio.timeout(self.timeout):
                        await ws.recv()
                except TimeoutError:
                    return  # counted as lost
                except ConnectionClosed:
                    closed[_close_code(ws)] += 1
                    return
                latencies.append(perf_counter() - t0)
                received += 1

        task = progress.add_task("echo round trips", total=self.duration)

        def tick() -> None:
            progress.update(
                task,
                completed=min(perf_counter() - start, self.duration),
                description=f"echo round trips: {received:,}",
            )

        ticker = asyncio.create_task(_ticker(POLL_S * 2, tick))
        try:
            await asyncio.gather(*(loop(i, ws) for i, ws in enumerate(conns)))
            elapsed = perf_counter() - start
        finally:
            ticker.cancel()
            await _close_all(conns, self.timeout)
        metrics: dict[str, Any] = {
            "url": url,
            "connections": self.connections,
            "duration_s": self.duration,
            "deliveries": received,
            "deliveries_per_s": received / elapsed if elapsed > 0 else 0.0,
            **_latency_metrics(latencies),
            "lost": sent - received,
            "closed_early": dict(closed),
            "elapsed_s": elapsed,
        }
        return BenchResult("echo", metrics, latencies)


# -- fan-out over /ws ------------------------------------------------------------------------


@dataclass
class FanoutBench:
    url: str
    subscribers: int = 200
    messages: int = 100
    channel: str | None = None
    window: int = 64
    rate: float = 0.0
    token: str | None = None
    timeout: float = 10.0

    async def _subscribe(self, ws: ClientConnection, channel: str) -> None:
        """Subscribe ``ws`` to ``channel``; raise BenchError if refused or unanswered."""
        await ws.send(json.dumps({"id": 1, "op": "subscribe", "channel": channel}))
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    frame = json.loads(await ws.recv())
                    if isinstance(frame, dict) and frame.get("id") == 1:
                        break
        except TimeoutError:
            raise BenchError(f"no answer to subscribe within {self.timeout:g} s") from None
        except ConnectionClosed:
            received = ws.protocol.close_rcvd
            reason = f" ({received.reason})" if received is not None and received.reason else ""
            raise BenchError(f"the server closed a subscriber: {_close_code(ws)}{reason}") from None
        except ValueError:
            raise BenchError(f"{self.url} does not speak the /ws protocol (not JSON)") from None
        if not frame.get("ok"):
            error = frame.get("error") or {}
            raise BenchError(
                f"subscribe refused: {error.get('code')}: {error.get('message')}"
                + _hint(error.get("code"))
            )

    async def run(self, progress: Progress) -> BenchResult:
        url = _with_default_path(self.url, "/ws")
        channel = self.channel or f"bench:{secrets.token_hex(4)}"
        subs = await _open_many(
            url, self.subscribers, self.token, self.timeout, progress, "connecting subscribers"
        )
        publisher: list[ClientConnection] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            subscribing = progress.add_task("subscribing", total=len(subs))

            async def subscribe(ws: ClientConnection) -> None:
                await self._subscribe(ws, channel)
                progress.advance(subscribing)

            await asyncio.gather(*(subscribe(ws) for ws in subs))
            progress.remove_task(subscribing)
            publisher = await _open_many(
                url, 1, self.token, self.timeout, progress, "connecting the publisher"
            )
            return await self._measure(progress, url, channel, subs, publisher[0], tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all([*subs, *publisher], self.timeout)

    async def _measure(
        self,
        progress: Progress,
        url: str,
        channel: str,
        subs: list[ClientConnection],
        pub: ClientConnection,
        tasks: list[asyncio.Task[None]],
    ) -> BenchResult:
        run_id = secrets.token_hex(6)
        total = self.messages
        expected = len(subs) * total
        latencies: list[float] = []
        closed: Counter[str] = Counter()
        counts = {"deliveries": 0, "duplicates": 0, "out_of_order": 0, "acked": 0, "sent": 0}
        last_delivery = 0.0
        finishing = False

        async def subscriber(ws: ClientConnection) -> None:
            nonlocal last_delivery
            seen = bytearray(total)
            last_offset = -1
            try:
                async for message in ws:
                    now = perf_counter()
                    try:
                        frame = json.loads(message)
                        data = frame["data"]
                        if frame["type"] != "publication" or data["run"] != run_id:
                            continue
                        seq, sent_at, offset = data["seq"], data["t"], frame["offset"]
                    except (ValueError, TypeError, KeyError):
                        continue
                    if not 0 <= seq < total:
                        continue
                    if seen[seq]:
                        counts["duplicates"] += 1
                        continue
                    seen[seq] = 1
                    if offset <= last_offset:
                        counts["out_of_order"] += 1
                    last_offset = offset
                    counts["deliveries"] += 1
                    latencies.append(now - sent_at)
                    last_delivery = now
            except ConnectionClosed:
                pass
            if not finishing:
                closed[_close_code(ws)] += 1

        window = asyncio.Semaphore(self.window)
        refused: list[dict[str, Any]] = []

        async def replies() -> None:
            try:
                async for message in pub:
                    try:
                        frame = json.loads(message)
                    except ValueError:
                        continue
                    if isinstance(frame, dict) and "ok" in frame:
                        counts["acked"] += 1
                        window.release()
                        if not frame["ok"]:
                            refused.append(frame.get("error") or {})
            except ConnectionClosed:
                pass

        tasks.extend(asyncio.create_task(subscriber(ws)) for ws in subs)
        tasks.append(asyncio.create_task(replies()))
        delivering = progress.add_task("deliveries", total=expected)
        ticker = asyncio.create_task(
            _ticker(POLL_S, lambda: progress.update(delivering, completed=counts["deliveries"]))
        )
        tasks.append(ticker)

        interval = 1 / self.rate if self.rate else 0.0
        first_sent = perf_counter()
        for seq in range(total):
            try:
                async with asyncio.timeout(self.timeout):
                    await window.acquire()
            except TimeoutError:
                raise BenchError(
                    f"no answer to a publish request within {self.timeout:g} s"
                ) from None
            if refused:
                break
            if pub.protocol.close_rcvd is not None:
                raise BenchError(f"the server closed the publisher: {_close_code(pub)}")
            if interval:
                await asyncio.sleep(max(0.0, first_sent + seq * interval - perf_counter()))
            request = {
                "id": seq + 1,
                "op": "publish",
                "channel": channel,
                "data": {"run": run_id, "seq": seq, "t": perf_counter()},
            }
            try:
                await pub.send(json.dumps(request, separators=(",", ":")))
            except ConnectionClosed:
                raise BenchError(f"the server closed the publisher: {_close_code(pub)}") from None
            counts["sent"] += 1
        await _until(lambda: refused or counts["acked"] >= counts["sent"], self.timeout)
        if refused:
            error = refused[0]
            raise BenchError(
                f"publish refused: {error.get('code')}: {error.get('message')}"
                + _hint(error.get("code"))
            )
        # Wait for every delivery, as long as deliveries keep coming (or subscribers remain).
        previous, idle_since = -1, perf_counter()
        subscriber_tasks = tasks[: len(subs)]
        while counts["deliveries"] < counts["sent"] * len(subs):
            if all(task.done() for task in subscriber_tasks):
                break
            if counts["deliveries"] != previous:
                previous, idle_since = counts["deliveries"], perf_counter()
            elif perf_counter() - idle_since > self.timeout:
                break
            await asyncio.sleep(POLL_S)
        finishing = True
        ticker.cancel()
        progress.update(delivering, completed=counts["deliveries"])
        deliveries = counts["deliveries"]
        elapsed = (last_delivery - first_sent) if deliveries else perf_counter() - first_sent
        metrics: dict[str, Any] = {
            "url": url,
            "channel": channel,
            "subscribers": len(subs),
            "publications": counts["sent"],
            "deliveries": deliveries,
            "expected": expected,
            "deliveries_per_s": deliveries / elapsed if elapsed > 0 else 0.0,
            **_latency_metrics(latencies),
            "lost": expected - deliveries,
            "duplicates": counts["duplicates"],
            "out_of_order": counts["out_of_order"],
            "closed_early": dict(closed),
            "elapsed_s": elapsed,
        }
        return BenchResult("fanout", metrics, latencies)


def _hint(code: Any) -> str:
    if code == "forbidden":
        return " (give a --token whose permissions cover the channel)"
    if code == "rate_limited":
        return " (the server's ROOMCAST_RATE_LIMIT: publish slower with --rate)"
    return ""


async def _until(predicate: Callable[[], Any], within: float) -> bool:
    """Poll ``predicate`` until it is true (True) or ``within`` seconds pass (False)."""
    deadline = perf_counter() + within
    while not predicate():
        if perf_counter() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def with_progress(bench: Bench, console: Console) -> BenchResult:
    """Run ``bench`` with a Rich progress display on ``console`` (erased at the end)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    live = console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=not live) as progress:
        return await bench.run(progress)
