"""Soak test: churn, slow readers and Redis restarts against two roomcast nodes sharing Redis.

Not part of ``run.py``'s report nor of CI. ``python benchmarks/soak.py --duration 600`` runs
ten minutes; ``--duration 60`` is the quick check. It starts its own ``redis-server`` (a free
loopback port, ``--save '' --appendonly no``: a restart comes back empty) and two
``roomcast serve --broker redis://...`` nodes on free loopback ports, then, until the duration
is over:

- subscribers connect to ``/ws`` on either node, subscribe to two channels (with ``recover``
  from the second connection on), read for a few seconds, close (or drop the TCP connection)
  and come back;
- slow readers, on sockets with small buffers, subscribed to every channel and to
  ``soak:bulk`` (large publications, so that their buffers fill within seconds), read for a
  while and then stop reading until the server cuts them (4008), then read what came before the
  close, reconnect and recover;
- publishers publish at a steady rate through ``/ws`` ``publish`` (both nodes) and
  ``POST /api/publish`` (both nodes), so publications cross nodes through Redis;
- chat members talk on ``/ws/chat/{room}`` and come and go;
- every ``--restart-every`` seconds redis-server is killed (SIGKILL) and started again on the
  same port, losing every channel's history.

Correctness, per subscriber and channel: the subscriber's epoch is the one of its latest
subscribe reply, and the offsets it receives must follow each other one by one from the point
that reply gives (``offset`` for a plain subscribe, the recovered offset for
``recovered: true``, the oldest offset the history must still hold for ``recovered: false``).
A skipped offset is a publication lost while the history still held it; so is, at the end
(publishers stopped, the stream quiet), any offset between a subscriber's last one and the
channel's offset in Redis. Every received publication is also checked against its publish
reply (same channel, epoch and offset), which catches a publication of a new stream delivered
to a subscriber that was never told of the reset. A reset is legitimate only when the
subscriber was told: a close (1012, 4008, ...) followed by a subscribe reply with
``recovered: false``.

Every ~10 s: each node's RSS (``VmRSS``), ``GET /stats`` (connections, asyncio tasks) and Redis's
``used_memory``. At the end a table is printed and the "Soak" section of docs/benchmarks.md
(between ``<!-- soak:start -->`` and ``<!-- soak:end -->``) is written or replaced. Exit status
1 when anything was lost or another correctness check failed.

``--src DIR`` runs the nodes from another source tree (a candidate fix, an older release).
Loopback only; every loop is bounded by the duration (plus a bounded drain); the servers are
killed on every way out, Ctrl-C included, and (``PR_SET_PDEATHSIG``) if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from servers import (
    HOST,
    REPO_DIR,
    ServerProcess,
    ServerSpec,
    free_port,
    http_status,
    log_dir,
    redis_argv,
    redis_version,
    scan_logs,
)

TOKEN = "soak-token"
API_KEY = "soak-api-key"
HISTORY_SIZE = 256
#: Above HISTORY_SIZE of the largest frames (soak:bulk's, about 8.1 KB): the history then keeps
#: exactly the newest HISTORY_SIZE publications of every channel, which the check relies on.
HISTORY_BYTES = 4 * 1024 * 1024
OUTBOX_SIZE = 256
CLOSE_TIMEOUT_S = 30
PRESENCE_TTL_S = 10
#: The nodes' settings. One user for every client, so the per-user connection limit is off; a
#: small outbox so that a slow reader is cut within seconds; a long close timeout so that a
#: slow reader that resumes reading still finds the close frame (and its code) in its buffers;
#: a history bounded by its count, not its bytes (see HISTORY_BYTES).
NODE_ENV = {
    "ROOMCAST_LOG_LEVEL": "warning",
    "ROOMCAST_ACCESS_LOG": "false",
    "ROOMCAST_TOKENS": json.dumps({TOKEN: "soak"}),
    "ROOMCAST_API_KEY": API_KEY,
    "ROOMCAST_MAX_CONNECTIONS_PER_USER": "0",
    "ROOMCAST_HISTORY_SIZE": str(HISTORY_SIZE),
    "ROOMCAST_HISTORY_BYTES": str(HISTORY_BYTES),
    "ROOMCAST_OUTBOX_SIZE": str(OUTBOX_SIZE),
    "ROOMCAST_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT_S),
    "ROOMCAST_PRESENCE_TTL": str(PRESENCE_TTL_S),
}
CHANNEL_PREFIX = "soak:"
#: The channel only slow readers subscribe to: large publications fill a reader's buffers (the
#: server's kernel send buffer grows to hundreds of KiB even for a small-window peer) in seconds.
BULK_CHANNEL = "soak:bulk"
BULK_PAD = 8000
CHAT_SAYS = "Client says: "
CHAT_LEAVE = "A client left the chat"

SUB_LIFETIME_S = (3.0, 20.0)
CHAT_LIFETIME_S = (10.0, 40.0)
CHAT_SEND_EVERY_S = (1.0, 3.0)
SLOW_READ_S = (3.0, 8.0)
SLOW_PAUSE_S = (10.0, 20.0)
#: After a pause, how long a slow reader reads waiting for the server's close before it gives up.
SLOW_RESUME_S = 10.0
SLOW_RCVBUF = 4096
SLOW_MSS = 1024
#: Share of the subscribers' own disconnections that drop the TCP connection without a close.
ABORT_SHARE = 0.2
RECONNECT_DELAY_S = (0.05, 0.5)
RETRY_DELAY_S = 0.5
MAX_INFLIGHT = 200
API_CONCURRENCY = 16
REQUEST_TIMEOUT_S = 5.0
#: A delivery whose publish reply has not come after this long: never acknowledged.
PENDING_ACK_S = 30.0
READY_WAIT_S = 30.0
CONVERGE_S = 20.0
IDLE_WAIT_S = 15.0
PUBLISHER_DRAIN_S = 5.0
ANOMALIES_KEPT = 500
ANOMALIES_SHOWN = 20
MARK_START = "<!-- soak:start -->"
MARK_END = "<!-- soak:end -->"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """The soak's sizes and timings (see ``parse_args``)."""

    duration: float
    subscribers: int
    channels: int
    per_subscriber: int
    slow: int
    chat: int
    rooms: int
    rate: float
    bulk_rate: float
    api_share: float
    ws_publishers: int
    restart_every: float
    redis_downtime: float
    sample_every: float
    warmup: float
    seed: int
    src: Path
    output: Path | None
    argv: tuple[str, ...]

    @property
    def channel_names(self) -> list[str]:
        return [f"{CHANNEL_PREFIX}{i}" for i in range(self.channels)]

    @property
    def all_channels(self) -> list[str]:
        return self.channel_names + ([BULK_CHANNEL] if self.bulk_rate > 0 else [])

    def restart_times(self) -> list[float]:
        """When Redis is killed: half a period in, then every period, none in the last 5 s."""
        times: list[float] = []
        at = self.restart_every / 2
        while at < self.duration - 5:
            times.append(at)
            at += self.restart_every
        return times


@dataclass
class Anomaly:
    """One correctness failure, with where and when it happened."""

    t: float
    kind: str
    where: str
    detail: str
    context: str

    def line(self) -> str:
        return f"t={self.t:.1f} s {self.kind}: {self.where}: {self.detail} ({self.context})"


@dataclass
class Group:
    """Anomalies of one kind about the same publications (one per subscriber that saw it)."""

    kind: str
    what: str
    first: Anomaly
    count: int = 0
    nodes: set[int] = field(default_factory=set)
    last_t: float = 0.0

    def line(self) -> str:
        nodes = ", ".join(str(n) for n in sorted(self.nodes)) or "?"
        span = f"t={self.first.t:.1f} s" + (
            f"-{self.last_t:.1f} s" if self.last_t - self.first.t >= 0.1 else ""
        )
        return (
            f"{span} {self.kind}: {self.what}: {self.count} time(s), node(s) {nodes}; first: "
            f"{self.first.where}: {self.first.detail} ({self.first.context})"
        )


@dataclass
class Restart:
    """One Redis restart: killed, answering again, both nodes ready again (seconds into the run)."""

    killed: float
    up: float | None = None
    ready: float | None = None


@dataclass
class Sample:
    """Resources at one moment."""

    t: float
    label: str
    rss: list[int | None]
    stats: list[dict[str, int] | None]
    redis_memory: int | None


class Track:
    """What one subscriber knows of one channel."""

    __slots__ = ("channel", "context", "epoch", "first", "offset", "reply_t", "state")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.epoch: str | None = None
        #: The last offset received in ``epoch`` (or the starting point the reply gave).
        self.offset = 0
        #: idle (not subscribed), waiting (subscribe sent), live (reply received).
        self.state = "idle"
        self.context = ""
        self.reply_t = 0.0
        #: No publication received yet since the reply.
        self.first = True


class Retry(Exception):
    """End this connection and try again shortly (e.g. a subscribe refused while Redis is down)."""


class Soak:
    """Shared state: clock, counters, the publish ledger and the anomalies."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.stop_at = self.t0 + cfg.duration
        self.nodes: list[ServerProcess] = []
        self.counts: Counter[str] = Counter()
        #: Deliveries lost, and the distinct publications they were: (channel, epoch, offset).
        self.lost = 0
        self.lost_publications: set[tuple[str, str, int]] = set()
        self.anomalies: list[Anomaly] = []
        self.groups: dict[tuple[str, str], Group] = {}
        self.anomaly_kinds: Counter[str] = Counter()
        self.restarts: list[Restart] = []
        self.samples: list[Sample] = []
        #: The ledger: publication id -> (channel, epoch, offset) from its publish reply, and back.
        self.by_pid: dict[str, tuple[str, str, int]] = {}
        self.by_pos: dict[tuple[str, str, int], str] = {}
        #: Deliveries whose publish reply had not come yet: (t, who, channel, epoch, offset, pid).
        self.pending: deque[tuple[float, str, str, str, int, str]] = deque()
        self.unacked_delivered: set[str] = set()
        self.subscribers: list[Subscriber] = []
        self.http: httpx.AsyncClient | None = None
        #: The code the nodes run and when they started, for the report.
        self.code = git_code(cfg.src)
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    # -- clock and bookkeeping ------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the load started."""
        return self.loop.time() - self.t0

    @property
    def loading(self) -> bool:
        return self.loop.time() < self.stop_at

    def ws_url(self, node: int, path: str) -> str:
        return f"ws://{HOST}:{self.nodes[node].spec.port}{path}"

    def http_url(self, node: int, path: str) -> str:
        return f"http://{HOST}:{self.nodes[node].spec.port}{path}"

    def near_event(self, t: float) -> str:
        """Where ``t`` falls relative to the Redis restarts."""
        before = [(i, r) for i, r in enumerate(self.restarts, 1) if r.killed <= t]
        if not before:
            return "before the first Redis restart"
        i, r = before[-1]
        text = f"{t - r.killed:.1f} s after Redis restart #{i} (killed at {r.killed:.1f} s"
        if r.ready is not None:
            text += f", nodes ready at {r.ready:.1f} s"
        return text + ")"

    def anomaly(
        self,
        kind: str,
        where: str,
        detail: str,
        context: str = "",
        *,
        group: str | None = None,
        node: int | None = None,
    ) -> None:
        """Record a correctness failure; ``group`` names what it is about (the publications),
        so that one fault seen by many subscribers is reported once, with their count."""
        t = self.now()
        self.anomaly_kinds[kind] += 1
        full = f"{context}; {self.near_event(t)}" if context else self.near_event(t)
        anomaly = Anomaly(t, kind, where, detail, full)
        if len(self.anomalies) < ANOMALIES_KEPT:
            self.anomalies.append(anomaly)
        key = (kind, group or f"{where}: {detail}")
        entry = self.groups.get(key)
        if entry is None:
            entry = self.groups[key] = Group(kind, key[1], anomaly)
        entry.count += 1
        entry.last_t = t
        if node is not None:
            entry.nodes.add(node + 1)

    def lose(self, channel: str, epoch: str, first: int, last: int) -> None:
        """Count offsets ``first``..``last`` of ``channel``'s ``epoch`` lost (one subscriber)."""
        self.lost += last - first + 1
        if len(self.lost_publications) < 1_000_000:
            self.lost_publications.update((channel, epoch, o) for o in range(first, last + 1))

    def closed_by_server(self, code: int) -> None:
        self.counts[f"closed by the server {code}"] += 1

    # -- the ledger -----------------------------------------------------------------------

    def ack(self, pid: str, channel: str, epoch: str, offset: int, via: str) -> None:
        """Record a publish reply."""
        self.counts[f"acknowledged ({via})"] += 1
        if channel == BULK_CHANNEL:
            self.counts["acknowledged (bulk)"] += 1
        key = (channel, epoch, offset)
        other = self.by_pos.get(key)
        if other is not None and other != pid:
            self.anomaly(
                "one offset for two publications",
                channel,
                f"epoch {epoch} offset {offset} acknowledged for {other} and {pid}",
            )
        self.by_pos[key] = pid
        self.by_pid[pid] = key

    def delivered(self, who: str, channel: str, epoch: str, offset: int, pid: str) -> None:
        """Check a delivery against its publish reply (now, or once the reply is in)."""
        self.counts["deliveries"] += 1
        known = self.by_pid.get(pid)
        if known is None:
            self.pending.append((self.now(), who, channel, epoch, offset, pid))
        elif known != (channel, epoch, offset):
            self._mismatch(who, channel, epoch, offset, pid, known)

    def _mismatch(
        self,
        who: str,
        channel: str,
        epoch: str,
        offset: int,
        pid: str,
        known: tuple[str, str, int],
    ) -> None:
        kind = (
            "publication of another epoch (reset not told)"
            if known[1] != epoch
            else "offset differs from the publish reply"
        )
        self.anomaly(
            kind,
            f"{who} {channel}",
            f"{pid} received as epoch {epoch} offset {offset}, acknowledged as epoch "
            f"{known[1]} offset {known[2]} on {known[0]}",
            group=f"{channel}, {pid} (epoch {known[1]} offset {known[2]}) as epoch {epoch}",
        )

    def resolve_pending(self, final: bool = False) -> None:
        """Check the deliveries whose publish replies have come since."""
        now = self.now()
        keep: deque[tuple[float, str, str, str, int, str]] = deque()
        while self.pending:
            item = self.pending.popleft()
            t, who, channel, epoch, offset, pid = item
            known = self.by_pid.get(pid)
            if known is not None:
                if known != (channel, epoch, offset):
                    self._mismatch(who, channel, epoch, offset, pid, known)
            elif final or now - t > PENDING_ACK_S:
                self.unacked_delivered.add(pid)
            else:
                keep.append(item)
        self.pending = keep

    # -- a subscriber's view --------------------------------------------------------------

    def gap(self, sub: Subscriber, track: Track, expected: int, got: int) -> None:
        """Offsets ``expected`` .. ``got - 1`` never came: lost while the history held them."""
        missing = got - expected
        assert track.epoch is not None
        self.lose(track.channel, track.epoch, expected, got - 1)
        when = "first publication after" if track.first else "live, after"
        self.anomaly(
            "lost (history held them)",
            f"{sub.name} on node {sub.node + 1}, {track.channel}",
            f"epoch {track.epoch}: offsets {expected}..{got - 1} ({missing}) missing, "
            f"next received {got}",
            f"{when} {track.context} {self.now() - track.reply_t:.1f} s earlier; "
            f"last close: {sub.last_close}",
            group=f"{track.channel}, epoch {track.epoch}, offsets {expected}..{got - 1}",
            node=sub.node,
        )


class Subscriber:
    """A ``/ws`` client of a few channels that comes and goes (or, ``slow``, stops reading)."""

    def __init__(self, soak: Soak, index: int, node: int, channels: list[str], slow: bool) -> None:
        self.soak = soak
        self.node = node
        self.slow = slow
        self.name = f"{'slow' if slow else 'sub'}{index}"
        self.tracks = {channel: Track(channel) for channel in channels}
        self.requests: dict[int, tuple[Track, tuple[str, int] | None]] = {}
        self.next_id = 0
        self.last_close = "none"
        self.connected = False
        #: A slow reader not reading on purpose.
        self.paused = False

    async def run(self, hard_end: float) -> None:
        soak = self.soak
        while soak.loop.time() < hard_end:
            await self.session()
            await asyncio.sleep(soak.rng.uniform(*RECONNECT_DELAY_S))

    async def session(self) -> None:
        soak = self.soak
        try:
            ws = await open_ws(soak.ws_url(self.node, "/ws"), slow=self.slow)
        except (OSError, TimeoutError, InvalidHandshake) as error:
            soak.counts[f"connect failed ({type(error).__name__})"] += 1
            await asyncio.sleep(RETRY_DELAY_S)
            return
        soak.counts["connects"] += 1
        self.connected = True
        self.paused = False
        self.requests.clear()
        try:
            await self.subscribe_all(ws)
            if self.slow:
                await self.slow_session(ws)
            else:
                await self.read(ws, self.life_end(SUB_LIFETIME_S))
                if soak.rng.random() < ABORT_SHARE:
                    ws.transport.abort()
                    soak.counts["dropped by the client (no close)"] += 1
                    self.last_close = f"dropped by the client at {soak.now():.1f} s"
                else:
                    await ws.close()
                    soak.counts["closed by the client"] += 1
                    self.last_close = f"closed by the client at {soak.now():.1f} s"
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            soak.closed_by_server(code)
            if code == 4008 and not self.paused:
                soak.counts["4008 while reading"] += 1
            self.last_close = f"{code} at {soak.now():.1f} s"
        except Retry:
            ws.transport.abort()
            await asyncio.sleep(RETRY_DELAY_S)
        finally:
            self.connected = False
            for track in self.tracks.values():
                track.state = "idle"
            ws.transport.abort()

    async def slow_session(self, ws: ClientConnection) -> None:
        soak = self.soak
        await self.read(ws, self.life_end(SLOW_READ_S))
        if not soak.loading:
            await self.read(ws, None)
            return
        chosen = soak.rng.uniform(*SLOW_PAUSE_S)
        pause = min(chosen, soak.stop_at - soak.loop.time())
        soak.counts["slow reader pauses"] += 1
        self.paused = True
        try:
            await asyncio.sleep(max(0.0, pause))  # not reading: the server's buffers fill up
            await self.read(ws, soak.loop.time() + SLOW_RESUME_S)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            soak.counts[f"slow reader pauses ended by {code}"] += 1
            raise
        self.paused = False
        if pause < chosen:
            soak.counts["slow reader pauses cut short by the end"] += 1
        else:
            soak.counts["slow reader pauses not cut"] += 1
        await ws.close()
        self.last_close = f"closed by the client at {soak.now():.1f} s"

    def life_end(self, span: tuple[float, float]) -> float | None:
        """When to leave: a random lifetime, or never (None) once the load has stopped."""
        soak = self.soak
        end = soak.loop.time() + soak.rng.uniform(*span)
        return end if end < soak.stop_at else None

    async def subscribe_all(self, ws: ClientConnection) -> None:
        for track in self.tracks.values():
            self.next_id += 1
            request: dict[str, Any] = {"id": self.next_id, "op": "subscribe"}
            request["channel"] = track.channel
            recover = None
            if track.epoch is not None:
                recover = (track.epoch, track.offset)
                request["recover"] = {"epoch": track.epoch, "offset": track.offset}
            self.requests[self.next_id] = (track, recover)
            track.state = "waiting"
            await ws.send(orjson.dumps(request).decode())

    async def read(self, ws: ClientConnection, until: float | None) -> None:
        """Handle frames until ``until`` (loop time; None: until the connection ends)."""
        handle = self.handle
        if until is None:
            while True:
                handle(await ws.recv())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                while True:
                    handle(await ws.recv())

    def handle(self, raw: str | bytes) -> None:
        message = orjson.loads(raw)
        kind = message.get("type")
        if kind == "publication":
            self.on_publication(message)
        elif kind is None and "id" in message:
            self.on_reply(message)

    def on_reply(self, message: dict[str, Any]) -> None:
        soak = self.soak
        entry = self.requests.pop(message["id"], None)
        if entry is None:
            soak.anomaly("reply to no request", self.name, repr(message)[:200])
            return
        track, recover = entry
        if not message.get("ok"):
            code = message.get("error", {}).get("code")
            soak.counts[f"subscribe refused ({code})"] += 1
            raise Retry
        result = message["result"]
        epoch, top = result["epoch"], result["offset"]
        where = f"{self.name} on node {self.node + 1}, {track.channel}"
        if recover is None:
            base, context = top, "a plain subscribe"
        else:
            old_epoch, old_offset = recover
            replayed = result.get("replayed")
            if result.get("recovered"):
                soak.counts["recovered: true"] += 1
                base, context = old_offset, f"recovered: true (replayed {replayed})"
                if epoch != old_epoch or replayed != top - old_offset:
                    soak.anomaly(
                        "wrong recovered: true reply",
                        where,
                        f"recover from epoch {old_epoch} offset {old_offset}; reply {result}",
                    )
                    base = top
            else:
                soak.counts["recovered: false"] += 1
                if epoch != old_epoch:
                    soak.counts["recovered: false, new epoch"] += 1
                    base = max(0, top - HISTORY_SIZE)
                    context = f"recovered: false, new epoch (replayed {replayed})"
                elif old_offset <= top:
                    # The same stream: the history holds its last HISTORY_SIZE publications.
                    base = max(old_offset, top - HISTORY_SIZE)
                    context = f"recovered: false, same epoch (replayed {replayed})"
                else:
                    soak.anomaly(
                        "recover offset beyond the stream",
                        where,
                        f"recover from offset {old_offset} of epoch {epoch}, whose offset is {top}",
                    )
                    base, context = top, "recovered: false, offset beyond the stream"
        soak.counts["replayed"] += result.get("replayed") or 0
        track.epoch, track.offset, track.state = epoch, base, "live"
        track.context, track.reply_t, track.first = context, soak.now(), True

    def on_publication(self, message: dict[str, Any]) -> None:
        soak = self.soak
        channel = message.get("channel")
        track = self.tracks.get(channel) if isinstance(channel, str) else None
        if track is None or track.state != "live" or track.epoch is None:
            soak.anomaly(
                "publication outside a subscription",
                f"{self.name} {channel}",
                f"offset {message.get('offset')} while {track.state if track else 'unknown'}",
            )
            return
        offset = message["offset"]
        data = message.get("data")
        pid = data.get("p") if isinstance(data, dict) else None
        expected = track.offset + 1
        if offset != expected:
            if offset > expected:
                soak.gap(self, track, expected, offset)
            else:
                soak.anomaly(
                    "duplicate or out of order",
                    f"{self.name} on node {self.node + 1}, {track.channel}",
                    f"epoch {track.epoch}: offset {offset} after {track.offset}",
                    f"after {track.context}",
                    group=f"{track.channel}, epoch {track.epoch}, offset {offset}",
                    node=self.node,
                )
                return
        track.offset = offset
        track.first = False
        if not isinstance(pid, str):
            soak.anomaly("unexpected data", f"{self.name} {channel}", repr(data)[:200])
            return
        soak.delivered(self.name, track.channel, track.epoch, offset, pid)


class ChatMember:
    """A ``/ws/chat/{room}`` member that talks now and then, and comes and goes."""

    def __init__(self, soak: Soak, index: int, node: int, room: str) -> None:
        self.soak = soak
        self.name = f"c{index}"
        self.node = node
        self.room = room
        self.seq = 0

    async def run(self, hard_end: float) -> None:
        soak = self.soak
        while soak.loop.time() < hard_end:
            await self.session()
            await asyncio.sleep(soak.rng.uniform(*RECONNECT_DELAY_S))

    async def session(self) -> None:
        soak = self.soak
        try:
            ws = await open_ws(soak.ws_url(self.node, f"/ws/chat/{self.room}"))
        except (OSError, TimeoutError, InvalidHandshake) as error:
            soak.counts[f"connect failed ({type(error).__name__})"] += 1
            await asyncio.sleep(RETRY_DELAY_S)
            return
        soak.counts["connects"] += 1
        soak.counts["chat connects"] += 1
        end = soak.loop.time() + soak.rng.uniform(*CHAT_LIFETIME_S)
        talker = asyncio.create_task(self.talk(ws, min(end, soak.stop_at)))
        heard: dict[str, int] = {}
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(end if end < soak.stop_at else None):
                    while True:
                        self.hear(await ws.recv(), heard)
            await ws.close()
        except ConnectionClosed as closed:
            soak.closed_by_server(closed.rcvd.code if closed.rcvd is not None else 1006)
        finally:
            talker.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await talker
            ws.transport.abort()

    async def talk(self, ws: ClientConnection, until: float) -> None:
        soak = self.soak
        while True:
            await asyncio.sleep(soak.rng.uniform(*CHAT_SEND_EVERY_S))
            if soak.loop.time() >= until:
                return
            self.seq += 1
            await ws.send(f"{self.name}-{self.seq}")
            soak.counts["chat messages sent"] += 1

    def hear(self, raw: str | bytes, heard: dict[str, int]) -> None:
        soak = self.soak
        text = raw if isinstance(raw, str) else raw.decode()
        if text.startswith(CHAT_SAYS):
            sender, _, number = text[len(CHAT_SAYS) :].rpartition("-")
            seq = int(number)
            if seq <= heard.get(sender, 0):
                soak.anomaly("chat out of order", f"{self.name} in {self.room}", text)
            heard[sender] = seq
            soak.counts["chat deliveries"] += 1
        elif text == CHAT_LEAVE:
            soak.counts["chat leave notices"] += 1
        else:
            soak.anomaly("unexpected chat message", f"{self.name} in {self.room}", text[:200])


async def open_ws(url: str, *, slow: bool = False) -> ClientConnection:
    """Connect (loopback, never through a proxy); a slow reader gets small socket buffers."""
    sock = None
    if slow:
        # As benchmarks/staller.py: with a 1 KiB MSS and a 4 KiB receive buffer the server's
        # send buffer for this connection stays small, so not reading fills its outbox soon.
        port = int(url.split(":")[2].split("/")[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SLOW_MSS)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
    return await ws_connect(
        url,
        sock=sock,
        proxy=None,
        compression=None,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        open_timeout=REQUEST_TIMEOUT_S,
        ping_interval=None,
        close_timeout=2,
        max_queue=4 if slow else 64,
    )


class WsPublisher:
    """Publishes through ``/ws`` at a steady rate, replies read as they come (pipelined)."""

    def __init__(
        self,
        soak: Soak,
        name: str,
        node: int,
        rate: float,
        channels: list[str],
        pad: int = 0,
    ) -> None:
        self.soak = soak
        self.name = name
        self.node = node
        self.interval = 1.0 / rate
        self.channels = channels
        self.pad = "x" * pad
        self.seq = 0
        self.inflight: dict[int, tuple[str, str]] = {}
        #: Set when no publish request is left unanswered.
        self.answered = asyncio.Event()

    async def run(self) -> None:
        soak = self.soak
        while soak.loading:
            try:
                ws = await open_ws(soak.ws_url(self.node, "/ws"))
            except (OSError, TimeoutError, InvalidHandshake) as error:
                soak.counts[f"connect failed ({type(error).__name__})"] += 1
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            soak.counts["connects"] += 1
            reader = asyncio.create_task(self.replies(ws))
            try:
                await self.publish_loop(ws, reader)
                # The load is over: wait (bounded) for the replies still due.
                if self.inflight:
                    self.answered.clear()
                    waiter = asyncio.ensure_future(self.answered.wait())
                    await asyncio.wait(
                        [reader, waiter],
                        timeout=PUBLISHER_DRAIN_S,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    waiter.cancel()
            except ConnectionClosed:
                pass
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await reader
                soak.counts["publish outcome unknown (/ws connection ended)"] += len(self.inflight)
                self.inflight.clear()
                await close_quietly(ws)

    async def publish_loop(self, ws: ClientConnection, reader: asyncio.Task[None]) -> None:
        soak = self.soak
        loop = soak.loop
        names = self.channels
        next_at = loop.time()
        while soak.loading and not reader.done():
            next_at += self.interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = loop.time()  # fell behind: catch up at the set rate, not in a burst
            if len(self.inflight) >= MAX_INFLIGHT:
                soak.counts["publish skipped (too many unanswered)"] += 1
                continue
            self.seq += 1
            pid = f"{self.name}-{self.seq}"
            channel = soak.rng.choice(names)
            self.inflight[self.seq] = (pid, channel)
            data: dict[str, str] = {"p": pid, "pad": self.pad} if self.pad else {"p": pid}
            request = {"id": self.seq, "op": "publish", "channel": channel, "data": data}
            soak.counts["publish sent (/ws)"] += 1
            await ws.send(orjson.dumps(request).decode())

    async def replies(self, ws: ClientConnection) -> None:
        soak = self.soak
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = orjson.loads(await ws.recv())
                entry = self.inflight.pop(message.get("id"), None)
                if entry is None:
                    continue  # the connected push
                pid, channel = entry
                if not self.inflight:
                    self.answered.set()
                if message.get("ok"):
                    result = message["result"]
                    soak.ack(pid, channel, result["epoch"], result["offset"], "/ws")
                else:
                    code = message.get("error", {}).get("code")
                    soak.counts[f"publish refused (/ws, {code})"] += 1


async def api_publisher(soak: Soak, rate: float) -> None:
    """Publishes through ``POST /api/publish``, alternating between the nodes."""
    assert soak.http is not None
    http = soak.http
    loop = soak.loop
    names = soak.cfg.channel_names
    interval = 1.0 / rate
    running: set[asyncio.Task[None]] = set()
    seq = 0

    async def post(node: int, channel: str, pid: str) -> None:
        try:
            response = await http.post(
                soak.http_url(node, "/api/publish"),
                json={"channel": channel, "data": {"p": pid}},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        except httpx.HTTPError as error:
            soak.counts[f"publish failed (/api, {type(error).__name__})"] += 1
            return
        if response.status_code == 200:
            body = response.json()
            soak.ack(pid, channel, body["epoch"], body["offset"], "/api")
        else:
            soak.counts[f"publish refused (/api, HTTP {response.status_code})"] += 1

    next_at = loop.time()
    try:
        while soak.loading:
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = loop.time()
            if len(running) >= API_CONCURRENCY:
                soak.counts["publish skipped (too many unanswered)"] += 1
                continue
            seq += 1
            soak.counts["publish sent (/api)"] += 1
            node = seq % len(soak.nodes)
            task = loop.create_task(post(node, soak.rng.choice(names), f"a-{seq}"))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=REQUEST_TIMEOUT_S + 1)
    finally:
        await stop_tasks(running)


async def close_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(3):
            await ws.close()
    ws.transport.abort()


# -- processes ------------------------------------------------------------------------------


def node_spec(redis_port: int, index: int, src_dir: Path) -> ServerSpec:
    """A roomcast node on the soak's Redis (default transport; ``src_dir`` first on PYTHONPATH)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(NODE_ENV)
    src = str(src_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable, "-m", "roomcast", "serve",
        "--host", HOST, "--port", str(port), "--broker", f"redis://{HOST}:{redis_port}",
    ]  # fmt: skip
    return ServerSpec("roomcast", f"soak-node{index}", argv, REPO_DIR, env, port, "/readyz", True)


class RedisProcess:
    """The soak's redis-server; ``kill`` is SIGKILL, ``start`` comes back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: ServerProcess | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        spec = ServerSpec(
            "redis",
            f"soak{self.starts}",
            redis_argv(self.port),
            log_dir(),
            dict(os.environ),
            self.port,
            "",
            probe="redis",
        )
        self.process = ServerProcess(spec, log_dir())
        await self.process.wait_ready(READY_WAIT_S)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None


async def all_ready(soak: Soak) -> bool:
    statuses = await asyncio.gather(*(http_status(n.spec.port, "/readyz") for n in soak.nodes))
    return all(status == 200 for status in statuses)


async def restarter(soak: Soak, redis: RedisProcess) -> None:
    """Kill redis-server and start it again on the same port, on schedule."""
    for at in soak.cfg.restart_times():
        await asyncio.sleep(max(0.0, at - soak.now()))
        if not soak.loading:
            return
        restart = Restart(soak.now())
        soak.restarts.append(restart)
        redis.kill()
        print(f"t={restart.killed:6.1f} s  redis-server killed (restart #{len(soak.restarts)})")
        await asyncio.sleep(soak.cfg.redis_downtime)
        await redis.start()
        restart.up = soak.now()
        deadline = soak.loop.time() + READY_WAIT_S
        while soak.loop.time() < deadline:
            if await all_ready(soak):
                restart.ready = soak.now()
                break
            await asyncio.sleep(0.1)
        print(
            f"t={soak.now():6.1f} s  redis-server up at {restart.up:.1f} s, nodes ready at "
            + ("never (30 s)" if restart.ready is None else f"{restart.ready:.1f} s")
        )


# -- resources ------------------------------------------------------------------------------


def vm_rss(pid: int) -> int | None:
    """The process's resident set size in bytes (``VmRSS`` of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def node_stats(soak: Soak, node: int) -> dict[str, int] | None:
    assert soak.http is not None
    try:
        response = await soak.http.get(soak.http_url(node, "/stats"))
        stats: dict[str, int] = response.json()
        return stats
    except (httpx.HTTPError, ValueError):
        return None


async def redis_memory(port: int) -> int | None:
    client = aioredis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        info = await client.info("memory")
        return int(info["used_memory"])
    except (aioredis.RedisError, OSError, KeyError):
        return None
    finally:
        await client.aclose()


async def sample(soak: Soak, redis: RedisProcess, label: str) -> Sample:
    stats = await asyncio.gather(*(node_stats(soak, i) for i in range(len(soak.nodes))))
    taken = Sample(
        soak.now(),
        label,
        [vm_rss(node.popen.pid) for node in soak.nodes],
        list(stats),
        await redis_memory(redis.port),
    )
    soak.samples.append(taken)
    print(progress_line(soak, taken))
    return taken


def progress_line(soak: Soak, s: Sample) -> str:
    c = soak.counts
    parts = [
        f"t={s.t:6.1f} s {s.label:<8}",
        f"connects {c['connects']:,}",
        f"pubs {acknowledged(c):,}",
        f"deliveries {c['deliveries']:,}",
        f"cuts {c['closed by the server 4008']:,}",
        f"restarts {len(soak.restarts)}",
        f"lost {soak.lost}",
    ]
    for i, (rss, stats) in enumerate(zip(s.rss, s.stats, strict=True), 1):
        tasks = "?" if stats is None else stats.get("asyncio_tasks")
        conns = "?" if stats is None else stats.get("connections")
        parts.append(f"node{i} {mib(rss)} MiB {tasks} tasks {conns} conns")
    parts.append(f"redis {mib(s.redis_memory)} MiB")
    return " | ".join(parts)


async def sampler(soak: Soak, redis: RedisProcess) -> None:
    k = 1
    while True:
        at = k * soak.cfg.sample_every
        if at >= soak.cfg.duration:
            return
        await asyncio.sleep(max(0.0, at - soak.now()))
        label = "warm-up" if at < soak.cfg.warmup else "load"
        await sample(soak, redis, label)
        soak.resolve_pending()
        k += 1


async def resolver(soak: Soak) -> None:
    while soak.loading:
        await asyncio.sleep(1.0)
        soak.resolve_pending()


# -- the end --------------------------------------------------------------------------------


async def redis_positions(soak: Soak, port: int) -> dict[str, tuple[str, int]]:
    """Each channel's epoch and offset in Redis now (the truth at the end)."""
    client = aioredis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)
    positions: dict[str, tuple[str, int]] = {}
    try:
        for channel in soak.cfg.all_channels:
            meta = await client.hgetall(f"roomcast:m:{channel}")
            if meta.get("epoch"):
                positions[channel] = (str(meta["epoch"]), int(meta.get("offset", 0)))
    finally:
        await client.aclose()
    return positions


async def converge(soak: Soak, positions_of: Any) -> tuple[int, int]:
    """Wait (bounded) until every subscriber is subscribed and has its channel's last
    publication.

    Then count what is still missing: lost publications, and subscribers left on an old epoch.
    Returns (subscriptions checked, subscriptions not subscribed at the end).
    """
    deadline = soak.loop.time() + CONVERGE_S
    while True:
        positions = await positions_of()
        behind = [
            (sub, track)
            for sub in soak.subscribers
            for track in sub.tracks.values()
            if not (sub.connected and track.state == "live")
            or (
                track.channel in positions
                and (track.epoch, track.offset) != positions[track.channel]
            )
        ]
        if not behind or soak.loop.time() >= deadline:
            break
        await asyncio.sleep(0.25)
    checked = unsubscribed = 0
    for sub in soak.subscribers:
        for track in sub.tracks.values():
            if not (sub.connected and track.state == "live"):
                unsubscribed += 1
                continue
            checked += 1
            if track.channel not in positions:
                continue
            epoch, top = positions[track.channel]
            where = f"{sub.name} on node {sub.node + 1}, {track.channel}"
            if track.epoch == epoch and track.offset < top:
                missing = top - track.offset
                soak.lose(track.channel, epoch, track.offset + 1, top)
                soak.anomaly(
                    "lost (history held them)",
                    where,
                    f"epoch {epoch}: offsets {track.offset + 1}..{top} ({missing}) never came "
                    f"({CONVERGE_S:.0f} s after the last publication)",
                    f"at the end, after {track.context}; last close: {sub.last_close}",
                    group=f"{track.channel}, epoch {epoch}, at the end (offset {top})",
                    node=sub.node,
                )
            elif track.epoch != epoch:
                missing = min(top, HISTORY_SIZE)
                if missing:
                    soak.lose(track.channel, epoch, top - missing + 1, top)
                soak.anomaly(
                    "still on an old epoch at the end (reset not told)",
                    where,
                    f"epoch {track.epoch} offset {track.offset}; Redis has epoch {epoch} offset "
                    f"{top} ({missing} of it held and not received)",
                    f"after {track.context}; last close: {sub.last_close}",
                    group=f"{track.channel}, epoch {track.epoch} (Redis: {epoch})",
                    node=sub.node,
                )
    return checked, unsubscribed


async def wait_idle(soak: Soak) -> None:
    """Wait (bounded) until no node holds a connection any more."""
    deadline = soak.loop.time() + IDLE_WAIT_S
    while soak.loop.time() < deadline:
        stats = await asyncio.gather(*(node_stats(soak, i) for i in range(len(soak.nodes))))
        if all(
            s is not None and s.get("connections") == 0 and s.get("ws_clients") == 0 for s in stats
        ):
            return
        await asyncio.sleep(0.25)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them (10 s at most)."""
    tasks = [task for task in tasks if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)


async def soak_run(cfg: Config) -> Report:
    soak = Soak(cfg)
    redis = RedisProcess()
    rng = soak.rng
    tasks: list[asyncio.Task[Any]] = []
    publishers: list[asyncio.Task[Any]] = []
    background: list[asyncio.Task[Any]] = []
    print(f"roomcast soak: {cfg.duration:.0f} s; logs in {log_dir()}")
    try:
        await redis.start()
        soak.nodes = [ServerProcess(node_spec(redis.port, i, cfg.src), log_dir()) for i in (1, 2)]
        await asyncio.gather(*(node.wait_ready() for node in soak.nodes))
        soak.http = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=API_CONCURRENCY + 8),
            trust_env=False,
        )
        await sample(soak, redis, "start")
        soak.t0 = soak.loop.time()
        soak.stop_at = soak.t0 + cfg.duration
        hard_end = soak.stop_at + CONVERGE_S + 60
        names = cfg.channel_names
        for i in range(cfg.subscribers):
            picked = rng.sample(names, min(cfg.per_subscriber, len(names)))
            soak.subscribers.append(Subscriber(soak, i, i % 2, picked, slow=False))
        for i in range(cfg.slow):
            soak.subscribers.append(Subscriber(soak, i, i % 2, cfg.all_channels, slow=True))
        for sub in soak.subscribers:
            tasks.append(asyncio.create_task(sub.run(hard_end)))
        for i in range(cfg.chat):
            member = ChatMember(soak, i, i % 2, f"soak{i % cfg.rooms}")
            tasks.append(asyncio.create_task(member.run(hard_end)))
        ws_rate = cfg.rate * (1 - cfg.api_share) / max(1, cfg.ws_publishers)
        publishers += [
            asyncio.create_task(WsPublisher(soak, f"w{i}", i % 2, ws_rate, names).run())
            for i in range(cfg.ws_publishers)
        ]
        if cfg.bulk_rate > 0:
            bulk = WsPublisher(soak, "b", 1, cfg.bulk_rate, [BULK_CHANNEL], BULK_PAD)
            publishers.append(asyncio.create_task(bulk.run()))
        if cfg.api_share > 0:
            publishers.append(asyncio.create_task(api_publisher(soak, cfg.rate * cfg.api_share)))
        background += [
            asyncio.create_task(restarter(soak, redis)),
            asyncio.create_task(sampler(soak, redis)),
            asyncio.create_task(resolver(soak)),
        ]
        await asyncio.sleep(max(0.0, soak.stop_at - soak.loop.time()))
        end = await sample(soak, redis, "end")
        # Stop the load: publishers first (bounded), then the restarter (mid-restart at worst).
        await asyncio.wait(publishers, timeout=PUBLISHER_DRAIN_S + REQUEST_TIMEOUT_S + 2)
        await asyncio.wait(background[:1], timeout=READY_WAIT_S + 15)
        await stop_tasks([*publishers, *background])
        if redis.process is None:
            await redis.start()
        checked, unsubscribed = await converge(soak, lambda: redis_positions(soak, redis.port))
        await stop_tasks(tasks)
        tasks.clear()
        await wait_idle(soak)
        idle = await sample(soak, redis, "idle")
        soak.resolve_pending(final=True)
        return Report(soak, end, idle, checked, unsubscribed)
    finally:
        await stop_tasks([*publishers, *background, *tasks])
        if soak.http is not None:
            await soak.http.aclose()
        for node in soak.nodes:
            with contextlib.suppress(Exception):
                await asyncio.shield(node.stop())
            node.kill()
        redis.kill()


# -- the report -----------------------------------------------------------------------------


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MIB:.1f}"


def acknowledged(counts: Counter[str]) -> int:
    return counts["acknowledged (/ws)"] + counts["acknowledged (/api)"]


@dataclass
class Report:
    soak: Soak
    end: Sample
    idle: Sample
    checked: int
    unsubscribed: int
    rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Correctness failures other than losses (each anomaly counts once)."""
        lost_kinds = ("lost (history held them)", "still on an old epoch at the end")
        return sum(
            n for kind, n in self.soak.anomaly_kinds.items() if not kind.startswith(lost_kinds)
        )

    @property
    def warm(self) -> Sample:
        samples = self.soak.samples
        after = [s for s in samples if s.label == "load"]
        return after[0] if after else samples[0]

    @property
    def start(self) -> Sample:
        return self.soak.samples[0]


def summary_rows(report: Report) -> list[tuple[str, str]]:
    soak = report.soak
    cfg = soak.cfg
    c = soak.counts
    closes = sorted(
        (int(key.rsplit(" ", 1)[1]), n) for key, n in c.items() if key.startswith("closed by the s")
    )
    close_text = ", ".join(f"{code}: {n:,}" for code, n in closes) or "none"
    refused = [f"{k}: {n:,}" for k, n in c.items() if "refused" in k]
    failed = [f"{k}: {n:,}" for k, n in c.items() if k.startswith(("connect failed", "publish f"))]
    ready = [r.ready - r.killed for r in soak.restarts if r.ready is not None]
    restarts = (
        f"{len(soak.restarts)} (every {cfg.restart_every:.0f} s, down {cfg.redis_downtime:g} s"
    )
    if ready:
        restarts += f"; both nodes ready again {min(ready):.1f}-{max(ready):.1f} s after the kill"
    if len(ready) < len(soak.restarts):
        restarts += f"; {len(soak.restarts) - len(ready)} not ready within {READY_WAIT_S:.0f} s"
    restarts += ")"
    pause_ends = sorted(
        (key.rsplit(" ", 1)[1], n)
        for key, n in c.items()
        if key.startswith("slow reader pauses ended by")
    )
    pauses_left = (
        c["slow reader pauses"]
        - sum(n for _, n in pause_ends)
        - c["slow reader pauses not cut"]
        - c["slow reader pauses cut short by the end"]
    )
    lost_kinds = {
        kind: n for kind, n in soak.anomaly_kinds.items() if kind.startswith(("lost", "still"))
    }
    other = {k: n for k, n in soak.anomaly_kinds.items() if k not in lost_kinds}
    return [
        ("duration", f"{cfg.duration:.0f} s of load (+ drain and checks)"),
        (
            "connects",
            f"{c['connects']:,} (of which chat {c['chat connects']:,}); "
            f"failed: {', '.join(failed) or 'none'}",
        ),
        (
            "publications acknowledged",
            f"{acknowledged(c):,} (/ws {c['acknowledged (/ws)']:,}, of which "
            f"{c['acknowledged (bulk)']:,} on {BULK_CHANNEL}; /api {c['acknowledged (/api)']:,}; "
            f"{acknowledged(c) / cfg.duration:.0f}/s)",
        ),
        (
            "publications not acknowledged",
            f"{'; '.join(refused) or 'none refused'}; outcome unknown "
            f"{c['publish outcome unknown (/ws connection ended)']:,}; skipped "
            f"{c['publish skipped (too many unanswered)']:,}; delivered although never "
            f"acknowledged {len(soak.unacked_delivered):,}",
        ),
        (
            "deliveries",
            f"{c['deliveries']:,} on /ws (of which replayed {c['replayed']:,}); chat: "
            f"{c['chat messages sent']:,} messages sent, {c['chat deliveries']:,} received",
        ),
        (
            "cuts (4008)",
            f"{c['closed by the server 4008']:,} ({c['4008 while reading']:,} of them while "
            f"reading); slow reader pauses {c['slow reader pauses']:,}: ended by "
            + (", ".join(f"{code} {n:,}" for code, n in pause_ends) or "nothing")
            + f"; not cut within {SLOW_RESUME_S:g} s of reading again "
            f"{c['slow reader pauses not cut']:,}; cut short by the end of the load "
            f"{c['slow reader pauses cut short by the end']:,}; still going at the end "
            f"{pauses_left:,}",
        ),
        ("Redis restarts", restarts),
        (
            "resets seen",
            f"1012 closes {c['closed by the server 1012']:,}; recovered: false "
            f"{c['recovered: false']:,} (new epoch {c['recovered: false, new epoch']:,}); "
            f"recovered: true {c['recovered: true']:,}",
        ),
        ("closes by the server", close_text),
        (
            "closes by the clients",
            f"{c['closed by the client']:,} with a close frame, "
            f"{c['dropped by the client (no close)']:,} dropped",
        ),
        (
            "checked at the end",
            f"{report.checked:,} subscriptions ({report.unsubscribed:,} were reconnecting)",
        ),
        (
            "lost",
            f"{soak.lost:,} deliveries, {len(soak.lost_publications):,} distinct publications"
            + (
                f" ({', '.join(f'{k}: {n:,}' for k, n in lost_kinds.items())})"
                if lost_kinds
                else ""
            ),
        ),
        (
            "other errors",
            ", ".join(f"{k}: {n:,}" for k, n in other.items()) or "0",
        ),
    ]


@dataclass
class Figure:
    name: str
    values: list[float | None]  # start, after warm-up, end, idle
    unit: str
    slack: float  # absolute
    share: float  # relative

    def flat(self) -> str:
        _, warm, end, _ = self.values
        if warm is None or end is None:
            return "?"
        limit = warm + max(self.slack, warm * self.share)
        return "yes" if end <= limit else f"NO (> {self.fmt(limit)})"

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "?"
        return f"{value:,.1f}" if self.unit == "MiB" else f"{value:,.0f}"


def resource_figures(report: Report) -> list[Figure]:
    samples = [report.start, report.warm, report.end, report.idle]
    figures = []
    for i in range(len(report.soak.nodes)):

        def stat(s: Sample, key: str, i: int = i) -> float | None:
            stats = s.stats[i]
            return None if stats is None else stats.get(key)

        rss = [None if s.rss[i] is None else s.rss[i] / MIB for s in samples]  # type: ignore[operator]
        figures.append(Figure(f"node {i + 1} RSS", rss, "MiB", 8, 0.10))
        tasks = [stat(s, "asyncio_tasks") for s in samples]
        figures.append(Figure(f"node {i + 1} asyncio tasks", tasks, "", 50, 0.25))
        conns = [stat(s, "connections") for s in samples]
        figures.append(Figure(f"node {i + 1} connections", conns, "", 30, 0.25))
    memory = [None if s.redis_memory is None else s.redis_memory / MIB for s in samples]
    figures.append(Figure("Redis used_memory", memory, "MiB", 1, 0.25))
    return figures


def rss_slopes(report: Report) -> list[str]:
    """Least-squares RSS growth per node over the samples after warm-up, in MiB/min."""
    soak = report.soak
    after = [s for s in soak.samples if s.label in ("load", "end")]
    slopes = []
    for i in range(len(soak.nodes)):
        points = [(s.t, s.rss[i] / MIB) for s in after if s.rss[i] is not None]  # type: ignore[operator]
        if len(points) < 3:
            slopes.append("?")
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        num = sum((t - mean_t) * (v - mean_v) for t, v in points)
        den = sum((t - mean_t) ** 2 for t, _ in points)
        slopes.append(f"{num / den * 60:+.2f}" if den else "?")
    return slopes


def idle_check(report: Report) -> str:
    """Whether the nodes went back to their start once every client had left."""
    parts = []
    for i in range(len(report.soak.nodes)):
        start, idle = report.start.stats[i], report.idle.stats[i]
        if start is None or idle is None:
            parts.append(f"node {i + 1}: ?")
            continue
        left = {k: v for k, v in idle.items() if k != "asyncio_tasks" and v}
        extra = idle.get("asyncio_tasks", 0) - start.get("asyncio_tasks", 0)
        verdict = "clean" if not left and extra <= 5 else "NOT clean"
        parts.append(
            f"node {i + 1}: {verdict} (asyncio tasks {start.get('asyncio_tasks')} at start, "
            f"{idle.get('asyncio_tasks')} idle; nonzero counters: {left or 'none'})"
        )
    return "; ".join(parts)


def print_report(report: Report, console: Console) -> None:
    summary = Table(title="roomcast soak", show_header=False)
    summary.add_column("figure", style="bold")
    summary.add_column("value")
    for name, value in summary_rows(report):
        summary.add_row(name, value)
    console.print(summary)
    resources = Table(title="resources (flat: end ≤ after warm-up + tolerance)")
    for column in ("figure", "start", "after warm-up", "end", "idle", "flat", "tolerance"):
        resources.add_column(column)
    for fig in resource_figures(report):
        tol = f"max({fig.slack:g}{' ' + fig.unit if fig.unit else ''}, {fig.share:.0%})"
        resources.add_row(fig.name, *(fig.fmt(v) for v in fig.values), fig.flat(), tol)
    console.print(resources)
    console.print(f"RSS growth after warm-up (MiB/min): {', '.join(rss_slopes(report))}")
    console.print(f"after the clients left: {idle_check(report)}")
    groups = list(report.soak.groups.values())
    for group in groups[:ANOMALIES_SHOWN]:
        console.print(f"  {group.line()}", markup=False)
    if len(groups) > ANOMALIES_SHOWN:
        console.print(f"  ... {len(groups) - ANOMALIES_SHOWN} more in the log")


def md_table(header: list[str], rows: Iterable[Iterable[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def git_code(src: Path) -> str:
    """The commit the nodes ran (and whether src/ had uncommitted changes), or their tree."""
    if src != (REPO_DIR / "src").resolve():
        return f"the nodes ran from {src} (--src)"

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(
                ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    return head + (" with uncommitted changes in src/" if dirty else "")


def markdown_section(report: Report, took: float) -> str:
    soak = report.soak
    cfg = soak.cfg
    command = shlex.join(["python", "benchmarks/soak.py", *cfg.argv])
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in NODE_ENV.items())
    tolerance = "; ".join(
        f"{f.name.split(' ', 2)[-1] if f.name.startswith('node') else f.name}: "
        f"max({f.slack:g}{' ' + f.unit if f.unit else ''}, {f.share:.0%})"
        for f in resource_figures(report)[0:3] + resource_figures(report)[-1:]
    )
    lines = [
        MARK_START,
        "## Soak: churn, slow readers and Redis restarts on 2 nodes",
        "",
        "Written by [`benchmarks/soak.py`](../benchmarks/soak.py), not by `run.py`: rerunning "
        "the soak replaces this section only. Correctness comes first: **lost = "
        f"{soak.lost:,}**, other errors = {report.errors:,}.",
        "",
        f"- Command: `{command}` (took {took:.0f} s with the drain and checks)",
        f"- Started: {soak.started}; code: {soak.code} (when the nodes started)",
        f"- Machine: {os.cpu_count()} cores, Linux {platform.release()}; Python "
        f"{platform.python_version()}; Redis {redis_version()}",
        f"- Redis: `redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no` "
        f"(nothing on disk), killed with SIGKILL and started again on the same port every "
        f"{cfg.restart_every:.0f} s (first at {cfg.restart_every / 2:.0f} s), "
        f"{cfg.redis_downtime:g} s later: every restart loses every channel's history",
        f"- Nodes: 2 × `{env} python -m roomcast serve --host 127.0.0.1 --port PORT "
        "--broker redis://127.0.0.1:PORT` (default transport)",
        f"- Load: {cfg.subscribers} subscribers on `/ws` (half per node), each of "
        f"{cfg.per_subscriber} of {cfg.channels} channels, connected for "
        f"{SUB_LIFETIME_S[0]:g}-{SUB_LIFETIME_S[1]:g} s at a time, then closing "
        f"({ABORT_SHARE:.0%} of the time dropping TCP without a close) and subscribing again "
        f"with `recover`; {cfg.slow} slow readers (half per node) of every channel and of "
        f"`{BULK_CHANNEL}` ({cfg.bulk_rate:g} publications/s of {BULK_PAD:,} bytes from a "
        f"`/ws` publisher on node 2, so that their buffers fill within seconds), on sockets "
        f"with SO_RCVBUF {SLOW_RCVBUF} and MSS {SLOW_MSS}, that read "
        f"{SLOW_READ_S[0]:g}-{SLOW_READ_S[1]:g} s, stop reading for "
        f"{SLOW_PAUSE_S[0]:g}-{SLOW_PAUSE_S[1]:g} s (cut with 4008 meanwhile), then read what "
        f"came before the close and recover; {cfg.rate:g} publications/s "
        f"({1 - cfg.api_share:.0%} as `/ws` `publish` from {cfg.ws_publishers} connections on "
        f"both nodes, {cfg.api_share:.0%} as `POST /api/publish` to both nodes); "
        f"{cfg.chat} chat members in {cfg.rooms} rooms on `/ws/chat/{{room}}` (both nodes), one "
        f"message every {CHAT_SEND_EVERY_S[0]:g}-{CHAT_SEND_EVERY_S[1]:g} s, connected "
        f"{CHAT_LIFETIME_S[0]:g}-{CHAT_LIFETIME_S[1]:g} s at a time. Loopback only; one client "
        "process (websockets, uvloop), nothing pinned.",
        "- Checks: per subscriber and channel, the offsets received follow each other one by "
        "one from the point the subscribe reply gives (its `offset`; the recovered offset for "
        f"`recovered: true`; for `recovered: false` the oldest offset the history (size "
        f"{HISTORY_SIZE}) must still hold: the newest {HISTORY_SIZE} of the reply's stream). "
        "A skipped offset is a publication lost while the history held it; so is, once the "
        f"publishers have stopped (up to {CONVERGE_S:.0f} s later), any offset between a "
        "subscriber's last one and its channel's offset in Redis, and a subscriber still on an "
        "old epoch then was never told of a reset. Every delivery is also matched with its "
        "publish reply (channel, epoch, offset). Chat: every member hears each sender in order.",
        "",
        *md_table(["figure", "value"], summary_rows(report)),
        "",
        f"Resources: start = both nodes ready, before any client; after warm-up = the first "
        f"sample at or after {cfg.warmup:.0f} s (t = {report.warm.t:.0f} s); end = t = "
        f"{report.end.t:.0f} s, still under load; idle = after every client left. Flat = end "
        f"within a tolerance of after warm-up ({tolerance}; a decrease is flat). Samples every "
        f"{cfg.sample_every:.0f} s: RSS is `VmRSS` of /proc/PID/status, tasks and connections "
        "from `GET /stats`, Redis from `INFO memory` (it starts empty after each restart).",
        "",
        *md_table(
            ["figure", "start", "after warm-up", "end", "idle", "flat"],
            (
                [
                    f.name,
                    *(f.fmt(v) + (" MiB" if f.unit and v is not None else "") for v in f.values),
                    f.flat(),
                ]
                for f in resource_figures(report)
            ),
        ),
        "",
        f"- RSS growth after warm-up (least squares over the samples, MiB/min): "
        f"{', '.join(f'node {i}: {v}' for i, v in enumerate(rss_slopes(report), 1))}",
        f"- After the clients left: {idle_check(report)}",
    ]
    problems = scan_logs(("roomcast",))
    lines.append(
        "- Server logs: "
        + ("; ".join(f"{path.name}: {text}" for _, path, text in problems) or "no errors")
    )
    if soak.groups:
        groups = list(soak.groups.values())
        lines += [
            "",
            f"Correctness failures ({len(groups):,} in all; the first {ANOMALIES_SHOWN}; each "
            "with how many times it was seen, on which nodes, and the first one in full):",
            "",
        ]
        lines += [f"- {g.line()}" for g in groups[:ANOMALIES_SHOWN]]
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the soak section of ``path`` (between the markers), or append it."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(MARK_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--subscribers", type=int, default=240, help="/ws subscribers (240)")
    parser.add_argument("--channels", type=int, default=8, help="channels (8)")
    parser.add_argument("--per-subscriber", type=int, default=2, help="channels each (2)")
    parser.add_argument("--slow", type=int, default=8, help="slow readers (8)")
    parser.add_argument("--chat", type=int, default=32, help="chat members (32)")
    parser.add_argument("--rooms", type=int, default=4, help="chat rooms (4)")
    parser.add_argument("--rate", type=float, default=100, help="publications/s (100)")
    parser.add_argument(
        "--bulk-rate",
        type=float,
        default=10,
        help=f"publications/s of {BULK_PAD} bytes on {BULK_CHANNEL}, for the slow readers (10)",
    )
    parser.add_argument(
        "--api-share", type=float, default=0.3, help="share through /api/publish (0.3)"
    )
    parser.add_argument("--ws-publishers", type=int, default=4, help="/ws publishers (4)")
    parser.add_argument(
        "--restart-every",
        type=float,
        help="seconds between Redis restarts (60; half the duration below 300 s)",
    )
    parser.add_argument(
        "--redis-downtime", type=float, default=1.0, help="seconds Redis stays down (1)"
    )
    parser.add_argument("--sample-every", type=float, default=10, help="seconds (10)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the reference sample (60; a quarter below)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--src",
        type=Path,
        default=REPO_DIR / "src",
        help="run the nodes from this source tree (default: this checkout's src/)",
    )
    parser.add_argument(
        "--output", type=Path, default=REPO_DIR / "docs" / "benchmarks.md", help="report file"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.duration < 20:
        parser.error("--duration must be at least 20 s")
    if args.subscribers < 1 or args.channels < 1 or args.rate <= 0 or args.rooms < 1:
        parser.error("--subscribers, --channels, --rooms and --rate must be positive")
    if not 0 <= args.api_share <= 1 or (args.ws_publishers < 1 and args.api_share < 1):
        parser.error("--api-share must be in 0..1, and 1 without /ws publishers")
    long_run = args.duration >= 300
    return Config(
        duration=args.duration,
        subscribers=args.subscribers,
        channels=args.channels,
        per_subscriber=args.per_subscriber,
        slow=args.slow,
        chat=args.chat,
        rooms=args.rooms,
        rate=args.rate,
        bulk_rate=args.bulk_rate,
        api_share=args.api_share,
        ws_publishers=args.ws_publishers,
        restart_every=args.restart_every or (60.0 if long_run else args.duration / 2),
        redis_downtime=args.redis_downtime,
        sample_every=args.sample_every,
        warmup=args.warmup
        if args.warmup is not None
        else (60.0 if long_run else args.duration / 4),
        seed=args.seed,
        src=args.src.resolve(),
        output=None if args.no_write else args.output,
        argv=tuple(argv),
    )


async def main_async(cfg: Config) -> int:
    # Ctrl-C and SIGTERM cancel the main task, whose cleanup stops every process (SIGINT is
    # handled here too: a shell starts background jobs with it ignored).
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    started = time.monotonic()
    report = await soak_run(cfg)
    took = time.monotonic() - started
    console = Console()
    print_report(report, console)
    anomalies = log_dir() / "soak-anomalies.txt"
    anomalies.write_text(
        "".join(g.line() + "\n" for g in report.soak.groups.values())
        + f"\nthe first {ANOMALIES_KEPT} one by one:\n"
        + "".join(a.line() + "\n" for a in report.soak.anomalies)
    )
    console.print(f"took {took:.0f} s; logs and every anomaly in {log_dir()}")
    if cfg.output is not None:
        write_section(cfg.output, markdown_section(report, took))
        console.print(f"wrote the soak section of {cfg.output}")
    return 1 if report.soak.lost or report.errors else 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import uvloop
    except ImportError:
        print("uvloop is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    try:
        return uvloop.run(main_async(cfg))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: servers stopped, no report written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
