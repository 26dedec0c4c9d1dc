"""Prometheus metrics at ``GET /metrics`` (docs/metrics.md), with the official client.

The hot paths never call ``prometheus_client``: they count in plain ints (a connection's
messages on the connection, a fan-out's deliveries and duration once per fan-out on the hub or
the node, a Redis command's round trip in a :class:`LocalHistogram`). :meth:`Metrics.flush`
adds what changed since its last run to the real metrics: at each scrape, and in multiprocess
mode also every second and once at shutdown, since a scrape reaches one worker only and reads
the others' values from the files in ``PROMETHEUS_MULTIPROC_DIR``.

Multiprocess mode is on when ``PROMETHEUS_MULTIPROC_DIR`` is set: ``roomcast serve --workers N``
creates a fresh directory and sets it (:func:`prepare_multiprocess_dir`); with plain
``uvicorn --workers N`` the operator sets it (to an empty directory) before starting.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, Request, Response

from roomcast.counters import (
    AUTH_REASONS,
    BROKER_BUCKETS,
    BROKER_OPS,
    CLOSE_CODES,
    FANOUT_BUCKETS,
    LocalHistogram,
    Tally,
    bump,
    close_code_label,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from roomcast.core.node import Node

__all__ = [
    "AUTH_REASONS",
    "BROKER_BUCKETS",
    "BROKER_OPS",
    "CLOSE_CODES",
    "ENDPOINTS",
    "FANOUT_BUCKETS",
    "LocalHistogram",
    "Metrics",
    "Tally",
    "close_code_label",
    "metrics_router",
    "prepare_multiprocess_dir",
]

logger = logging.getLogger("roomcast.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: The ``endpoint`` label: route path templates, never a room or channel name.
ENDPOINTS: Final = (
    "/ws",
    "/ws/echo",
    "/ws/chat",
    "/ws/chat/{room}",
    "/ws/secure",
    "/ws/stream",
    "/ws/methods_text",
    "/ws/methods_bytes",
    "/ws/methods_json",
    "/ws/methods_raw",
)

#: Seconds between flushes in multiprocess mode.
FLUSH_INTERVAL: Final = 1.0


# -- the multiprocess directory ----------------------------------------------------------------


def prepare_multiprocess_dir() -> str:
    """Before starting several worker processes: make sure they share a metrics directory.

    Keeps a ``PROMETHEUS_MULTIPROC_DIR`` the environment already sets; otherwise creates a
    fresh temporary directory, exports it for the workers and removes it when this process
    exits. Returns the directory.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        return given
    path = tempfile.mkdtemp(prefix="roomcast-metrics-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(shutil.rmtree, path, True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_processes(directory: str) -> None:
    """Drop the live gauges a crashed worker left (its counters stay: they happened)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(("gauge_livesum_", "gauge_liveall_")):
                continue
            pid_text = name.rsplit("_", 1)[-1].removesuffix(".db")
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                multiprocess.mark_process_dead(int(pid_text), directory)  # type: ignore[no-untyped-call]


# -- the metrics -----------------------------------------------------------------------------


class Metrics:
    """The metrics of one app, fed from the plain counts of its node by :meth:`flush`."""

    def __init__(self, node: Node) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.node = node
        self.directory = os.environ.get(MULTIPROC_ENV) or None
        self.multiprocess = self.directory is not None
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            _forget_dead_processes(self.directory)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ep = ("endpoint",)
        self.connections_open = Gauge(
            "roomcast_connections_open",
            "WebSocket connections open now (accepted, not yet ended).",
            ep,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_opened = Counter(
            "roomcast_connections_opened", "WebSocket connections accepted.", ep, registry=r
        )
        self.connections_closed = Counter(
            "roomcast_connections_closed",
            "Accepted WebSocket connections that ended, by close code (sent or received).",
            ("code",),
            registry=r,
        )
        self.messages_received = Counter(
            "roomcast_messages_received", "WebSocket messages received.", ep, registry=r
        )
        self.messages_sent = Counter(
            "roomcast_messages_sent",
            "WebSocket messages sent or queued (replies and fan-out deliveries).",
            ep,
            registry=r,
        )
        self.bytes_received = Counter(
            "roomcast_received_bytes",
            "Payload size of the messages received (approximate: characters for text).",
            ep,
            registry=r,
        )
        self.bytes_sent = Counter(
            "roomcast_sent_bytes",
            "Payload size of the messages sent (approximate: characters for text).",
            ep,
            registry=r,
        )
        self.publications = Counter(
            "roomcast_publications",
            "Publications accepted by this node's broker client (/ws publish and HTTP API).",
            registry=r,
        )
        self.fanout_deliveries = Counter(
            "roomcast_fanout_deliveries",
            "Frames queued or written to local members by fan-outs.",
            ("kind",),
            registry=r,
        )
        self.fanout_seconds = Histogram(
            "roomcast_fanout_seconds",
            "Time to queue or write one message to every local member of its room or channel.",
            ("kind",),
            registry=r,
            buckets=FANOUT_BUCKETS,
        )
        self.slow_disconnects = Counter(
            "roomcast_slow_consumer_disconnects",
            "Connections cut for reading too slowly (chat 1013, /ws 4008).",
            ep,
            registry=r,
        )
        self.broker_seconds = Histogram(
            "roomcast_broker_seconds",
            "Round trip of broker (Redis) commands.",
            ("op",),
            registry=r,
            buckets=BROKER_BUCKETS,
        )
        self.broker_reconnects = Counter(
            "roomcast_broker_reconnects", "Times the broker became reachable again.", registry=r
        )
        self.auth_failures = Counter(
            "roomcast_auth_failures",
            "Refused tokens, channels, origins and rates, by reason.",
            ("reason",),
            registry=r,
        )
        # Every series exists from the start (at 0), for dashboards and rate().
        for endpoint in ENDPOINTS:
            for labelled in (
                self.connections_open,
                self.connections_opened,
                self.messages_received,
                self.messages_sent,
                self.bytes_received,
                self.bytes_sent,
            ):
                labelled.labels(endpoint)
        for endpoint in ("/ws", "/ws/chat", "/ws/chat/{room}"):
            self.slow_disconnects.labels(endpoint)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for kind in ("chat", "channel"):
            self.fanout_deliveries.labels(kind)
            self.fanout_seconds.labels(kind)
        self._reported: dict[tuple[str, str], float] = {}
        self._histograms: dict[tuple[str, str], tuple[list[int], float]] = {}
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Multiprocess mode: flush every second, so that any worker's scrape sees the rest."""
        if self.multiprocess:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_forever(), name="roomcast-metrics"
            )

    async def stop(self) -> None:
        """Last flush; in multiprocess mode this process's live gauges go away."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush()
        if self.directory is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.directory)  # type: ignore[no-untyped-call]

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception:
                logger.exception("metrics flush failed")

    # -- flushing -------------------------------------------------------------------------

    def _add(self, counter: Counter, totals: Mapping[str, float]) -> None:
        """Bring ``counter``'s series up to the cumulative ``totals`` (label -> total)."""
        name = counter._name
        reported = self._reported
        for label, total in totals.items():
            key = (name, label)
            delta = total - reported.get(key, 0)
            if delta > 0:
                (counter.labels(label) if label else counter).inc(delta)
                reported[key] = total

    def _observe(self, histogram: Histogram, label: str, local: LocalHistogram) -> None:
        """Bring ``histogram``'s series ``label`` up to the plain counts of ``local``."""
        key = (histogram._name, label)
        counts, total = self._histograms.get(key, ([0] * len(local.counts), 0.0))
        if local.counts == counts:
            return
        child: Any = histogram.labels(label)
        # prometheus_client keeps one value per bucket (not cumulative) and the sum; observe()
        # adds one at a time, we add what accumulated.
        for bucket, now, before in zip(child._buckets, local.counts, counts, strict=True):
            if now != before:
                bucket.inc(now - before)
        child._sum.inc(local.sum - total)
        self._histograms[key] = (list(local.counts), local.sum)

    def flush(self) -> None:
        """Add what the plain counts gained since the last flush to the metrics."""
        node = self.node
        hub, broker = node.hub, node.broker
        tally = node.tally
        opened = dict(tally.opened)
        received = dict(tally.received)
        received_bytes = dict(tally.received_bytes)
        sent = dict(tally.sent)
        sent_bytes = dict(tally.sent_bytes)
        open_now = dict.fromkeys(ENDPOINTS, 0)
        for conn in node.connections:
            endpoint = conn.endpoint
            if conn.opened:
                bump(open_now, endpoint)
                bump(opened, endpoint)
            if conn.received:
                bump(received, endpoint, conn.received)
                bump(received_bytes, endpoint, conn.received_bytes)
            if conn.sent:
                bump(sent, endpoint, conn.sent)
                bump(sent_bytes, endpoint, conn.sent_bytes)
        fanout_sent, fanout_bytes, deliveries = hub.delivered()
        for endpoint, n in fanout_sent.items():
            bump(sent, endpoint, n)
        for endpoint, n in fanout_bytes.items():
            bump(sent_bytes, endpoint, n)
        for endpoint, n in open_now.items():
            self.connections_open.labels(endpoint).set(n)
        self._add(self.connections_opened, opened)
        self._add(self.connections_closed, tally.closes)
        self._add(self.messages_received, received)
        self._add(self.bytes_received, received_bytes)
        self._add(self.messages_sent, sent)
        self._add(self.bytes_sent, sent_bytes)
        self._add(self.fanout_deliveries, deliveries)
        for kind, local in hub.fanout_time.items():
            self._observe(self.fanout_seconds, kind, local)
        self._add(self.slow_disconnects, dict(tally.slow))
        self._add(self.auth_failures, tally.auth_failures)
        self._add(self.publications, {"": getattr(broker, "publications", 0)})
        self._add(self.broker_reconnects, {"": getattr(broker, "reconnects", 0)})
        timings: dict[str, LocalHistogram] = getattr(broker, "timings", {})
        for op, local in timings.items():
            self._observe(self.broker_seconds, op, local)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric (all workers' in multiprocess mode) and the content type.

        The Prometheus text format (0.0.4), or OpenMetrics if ``accept`` (the scraper's Accept
        header) asks for it.
        """
        from prometheus_client.exposition import choose_encoder

        self.flush()
        registry: CollectorRegistry = self.registry
        if self.directory is not None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, self.directory)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type


def metrics_router(metrics: Metrics) -> APIRouter:
    """``GET /metrics`` (not in the OpenAPI document; no API key: firewall it)."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    return router
