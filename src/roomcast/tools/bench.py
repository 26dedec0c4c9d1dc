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
is the project's own, heavier, measurement; it shares :mod:`roomcast.tools.loadgen` with this
module, which needs nothing but roomcast's dependencies.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from roomcast.tools.console import EXIT_FAILED, EXIT_INTERRUPTED, fail, print_json, stderr, stdout
from roomcast.tools.loadgen import OpenFailed, open_all, raise_file_limit, wait_until
from roomcast.tools.results import BenchResult, latency_metrics, results_table, write_histogram

__all__ = ["Bench", "BenchError", "EchoBench", "FanoutBench", "run", "with_progress"]

perf_counter = time.perf_counter
#: Handshakes in flight at once while connecting.
CONNECT_CONCURRENCY = 64
#: How often progress bars and "is it done yet" checks run.
POLL_S = 0.05


class BenchError(Exception):
    """The benchmark could not run (refused handshake, refused publish...): the message says why."""


class Bench(Protocol):
    """A scenario: it runs once, showing its steps on ``progress``."""

    async def run(self, progress: Progress) -> BenchResult:
        """Connect, load the server, measure, close; raise :class:`BenchError` if it cannot."""
        ...


def run(bench: Bench, histogram: str | None, as_json: bool) -> None:
    """Run ``bench`` for a ``roomcast bench`` command: print the results, exit 1 on problems."""
    err = stderr()
    try:
        result = asyncio.run(with_progress(bench, err))
    except KeyboardInterrupt:
        err.print("interrupted", style="dim")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BenchError as error:
        fail(str(error))
    if as_json:
        print_json(result.summary())
    else:
        stdout().print(results_table(result))
    if histogram:
        problem = write_histogram(result, histogram)
        if problem:
            err.print(f"roomcast: {problem}", style="yellow", markup=False)
        else:
            err.print(f"latency histogram written to {histogram}", style="dim", markup=False)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


async def with_progress(bench: Bench, console: Console) -> BenchResult:
    """Run ``bench`` with a Rich progress display on ``console`` (erased at the end)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    live = console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=not live) as progress:
        return await bench.run(progress)


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


async def _open_many(
    url: str, count: int, token: str | None, wait_s: float, progress: Progress, label: str
) -> list[ClientConnection]:
    """Open ``count`` connections or none: on any failure close the others and raise."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    task = progress.add_task(label, total=count)

    async def one() -> ClientConnection:
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

    async def close(opened: list[ClientConnection]) -> None:
        await _close_all(opened, wait_s)

    raise_file_limit(count + 64)
    try:
        return await open_all(one, count, concurrency=CONNECT_CONCURRENCY, close=close)
    except OpenFailed as error:
        first = _describe(error.failures[0], wait_s)
        raise BenchError(
            f"{len(error.failures)} of {count} connections to {url} failed: {first}"
        ) from None
    finally:
        progress.remove_task(task)


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
    """Round trips: ``connections`` loops of send, wait for the answer, for ``duration`` s."""

    url: str
    connections: int = 64
    duration: float = 5.0
    size: int = 64
    rate: float = 0.0
    token: str | None = None
    timeout: float = 10.0

    async def run(self, progress: Progress) -> BenchResult:
        """Connect, run the loops for ``duration`` seconds, close."""
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
            **latency_metrics(latencies),
            "lost": sent - received,
            "closed_early": dict(closed),
            "elapsed_s": elapsed,
        }
        return BenchResult("echo", metrics, latencies)


# -- fan-out over /ws ------------------------------------------------------------------------


@dataclass
class FanoutBench:
    """``subscribers`` on one channel, one publisher of ``messages`` publications."""

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
            raise BenchError(_refusal("subscribe", frame.get("error") or {}))

    async def run(self, progress: Progress) -> BenchResult:
        """Connect and subscribe everyone, publish, wait for every delivery, close."""
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

        subscriber_tasks = [asyncio.create_task(subscriber(ws)) for ws in subs]
        tasks.extend(subscriber_tasks)
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
        await wait_until(
            lambda: refused or counts["acked"] >= counts["sent"], self.timeout, poll_s=POLL_S
        )
        if refused:
            raise BenchError(_refusal("publish", refused[0]))
        # Wait for every delivery, as long as deliveries keep coming (and subscribers remain).
        wanted = counts["sent"] * len(subs)
        await wait_until(
            lambda: counts["deliveries"] >= wanted or all(t.done() for t in subscriber_tasks),
            math.inf,
            idle=self.timeout,
            progress=lambda: counts["deliveries"],
            poll_s=POLL_S,
        )
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
            **latency_metrics(latencies),
            "lost": expected - deliveries,
            "duplicates": counts["duplicates"],
            "out_of_order": counts["out_of_order"],
            "closed_early": dict(closed),
            "elapsed_s": elapsed,
        }
        return BenchResult("fanout", metrics, latencies)


def _refusal(op: str, error: dict[str, Any]) -> str:
    """Why the server refused a request, with what to do about the common cases."""
    code = error.get("code")
    hint = ""
    if code == "forbidden":
        hint = " (give a --token whose permissions cover the channel)"
    elif code == "rate_limited":
        hint = " (the server's ROOMCAST_RATE_LIMIT: publish slower with --rate)"
    return f"{op} refused: {code}: {error.get('message')}{hint}"
