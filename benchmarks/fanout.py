"""What the fan-out scenarios (``chat.py``, ``channel.py``, ``cluster.py``) measure alike.

Each has receivers on one room or channel (:class:`Receiver`) that count into shared
:class:`Receipts`, sends a burst of measured messages, waits until every delivery arrived (or
the room stopped: a time limit, and an idle limit with no frame at all), and reports the same
figures (:class:`BurstResult`): deliveries per second from the first send to the last receipt,
and the latency of each message that reached every receiver, from its send to its last
receipt.

A burst is sent at one of two load shapes (:func:`pace`): back to back ("max rate"), or one
message every ``interval_s`` ("paced"). Receivers may be spread over several servers (the
nodes of one cluster): :func:`split` shares them out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from picows import WSFrame, WSTransport

from clients import Client
from cpu import Usage
from roomcast.tools.loadgen import Outcome, percentile_ms, wait_until

perf_counter = time.perf_counter


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` shares that differ by one at most (larger ones first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def pace(send: Callable[[int], None], count: int, interval_s: float) -> None:
    """Call ``send(i)`` for i in 0..count-1: back to back if ``interval_s`` is 0, else message
    i at ``i * interval_s`` after the first.

    Paced sends wait on the event loop's timer (millisecond resolution, and late whenever
    frame callbacks hold the loop); a message whose time has passed is sent at once, so the
    burst keeps its rate on average. ``send`` stamps its own send time: latencies run from
    when a message really left, not from when it was due.
    """
    if interval_s <= 0:
        for i in range(count):
            send(i)
        return
    start = perf_counter()
    i = 0
    while i < count:
        due = min(count, int((perf_counter() - start) / interval_s) + 1)
        while i < due:
            send(i)
            i += 1
        if i < count:
            await asyncio.sleep(max(0.0, start + i * interval_s - perf_counter()))


class Receipts:
    """The receipt counters every receiver of one run shares (chat, ``/ws`` or cluster).

    ``count[i]``: deliveries of measured message i, all receivers together; ``last[i]``: the
    time of its latest delivery; ``others``: every other frame received.
    """

    count: list[int]
    last: list[float]
    others: int

    @property
    def measured(self) -> int:
        """Return how many measured messages arrived so far, all receivers together."""
        return sum(self.count)

    def progress(self) -> int:
        """Return a counter of every frame received so far (for the idle timeouts)."""
        return sum(self.count) + self.others

    async def drain(self, expected: int, limit_s: float, idle_s: float) -> Outcome:
        """Wait until ``expected`` measured deliveries arrived; say how the wait ended."""
        return await wait_until(lambda: self.measured >= expected, limit_s, idle_s, self.progress)

    def burst(self, expected: int, outcome: Outcome, usage: Usage) -> Burst:
        """Return what arrived so far, for the figures (taken as the measured window ends)."""
        return Burst(expected, outcome, usage, self.measured, list(self.count), list(self.last))


class Receiver(Client):
    """A receiver of a fan-out run (a chat member, a ``/ws`` subscriber), with the hot path.

    The hot path is kept to what the figures need, and every kind of receiver shares it, so
    that the endpoints are measured with the same client work per delivery: the received bytes
    compared with the exact frame due next, ``frames[next]`` (which checks content and order
    at once), a time stamp and a count. The time stamp is stored without comparing: callbacks
    run one at a time and perf_counter() is monotonic, so the latest call is the latest
    receipt. Anything else takes the slow path, which each kind has its own of.
    """

    def __init__(self, receipts: Receipts, frames: list[bytes | None]) -> None:
        """Count into ``receipts``; ``frames``: the measured frames in order, then ``None``."""
        super().__init__()
        self.frames = frames
        self.count = receipts.count
        self.last = receipts.last
        self.next = 0  # the index in ``frames`` of the frame due next

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Count the measured frame due next (fast path) or classify any other frame."""
        seq = self.next
        if frame.get_payload_as_bytes() == self.frames[seq]:
            self.last[seq] = perf_counter()
            self.count[seq] += 1
            self.next = seq + 1
            return
        self.slow_path(transport, frame)

    def slow_path(self, transport: WSTransport, frame: WSFrame) -> None:
        """Classify a frame that is not the measured frame due next."""
        raise NotImplementedError


@dataclass
class Burst:
    """What a measured burst delivered, as its window ended."""

    expected: int
    outcome: Outcome
    usage: Usage
    delivered: int
    counts: list[int]
    lasts: list[float]

    def figures(
        self, send_times: Sequence[float], first_sent: float, receivers: int
    ) -> dict[str, Any]:
        """Return the :class:`BurstResult` fields the burst gives.

        ``send_times[i]``: when measured message i was sent; a message counts for the latency
        figures once it reached all ``receivers``.
        """
        lasts, counts, delivered = self.lasts, self.counts, self.delivered
        span = max(lasts, default=0.0) - first_sent
        complete = [lasts[i] - send_times[i] for i in range(len(counts)) if counts[i] >= receivers]
        return {
            "expected": self.expected,
            "delivered": delivered,
            "dps": delivered / span if delivered and span > 0 else 0.0,
            "p50_ms": percentile_ms(complete, 50),
            "p99_ms": percentile_ms(complete, 99),
            "complete_messages": len(complete),
            "outcome": self.outcome,
            "usage": self.usage,
        }


@dataclass
class BurstResult:
    """Figures every fan-out run reports (its measured burst)."""

    messages: int
    expected: int
    delivered: int
    dps: float
    p50_ms: float | None
    p99_ms: float | None
    complete_messages: int
    outcome: str
    mismatched: int
    unexpected: int
    connect_s: float
    usage: Usage

    @property
    def lost(self) -> int:
        """Return how many expected deliveries never arrived."""
        return self.expected - self.delivered
