"""What every roomcast load generator does the same way, whatever its WebSocket client.

``roomcast bench`` (:mod:`roomcast.tools.bench`, on the websockets client) and the benchmark
harness (benchmarks/, on picows and uvloop) both open many connections at once, bounded and all
or none (:func:`open_all`), after raising the open-file limit (:func:`raise_file_limit`); wait
for a condition with a time limit and an idle limit (:func:`wait_until`); and read latencies as
nearest-rank percentiles (:func:`percentile`). This module needs the standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

__all__ = [
    "POLL_INTERVAL_S",
    "OpenFailed",
    "Outcome",
    "open_all",
    "percentile",
    "percentile_ms",
    "raise_file_limit",
    "wait_until",
]

T = TypeVar("T")

#: How often :func:`wait_until` checks its condition unless told otherwise.
POLL_INTERVAL_S = 0.005
#: How a :func:`wait_until` ended: the condition held, the time limit passed, or nothing
#: happened for the idle limit.
Outcome = Literal["done", "timeout", "idle"]


class OpenFailed(Exception):
    """Some connections of :func:`open_all` failed; the ones that opened are closed already."""

    def __init__(self, count: int, failures: Sequence[Exception]) -> None:
        """Keep how many connections were wanted and why each failed one failed."""
        super().__init__(f"{len(failures)} of {count} connections failed; first: {failures[0]!r}")
        self.count = count
        self.failures = list(failures)


async def open_all(
    open_one: Callable[[], Awaitable[T]],
    count: int,
    *,
    concurrency: int,
    close: Callable[[list[T]], Awaitable[None]],
) -> list[T]:
    """Open ``count`` connections with ``open_one``, at most ``concurrency`` at a time.

    All or none: if any fails, the ones that opened go to ``close`` and :class:`OpenFailed`
    names the failures; a cancellation or an interrupt among them is raised as it is. The bound
    is there because a burst of thousands of handshakes overflows the server's accept backlog,
    which would look like a failure of the server.
    """
    limit = asyncio.Semaphore(concurrency)

    async def one() -> T:
        async with limit:
            return await open_one()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    opened = [result for result in results if not isinstance(result, BaseException)]
    failures = [result for result in results if isinstance(result, BaseException)]
    if not failures:
        return opened
    await close(opened)
    for failure in failures:
        if not isinstance(failure, Exception):  # CancelledError, KeyboardInterrupt
            raise failure
    raise OpenFailed(count, [failure for failure in failures if isinstance(failure, Exception)])


def raise_file_limit(wanted: int) -> int:
    """Raise the soft limit of open files to the hard limit; return the soft limit now.

    Every connection is a file descriptor, and processes started afterwards (the servers of
    benchmarks/) inherit the limit. Where the hard limit is infinite the soft one goes to
    ``wanted``. Best effort: where the system refuses (macOS caps below an infinite hard
    limit), the limit stays as it was; where there is no such limit (no ``resource`` module, or
    an infinite soft limit), the answer is ``sys.maxsize``.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return sys.maxsize
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def wait_until(
    done: Callable[[], object],
    limit_s: float,
    idle: float | None = None,
    progress: Callable[[], float] | None = None,
    *,
    poll_s: float = POLL_INTERVAL_S,
) -> Outcome:
    """Check ``done()`` every ``poll_s`` seconds until it is true; say how the wait ended.

    "timeout": ``limit_s`` seconds passed. "idle": ``progress()`` (a counter of useful events,
    such as deliveries) did not change for ``idle`` seconds; without ``progress`` a wait is
    never idle. Polling rather than an event: the counters are bumped by frame callbacks on the
    load generator's hot path, which must stay a few bytecodes long.
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
        await asyncio.sleep(poll_s)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Return the ``pct`` percentile of ``values`` (nearest rank), or None if there are none.

    The rank is ``round(pct / 100 * n + 0.5)``, the rule every figure of docs/benchmarks.md was
    computed with: ``ceil(pct / 100 * n)`` except where ``pct / 100 * n`` is a whole number,
    where Python's round() (half to even) takes that rank or the next one up.
    """
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
