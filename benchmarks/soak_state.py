"""The soak test's settings and shared state: the clock, the counters, the publish ledger
and the anomalies (see soak.py for what the soak does and checks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from servers import HOST, REPO_DIR, ServerProcess

if TYPE_CHECKING:
    from soak_clients import Subscriber

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
