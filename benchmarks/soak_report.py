"""The soak test's report: the console tables and the "Soak" section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import shlex
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from servers import redis_version, scan_logs
from soak_state import (
    ABORT_SHARE,
    ANOMALIES_SHOWN,
    BULK_CHANNEL,
    BULK_PAD,
    CHAT_LIFETIME_S,
    CHAT_SEND_EVERY_S,
    CONVERGE_S,
    HISTORY_SIZE,
    MARK_END,
    MARK_START,
    MIB,
    NODE_ENV,
    READY_WAIT_S,
    SLOW_MSS,
    SLOW_PAUSE_S,
    SLOW_RCVBUF,
    SLOW_READ_S,
    SLOW_RESUME_S,
    SUB_LIFETIME_S,
    Sample,
    Soak,
)


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
