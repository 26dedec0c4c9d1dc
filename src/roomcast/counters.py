"""Plain counters for the hot paths: ints and lists, no Prometheus calls.

A connection counts its own messages; a fan-out counts its deliveries and its duration once per
fan-out; a broker round trip lands in a :class:`LocalHistogram`. :mod:`roomcast.metrics` reads
these when Prometheus scrapes and adds what changed to the real metrics. This module imports
nothing of roomcast at run time, so every layer may use it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from roomcast.connection import Connection

__all__ = [
    "AUTH_REASONS",
    "BROKER_BUCKETS",
    "BROKER_OPS",
    "CLOSE_CODES",
    "FANOUT_BUCKETS",
    "LocalHistogram",
    "Tally",
    "bump",
    "close_code_label",
]

#: The ``code`` label of closes: these codes, "other" for any other, "none" for no code.
CLOSE_CODES: Final = frozenset({*range(1000, 1016), 4001, 4002, 4003, 4008, 4009, 4029} - {1004})

#: The ``reason`` label of auth failures.
AUTH_REASONS: Final = (
    "unknown_token",
    "expired",
    "bad_signature",
    "forbidden_channel",
    "origin",
    "rate_limited",
    "other",
)

#: The ``op`` label of broker round trips (Redis commands), a fixed set.
BROKER_OPS: Final = (
    "publish",
    "position",
    "history",
    "presence",
    "presence_add",
    "presence_remove",
    "presence_refresh",
    "emit",
    "command",
    "subscribe",
    "channels",
)

#: Fan-out durations: 10 µs .. 1 s.
FANOUT_BUCKETS: Final = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
#: Broker round trips: 100 µs .. 5 s.
BROKER_BUCKETS: Final = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class LocalHistogram:
    """A histogram in plain ints: :meth:`observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: Observations per bucket (not cumulative); the last one is +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class Tally:
    """Counts of one app that are not on a live connection: ended connections, rare events."""

    __slots__ = (
        "auth_failures",
        "closes",
        "opened",
        "received",
        "received_bytes",
        "sent",
        "sent_bytes",
        "slow",
    )

    def __init__(self) -> None:
        #: By endpoint, the counts of the connections that ended.
        self.opened: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.received_bytes: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.sent_bytes: dict[str, int] = {}
        #: Accepted connections that ended, by close code label.
        self.closes: dict[str, int] = {}
        #: Slow consumers cut (chat 1013, /ws 4008), by endpoint.
        self.slow: dict[str, int] = {}
        #: Refused tokens, channels, origins and rates, by reason.
        self.auth_failures: dict[str, int] = {}

    def ended(self, conn: Connection) -> None:
        """``conn`` is over: keep its counts (it leaves the runtime's live connections now)."""
        endpoint = conn.endpoint
        if conn.opened:
            bump(self.opened, endpoint)
            bump(self.closes, close_code_label(conn.close_code))
        if conn.received:
            bump(self.received, endpoint, conn.received)
            bump(self.received_bytes, endpoint, conn.received_bytes)
        if conn.sent:
            bump(self.sent, endpoint, conn.sent)
            bump(self.sent_bytes, endpoint, conn.sent_bytes)

    def auth_failed(self, reason: str) -> None:
        bump(self.auth_failures, reason if reason in AUTH_REASONS else "other")

    def cut(self, endpoint: str) -> None:
        bump(self.slow, endpoint)


def close_code_label(code: int | None) -> str:
    """The bounded ``code`` label of a close code."""
    if code is None:
        return "none"
    return str(code) if code in CLOSE_CODES else "other"
