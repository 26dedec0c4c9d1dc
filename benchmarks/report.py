"""Aggregate benchmark samples, judge the targets, print tables and write docs/benchmarks.md."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from benchconfig import CLUSTER_KINDS
from deflate import DEFLATE_HEADER, DeflateRow, deflate_rows

#: The servers compared, in column order.
ROLES = ("baseline", "node", "roomcast", "roomcast-asgi")
ROLE_TITLES = {
    "baseline": "baseline (guide)",
    "node": "node (ws)",
    "roomcast": "roomcast",
    "roomcast-asgi": "roomcast-asgi (fallback)",
}
#: Ratio columns: (numerator, denominator).
RATIOS = (("roomcast", "baseline"), ("roomcast-asgi", "baseline"), ("roomcast", "node"))
#: Load generator CPU (% of its core) from which a figure may be limited by the client side.
BUSY_LOADGEN_PCT = 90.0

Better = Literal["higher", "lower", ""]
Agg = Literal["median", "max", "text"]


@dataclass(frozen=True)
class MetricSpec:
    """One figure of the results table.

    ``better`` says which direction is good ("" = no ratio is shown); ``agg`` says how repeats
    are combined ("max" for counts of failures, so one bad repeat shows; "text" for a verbal
    figure, whose distinct values are all shown). ``section`` names the report section of a
    figure that is not in the main results table (the /ws scenarios, roomcast only).
    """

    key: str
    label: str
    unit: str
    better: Better
    digits: int
    agg: Agg = "median"
    section: str = ""


def _echo(n: str, name: str) -> list[MetricSpec]:
    """Return the metric specs of the echo scenario with ``n`` connections."""
    head = f"echo, {name}:"
    return [
        MetricSpec(f"echo{n}.rtps", f"{head} round trips", "/s", "higher", 0),
        MetricSpec(f"echo{n}.p50_us", f"{head} p50 round trip", "µs", "lower", 0),
        MetricSpec(f"echo{n}.p99_us", f"{head} p99 round trip", "µs", "lower", 0),
        MetricSpec(f"echo{n}.errors", f"{head} wrong or missing replies", "", "", 0, "max"),
        MetricSpec(f"echo{n}.loadgen", f"{head} load generator CPU", "%", "", 0),
    ]


def metric_specs(
    echo_conns: int,
    members: int,
    idle_counts: Sequence[int],
    connect_clients: int,
    messages: int = 200,
    missed: int = 100,
    cluster_nodes: int = 3,
    cluster_per_node: int = 300,
) -> list[MetricSpec]:
    """Return every figure of the results table and of the /ws and cluster sections, labelled
    with this run's sizes."""
    chat = f"chat, {members:,} members:"
    stall = "chat + 1 stalled member:"
    conn = f"new connections ({connect_clients} clients):"
    specs = [
        *_echo("1", "1 connection"),
        *_echo("N", f"{echo_conns} connections"),
        MetricSpec("chat.dps", f"{chat} deliveries", "/s", "higher", 0),
        MetricSpec("chat.p50_ms", f"{chat} p50 send → last member", "ms", "lower", 1),
        MetricSpec("chat.p99_ms", f"{chat} p99 send → last member", "ms", "lower", 1),
        MetricSpec("chat.lost", f"{chat} lost deliveries", "", "", 0, "max"),
        MetricSpec("chat.loadgen", f"{chat} load generator CPU", "%", "", 0),
        MetricSpec("chat.lg_us", f"{chat} load generator CPU per delivery", "µs", "", 2),
        MetricSpec("stall.dps", f"{stall} deliveries", "/s", "higher", 0),
        MetricSpec("stall.p50_ms", f"{stall} p50 send → last member", "ms", "lower", 1),
        MetricSpec("stall.p99_ms", f"{stall} p99 send → last member", "ms", "lower", 1),
        MetricSpec("stall.lost", f"{stall} lost deliveries", "", "", 0, "max"),
        MetricSpec("stall.loadgen", f"{stall} load generator CPU", "%", "", 0),
        MetricSpec("stall.rel", f"{stall} deliveries/s ÷ own unstalled", "×", "higher", 2),
        MetricSpec("stall.outcome", f"{stall} the room", "", "", 0, "text"),
        MetricSpec("stall.staller", f"{stall} the stalled member's connection", "", "", 0, "text"),
        MetricSpec(
            "cut.outcome",
            "chat, 1 sender + 1 stalled member, 1 KiB messages until something gives",
            "",
            "",
            0,
            "text",
        ),
        MetricSpec("connect.cps", f"{conn} connections", "/s", "higher", 0),
        MetricSpec("connect.p50_ms", f"{conn} p50 connect + upgrade", "ms", "lower", 2),
        MetricSpec("connect.p99_ms", f"{conn} p99 connect + upgrade", "ms", "lower", 2),
        MetricSpec("connect.errors", f"{conn} failed cycles", "", "", 0, "max"),
        MetricSpec("connect.loadgen", f"{conn} load generator CPU", "%", "", 0),
    ]
    for app in ("chat", "echo"):
        for n in idle_counts:
            head = f"{n:,} idle /ws/{app}:"
            specs += [
                MetricSpec(mem_key(app, n), f"{head} RSS per connection", "KiB", "lower", 1),
                MetricSpec(mem_key(app, n, "mib"), f"{head} server RSS", "MiB", "lower", 1),
            ]
    return (
        specs
        + ws_specs(members, messages, missed)
        + cluster_specs(cluster_nodes, cluster_per_node, messages)
    )


#: The servers with the /ws protocol, i.e. the columns of the /ws sections.
WS_ROLES = ("roomcast", "roomcast-asgi")
#: The bar for roomcast's /ws fan-out, as a share of its own /ws/chat fan-out.
CHANNEL_BAR = 0.90
#: What the second /ws ÷ chat ratio (``channel.rel_matched``) tells.
MATCHED_WHY = (
    "the same comparison with chat lines as long as /ws frames: isolates the per-frame "
    "machinery from the bytes"
)
#: The label of the size-matched chat runs' rows.
CHATM = "matched chat"


def ws_specs(members: int, messages: int, missed: int) -> list[MetricSpec]:
    """Return the figures of the /ws channel fan-out and recovery sections."""

    def ch(key: str, label: str, unit: str, better: Better, digits: int, agg: Agg = "median"):
        return MetricSpec(f"channel.{key}", label, unit, better, digits, agg, "channel")

    def rc(key: str, label: str, unit: str, better: Better, digits: int, agg: Agg = "median"):
        return MetricSpec(f"recovery.{key}", label, unit, better, digits, agg, "recovery")

    return [
        ch(
            "rel",
            "/ws fan-out ÷ chat fan-out, deliveries/s (medians)",
            "×",
            "higher",
            2,
        ),
        ch(
            "rel_matched",
            "/ws fan-out ÷ matched chat fan-out (lines as long as /ws frames), deliveries/s",
            "×",
            "higher",
            2,
        ),
        ch("dps", f"/ws: deliveries ({members:,} subscribers × {messages})", "/s", "higher", 0),
        ch("chat_dps", f"chat: deliveries ({members:,} members × {messages})", "/s", "higher", 0),
        ch(
            "chatm_dps",
            f"{CHATM}: deliveries ({members:,} members × {messages})",
            "/s",
            "higher",
            0,
        ),
        ch("pairs", "sets of runs (chat, /ws, matched chat) behind the medians", "", "", 0, "max"),
        ch("p50_ms", "/ws: p50 publish → last subscriber", "ms", "lower", 1),
        ch("p99_ms", "/ws: p99 publish → last subscriber", "ms", "lower", 1),
        ch("chat_p50_ms", "chat: p50 send → last member", "ms", "lower", 1),
        ch("chat_p99_ms", "chat: p99 send → last member", "ms", "lower", 1),
        ch("chatm_p50_ms", f"{CHATM}: p50 send → last member", "ms", "lower", 1),
        ch("chatm_p99_ms", f"{CHATM}: p99 send → last member", "ms", "lower", 1),
        ch("lost", "/ws: lost deliveries", "", "", 0, "max"),
        ch("chat_lost", "chat: lost deliveries", "", "", 0, "max"),
        ch("chatm_lost", f"{CHATM}: lost deliveries", "", "", 0, "max"),
        ch(
            "errors",
            "/ws: errors (offset order, channel, content, failed requests)",
            "",
            "",
            0,
            "max",
        ),
        ch("server", "/ws: server CPU", "%", "", 0),
        ch("chat_server", "chat: server CPU", "%", "", 0),
        ch("chatm_server", f"{CHATM}: server CPU", "%", "", 0),
        ch("srv_us", "/ws: server CPU per delivery", "µs", "lower", 2),
        ch("chat_srv_us", "chat: server CPU per delivery", "µs", "lower", 2),
        ch("chatm_srv_us", f"{CHATM}: server CPU per delivery", "µs", "lower", 2),
        ch("loadgen", "/ws: load generator CPU", "%", "", 0),
        ch("chat_loadgen", "chat: load generator CPU", "%", "", 0),
        ch("chatm_loadgen", f"{CHATM}: load generator CPU", "%", "", 0),
        ch("lg_us", "/ws: load generator CPU per delivery", "µs", "", 2),
        ch("chat_lg_us", "chat: load generator CPU per delivery", "µs", "", 2),
        ch("chatm_lg_us", f"{CHATM}: load generator CPU per delivery", "µs", "", 2),
        rc(
            "total_ms",
            f"time until all {members:,} clients have all {missed} missed",
            "ms",
            "lower",
            0,
        ),
        rc("p50_ms", "p50 per client: reconnect start → last missed publication", "ms", "lower", 0),
        rc("p99_ms", "p99 per client: reconnect start → last missed publication", "ms", "lower", 0),
        rc("connect_ms", f"all {members:,} reconnected (handshakes done)", "ms", "lower", 0),
        rc("unrecovered", "replies with recovered: false (or no reply)", "", "", 0, "max"),
        rc("lost", "missed publications never replayed (lost)", "", "", 0, "max"),
        rc("duplicates", "publications received twice or out of order", "", "", 0, "max"),
        rc(
            "errors",
            "other errors (error replies, wrong 'replayed', wrong frames)",
            "",
            "",
            0,
            "max",
        ),
        rc("server", "server CPU", "%", "", 0),
        rc("loadgen", "load generator CPU", "%", "", 0),
    ]


#: The cluster section's columns (configurations), and its ratio columns.
CLUSTER_TITLES = {
    "cluster": "{n} nodes, redis://",
    "single-memory": "1 node, memory://",
    "single-redis": "1 node, redis://",
}
CLUSTER_RATIOS = (("cluster", "single-memory"), ("cluster", "single-redis"))
#: Cluster figures that must be 0 in every run (correctness).
CLUSTER_ZERO = ("lost", "duplicates", "out_of_order", "errors")


def cluster_specs(nodes: int, per_node: int, messages: int) -> list[MetricSpec]:
    """Return the figures of the cluster section."""

    def cl(key: str, label: str, unit: str, better: Better, digits: int, agg: Agg = "median"):
        return MetricSpec(f"cluster.{key}", label, unit, better, digits, agg, "cluster")

    subs = nodes * per_node
    return [
        cl("dps", f"deliveries ({subs:,} subscribers × {messages})", "/s", "higher", 0),
        cl("p50_ms", "p50 publish → last subscriber", "ms", "lower", 1),
        cl("p99_ms", "p99 publish → last subscriber", "ms", "lower", 1),
        cl("d50_ms", "p50 publish → receipt (every delivery)", "ms", "lower", 1),
        cl("d99_ms", "p99 publish → receipt (every delivery)", "ms", "lower", 1),
        cl("lost", "lost deliveries", "", "", 0, "max"),
        cl("duplicates", "duplicates (a publication received twice)", "", "", 0, "max"),
        cl("out_of_order", "out of order (offset not above the previous)", "", "", 0, "max"),
        cl(
            "errors",
            "other errors (offset ≠ acknowledged, wrong frames, failed requests, closes)",
            "",
            "",
            0,
            "max",
        ),
        cl("server", "server side CPU (all of core 0: nodes + redis-server)", "%", "", 0),
        cl("broker", "… of which redis-server", "%", "", 0),
        cl("srv_us", "server side CPU per delivery", "µs", "lower", 2),
        cl("loadgen", "load generator CPU", "%", "", 0),
        cl("lg_us", "load generator CPU per delivery", "µs", "", 2),
    ]


def cluster_kinds(results: Results, specs: Sequence[MetricSpec]) -> list[str]:
    """Return the cluster configurations with any figure, in column order."""
    keys = [s.key for s in specs if s.section == "cluster"]
    return [k for k in CLUSTER_KINDS if any(results.samples.get((k, key)) for key in keys)]


def cluster_nodes(results: Results) -> int:
    """Return how many nodes the cluster configuration ran (0 if it did not run)."""
    return int(results.key_value("cluster", "cluster.nodes", "max") or 0)


def cluster_table(
    results: Results, specs: Sequence[MetricSpec]
) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of the cluster section's table: one column per
    configuration, then the cluster ÷ single node ratios (where a direction is better)."""
    kinds = cluster_kinds(results, specs)
    nodes = cluster_nodes(results) or "N"
    pairs = [(a, b) for a, b in CLUSTER_RATIOS if a in kinds and b in kinds]
    titles = {k: CLUSTER_TITLES[k].format(n=nodes) for k in CLUSTER_KINDS}
    header = [
        "figure",
        "unit",
        *(titles[k] for k in kinds),
        *(f"{nodes} nodes ÷ {titles[b]}" for _, b in pairs),
    ]
    rows = []
    for spec in specs:
        if spec.section != "cluster" or not any(results.samples.get((k, spec.key)) for k in kinds):
            continue
        vals = {k: results.value(k, spec) for k in kinds}
        better = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
        rows.append(
            [
                spec.label,
                spec.unit + better,
                *(fmt(vals[k], spec.digits) for k in kinds),
                *(fmt_ratio(ratio(spec, vals[a], vals[b])) for a, b in pairs),
            ]
        )
    runs = [len(results.samples.get((k, "cluster.runs"), [])) for k in kinds]
    if rows:
        rows.append(["runs behind these medians", "", *map(str, runs), *("" for _ in pairs)])
    return header, rows


def cluster_headline(results: Results) -> str | None:
    """Return the cluster ÷ single-node ratios and the correctness verdict (every run 0 lost,
    0 duplicates, 0 out of order, 0 other errors), or None if the cluster was not run.

    Only counts that every finished run recorded are judged: a count some run lacks reads
    "not measured" (never 0), and a run that crashed makes the verdict "failed" (its counts
    were never taken, so the survivors' zeros say nothing about it).
    """
    dps = {k: results.key_value(k, "cluster.dps") for k in CLUSTER_KINDS}
    crashed = results.crashed(CLUSTER_KINDS, "cluster")
    if dps["cluster"] is None and not crashed:
        return None
    parts = []
    for kind, what in (("single-memory", "memory://"), ("single-redis", "redis://")):
        if dps["cluster"] and dps[kind]:
            parts.append(f"{dps['cluster'] / dps[kind]:.2f}× one node on {what}")
    ran = [k for k in CLUSTER_KINDS if results.samples.get((k, "cluster.runs"))]
    worst: dict[str, float | None] = {}
    for key in CLUSTER_ZERO:
        counts = [results.every_run(k, f"cluster.{key}", "cluster.runs") for k in ran]
        worst[key] = (
            None if not ran or any(c is None for c in counts) else max(c or 0.0 for c in counts)
        )
    shown = ", ".join(
        f"{key.replace('_', ' ')} {'not measured' if v is None else f'{v:,.0f}'}"
        for key, v in worst.items()
    )
    if crashed:
        verdict_text = f"**failed**: {len(crashed)} run(s) crashed: {'; '.join(crashed)}"
    elif any(v for v in worst.values()):
        verdict_text = "**NOT all 0**"
    elif any(v is None for v in worst.values()):
        verdict_text = "**not measured**"
    else:
        verdict_text = "**all 0: correct**"
    head = (
        f"{cluster_nodes(results)} nodes on Redis, median deliveries/s: {fmt(dps['cluster'])}"
        + (f" ({'; '.join(parts)})" if parts else "")
        + f". Correctness, worst run of every configuration: {shown} ({verdict_text})"
    )
    return head


def mem_key(app: str, count: int, kind: str = "kib") -> str:
    """Return the results key of a memory figure (per connection, or total MiB)."""
    return f"mem.{app}.{count}.{kind}"


@dataclass
class RunRecord:
    """One measured run of one scenario on one server, for the per-run table."""

    scenario: str
    role: str
    run: str
    summary: str
    server_cpu: float | None
    loadgen_cpu: float | None
    notes: str = ""
    other_cpu: float | None = None


@dataclass
class Results:
    """Everything measured in one invocation."""

    samples: dict[tuple[str, str], list[float | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    texts: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    runs: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deflate: list[DeflateRow] = field(default_factory=list)

    def add(self, role: str, key: str, value: float | None) -> None:
        """Record one sample of figure ``key`` for server ``role``."""
        self.samples[(role, key)].append(value)

    def add_text(self, role: str, key: str, text: str) -> None:
        """Record one verbal figure (e.g. "stalled") of ``key`` for server ``role``."""
        self.texts[(role, key)].append(text)

    def text(self, role: str, spec: MetricSpec) -> str:
        """Return the distinct verbal values of ``spec`` for ``role``, or a dash."""
        vals = self.texts.get((role, spec.key), [])
        return "; ".join(dict.fromkeys(vals)) or "—"

    def value(self, role: str, spec: MetricSpec) -> float | None:
        """Return the aggregated value of ``spec`` for ``role``, or None if never measured."""
        return self.key_value(role, spec.key, spec.agg)

    def key_value(self, role: str, key: str, agg: Agg = "median") -> float | None:
        """Return the aggregated value of ``key`` for ``role``, or None if never measured."""
        vals = [v for v in self.samples.get((role, key), []) if v is not None]
        if not vals:
            return None
        return float(max(vals) if agg == "max" else statistics.median(vals))

    def every_run(self, role: str, key: str, runs_key: str) -> float | None:
        """Return the worst (largest) value of count ``key`` over ``role``'s runs, or None
        unless every run (one sample of ``runs_key`` each) recorded it."""
        runs = len(self.samples.get((role, runs_key), []))
        vals = self.samples.get((role, key), [])
        if not runs or len(vals) < runs or any(v is None for v in vals):
            return None
        return float(max(v for v in vals if v is not None))

    def crashed(self, roles: Sequence[str], *prefixes: str) -> list[str]:
        """Return the runs of ``roles`` that failed (crashed, or their server did not start)
        in the scenarios behind the figures ``prefix.*`` (see :func:`scenario_prefixes`)."""
        return [
            f"{r.scenario} on {r.role} (run {r.run})"
            for r in self.runs
            if r.summary == "FAILED"
            and r.role in roles
            and set(scenario_prefixes(r.scenario)) & set(prefixes)
        ]

    def measured(self, spec: MetricSpec) -> bool:
        """Tell whether ``spec`` was measured for any server."""
        store = self.texts if spec.agg == "text" else self.samples
        return any(store.get((role, spec.key)) for role in ROLES)

    def roles(self) -> list[str]:
        """Return the compared servers that have any figure, in column order."""
        seen = {role for role, _ in self.samples} | {role for role, _ in self.texts}
        return [role for role in ROLES if role in seen]


def scenario_prefixes(scenario: str) -> tuple[str, ...]:
    """Return the figure key prefixes (``chat`` for ``chat.dps`` ...) that runs of
    ``scenario`` (benchmarks/run.py's scenario names) record."""
    if scenario == "echo":  # its server did not start: both echo figures lack its runs
        return ("echo1", "echoN")
    if scenario.startswith("echo "):
        return ("echo1",) if scenario == "echo 1 conn" else ("echoN",)
    if scenario.startswith("ceiling"):
        return ("ceiling",)
    if scenario.startswith("memory "):
        return ("mem",)
    return {
        "chat": ("chat", "stall"),  # "÷ own unstalled" divides by the plain chat run
        "chat + stalled member": ("stall",),
        "chat: cut or stall?": ("cut",),
        "new connections": ("connect",),
        "chat (paired with /ws)": ("channel",),
        "chat (matched to /ws)": ("channel",),
        "/ws channel fan-out": ("channel",),
        "/ws recovery": ("recovery",),
        "/ws cluster fan-out": ("cluster",),
    }.get(scenario, (scenario,))


def ratio(spec: MetricSpec, num: float | None, den: float | None) -> float | None:
    """Return ``num`` ÷ ``den`` when it means something for ``spec``, else None."""
    if not spec.better or num is None or den is None or den == 0:
        return None
    return num / den


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a figure with thousands separators, or a dash when missing."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    """Format a ratio as 1.23 followed by a multiplication sign, or a dash."""
    return "—" if value is None else f"{value:.2f}×"


def ratio_pairs(roles: Sequence[str]) -> list[tuple[str, str]]:
    """Return the ratio columns whose two servers were both measured."""
    return [(a, b) for a, b in RATIOS if a in roles and b in roles]


def result_header(roles: Sequence[str]) -> list[str]:
    """Return the results table header for these servers."""
    return [
        "figure",
        "unit",
        *(ROLE_TITLES[r] for r in roles),
        *(f"{a} ÷ {b}" for a, b in ratio_pairs(roles)),
    ]


def result_rows(results: Results, specs: Sequence[MetricSpec]) -> list[list[str]]:
    """Return the results table rows: figure, unit, one column per server, the ratios."""
    roles = results.roles()
    pairs = ratio_pairs(roles)
    rows = []
    for spec in specs:
        if spec.section or not results.measured(spec):
            continue
        if spec.agg == "text":
            texts = [results.text(r, spec) for r in roles]
            rows.append([spec.label, "", *texts, *("—" for _ in pairs)])
            continue
        vals = {r: results.value(r, spec) for r in roles}
        better = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
        rows.append(
            [
                spec.label,
                spec.unit + better,
                *(fmt(vals[r], spec.digits) for r in roles),
                *(fmt_ratio(ratio(spec, vals[a], vals[b])) for a, b in pairs),
            ]
        )
    return rows


def section_roles(results: Results, specs: Sequence[MetricSpec], section: str) -> list[str]:
    """Return the /ws servers with any figure of ``section``, in column order."""
    keys = [s.key for s in specs if s.section == section]
    return [r for r in WS_ROLES if any(results.samples.get((r, k)) for k in keys)]


def section_table(
    results: Results, specs: Sequence[MetricSpec], section: str
) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of a /ws section's table (one column per /ws server)."""
    roles = section_roles(results, specs, section)
    header = ["figure", "unit", *(ROLE_TITLES[r] for r in roles)]
    rows = []
    for spec in specs:
        if spec.section != section or not any(results.samples.get((r, spec.key)) for r in roles):
            continue
        better = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
        cells = [fmt(results.value(role, spec), spec.digits) for role in roles]
        rows.append([spec.label, spec.unit + better, *cells])
    return header, rows


def channel_headline(results: Results) -> str | None:
    """Return the /ws ÷ chat fan-out ratio of every /ws server, roomcast's against its bar."""
    parts = []
    for role in WS_ROLES:
        rel = results.key_value(role, "channel.rel")
        if rel is None:
            if results.samples.get((role, "channel.dps")):
                parts.append(f"{role} — (no complete pair)")
            continue
        if role == "roomcast":
            verdict_text = "met" if rel >= CHANNEL_BAR else "NOT met"
            parts.append(f"**{role} {rel:.2f}×** (the bar is ≥ {CHANNEL_BAR:.2f}×: {verdict_text})")
        else:
            parts.append(f"{role} {rel:.2f}×")
    if not parts:
        return None
    head = "/ws fan-out ÷ chat fan-out, median deliveries/s of the paired runs: "
    matched = [
        f"{role} {rel:.2f}×"
        for role in WS_ROLES
        if (rel := results.key_value(role, "channel.rel_matched")) is not None
    ]
    tail = (
        f"; ÷ chat fan-out with lines as long as /ws frames ({MATCHED_WHY}): " + "; ".join(matched)
        if matched
        else ""
    )
    return head + "; ".join(parts) + tail


@dataclass
class Target:
    """One target with what was measured and whether it was met (None = not measured).

    ``limited`` names the runs behind the figures whose load generator was at or above
    BUSY_LOADGEN_PCT of its core: those figures may be limited by the client side.
    ``crashed`` names the runs behind it that failed: the verdict is then "failed".
    """

    text: str
    measured: str
    met: bool | None
    limited: str = ""
    #: The runs behind the figures that crashed: their figures are missing, so the verdict
    #: is "failed" whatever the surviving runs say.
    crashed: str = ""


def judge_targets(
    results: Results, spec_list: Sequence[MetricSpec], idle_counts: Sequence[int]
) -> list[Target]:
    """Judge the targets from the measured figures (never from constants)."""
    specs = {s.key: s for s in spec_list}

    def val(role: str, key: str) -> float | None:
        spec = specs.get(key)
        return None if spec is None else results.value(role, spec)

    def rat(key: str, num: str = "roomcast", den: str = "baseline") -> float | None:
        return ratio(specs[key], val(num, key), val(den, key))

    def busy(key: str, roles: Sequence[str], what: str = "") -> str:
        """Name the runs of ``roles`` whose load generator CPU (figure ``key``) was high."""
        hot = []
        for role in roles:
            cpu = results.key_value(role, key)
            if cpu is not None and cpu >= BUSY_LOADGEN_PCT:
                hot.append(f"{role}{what} {cpu:.0f} %")
        return ", ".join(hot)

    def both(a: float | None, b: float | None) -> tuple[float, float] | None:
        return None if a is None or b is None else (a, b)

    def failed(roles: Sequence[str], *prefixes: str) -> str:
        """Name the runs of ``roles`` behind figures ``prefixes`` that crashed."""
        return "; ".join(results.crashed(roles, *prefixes))

    targets = []
    # The first issue's targets, for roomcast and for its plain-ASGI fallback.
    for role, who in (("roomcast", "roomcast"), ("roomcast-asgi", "roomcast-asgi (fallback)")):
        r1, rn = rat("echo1.rtps", role), rat("echoN.rtps", role)
        e1, en = val(role, "echo1.errors"), val(role, "echoN.errors")
        met: bool | None = None
        if None not in (r1, rn, e1, en):
            met = r1 >= 1.0 and rn >= 1.0 and e1 == 0 and en == 0  # type: ignore[operator]
        targets.append(
            Target(
                f"{who}: echo round trips/s ≥ 1.0× baseline (1 and N connections), every "
                "reply correct",
                f"1 conn {fmt_ratio(r1)}, N conns {fmt_ratio(rn)}; wrong replies "
                f"{fmt(e1)} / {fmt(en)}",
                met,
                busy("echoN.loadgen", ("baseline", role)),
                failed(("baseline", role), "echo1", "echoN"),
            )
        )
        rc, lost = rat("chat.dps", role), val(role, "chat.lost")
        pair = both(rc, lost)
        targets.append(
            Target(
                f"{who}: chat fan-out deliveries/s ≥ 1.0× baseline with 0 lost",
                f"{fmt_ratio(rc)}, lost {fmt(lost)}",
                None if pair is None else pair[0] >= 1.0 and pair[1] == 0,
                busy("chat.loadgen", ("baseline", role)),
                failed(("baseline", role), "chat"),
            )
        )
    rel, slost = val("roomcast", "stall.rel"), val("roomcast", "stall.lost")
    base_rel = val("baseline", "stall.rel")
    pair = both(rel, slost)
    targets.append(
        Target(
            "roomcast: one stalled member, the other members get ≥ 0.9× its own unstalled "
            "rate, 0 lost",
            f"roomcast {fmt_ratio(rel)} (baseline {fmt_ratio(base_rel)}), lost {fmt(slost)}",
            None if pair is None else pair[0] >= 0.9 and pair[1] == 0,
            ", ".join(
                x
                for x in (
                    busy("chat.loadgen", ("roomcast",), " chat"),
                    busy("stall.loadgen", ("roomcast",), " chat + stalled"),
                )
                if x
            ),
            failed(("roomcast",), "stall"),
        )
    )
    top = max(idle_counts) if idle_counts else 0
    mc, me = rat(mem_key("chat", top)), rat(mem_key("echo", top))
    pair = both(mc, me)
    targets.append(
        Target(
            f"roomcast: memory per idle connection ≤ 1.15× baseline ({top:,} connections, "
            "/ws/chat and /ws/echo)",
            f"chat {fmt_ratio(mc)}, echo {fmt_ratio(me)}",
            None if pair is None else pair[0] <= 1.15 and pair[1] <= 1.15,
            crashed=failed(("roomcast", "baseline"), "mem"),
        )
    )
    # This targets.
    vs_node, vs_base = rat("chat.dps", "roomcast", "node"), rat("chat.dps")
    p99 = {r: val(r, "chat.p99_ms") for r in ("roomcast", "node", "baseline")}
    lost = val("roomcast", "chat.lost")
    met = None
    if None not in (vs_node, vs_base, lost, *p99.values()):
        met = (
            vs_node >= 1.3  # type: ignore[operator]
            and vs_base >= 2.0  # type: ignore[operator]
            and p99["roomcast"] < p99["node"]  # type: ignore[operator]
            and p99["roomcast"] < p99["baseline"]  # type: ignore[operator]
            and lost == 0
        )
    targets.append(
        Target(
            "roomcast: chat fan-out, deliveries/s ≥ 1.3× node and ≥ 2× baseline, lower p99 "
            "than both, 0 lost",
            f"{fmt_ratio(vs_node)} node, {fmt_ratio(vs_base)} baseline; p99 "
            f"{fmt(p99['roomcast'], 1)} ms vs node {fmt(p99['node'], 1)} / baseline "
            f"{fmt(p99['baseline'], 1)} ms; lost {fmt(lost)}",
            met,
            busy("chat.loadgen", ("roomcast", "node", "baseline")),
            failed(("roomcast", "node", "baseline"), "chat"),
        )
    )
    rn = rat("echoN.rtps")
    targets.append(
        Target(
            "roomcast: echo with many connections, round trips/s ≥ 1.1× baseline",
            fmt_ratio(rn),
            None if rn is None else rn >= 1.1,
            busy("echoN.loadgen", ("roomcast", "baseline")),
            failed(("roomcast", "baseline"), "echoN"),
        )
    )
    kc, ke = val("roomcast", mem_key("chat", top)), val("roomcast", mem_key("echo", top))
    pair = both(kc, ke)
    targets.append(
        Target(
            f"roomcast: memory per idle connection at {top:,} connections ≤ 20 KiB "
            "(/ws/chat and /ws/echo)",
            f"chat {fmt(kc, 1)} KiB, echo {fmt(ke, 1)} KiB (baseline "
            f"{fmt(val('baseline', mem_key('chat', top)), 1)} / "
            f"{fmt(val('baseline', mem_key('echo', top)), 1)})",
            None if pair is None else pair[0] <= 20.0 and pair[1] <= 20.0,
            crashed=failed(("roomcast",), "mem"),
        )
    )
    rcps = rat("connect.cps")
    errors = val("roomcast", "connect.errors")
    pair = both(rcps, errors)
    targets.append(
        Target(
            "roomcast: new connections per second ≥ 1.5× baseline (no failed cycle)",
            f"{fmt_ratio(rcps)}; failed cycles {fmt(errors)}",
            None if pair is None else pair[0] >= 1.5 and pair[1] == 0,
            busy("connect.loadgen", ("roomcast", "baseline")),
            failed(("roomcast", "baseline"), "connect"),
        )
    )
    # The /ws channel protocol's targets (roomcast only: the other servers have no /ws).
    rel, relm = val("roomcast", "channel.rel"), val("roomcast", "channel.rel_matched")
    clost, cerr = val("roomcast", "channel.lost"), val("roomcast", "channel.errors")
    met = None
    if rel is not None and clost is not None and cerr is not None:
        met = rel >= CHANNEL_BAR and clost == 0 and cerr == 0
    targets.append(
        Target(
            f"roomcast: /ws channel fan-out deliveries/s ≥ {CHANNEL_BAR:.2f}× its own /ws/chat "
            "fan-out (paired runs), 0 lost, offsets strictly increasing",
            f"{fmt_ratio(rel)} ({fmt(val('roomcast', 'channel.dps'))}/s vs "
            f"{fmt(val('roomcast', 'channel.chat_dps'))}/s); lost {fmt(clost)}, errors "
            f"{fmt(cerr)}; with chat lines as long as /ws frames {fmt_ratio(relm)} "
            f"({fmt(val('roomcast', 'channel.chatm_dps'))}/s: {MATCHED_WHY})",
            met,
            ", ".join(
                x
                for x in (
                    busy("channel.loadgen", ("roomcast",), " /ws"),
                    busy("channel.chat_loadgen", ("roomcast",), " chat"),
                    busy("channel.chatm_loadgen", ("roomcast",), " matched chat"),
                )
                if x
            ),
            failed(("roomcast",), "channel"),
        )
    )
    counts = {
        k: val("roomcast", f"recovery.{k}") for k in ("unrecovered", "lost", "duplicates", "errors")
    }
    total = val("roomcast", "recovery.total_ms")
    met = None
    if None not in counts.values():
        met = total is not None and all(v == 0 for v in counts.values())
    targets.append(
        Target(
            "roomcast: /ws recovery, every client reconnecting at once gets every missed "
            "publication: all replies recovered: true, 0 lost, 0 duplicates",
            f"all recovered in {fmt(total)} ms; recovered: false {fmt(counts['unrecovered'])}, "
            f"lost {fmt(counts['lost'])}, duplicates {fmt(counts['duplicates'])}, errors "
            f"{fmt(counts['errors'])}",
            met,
            crashed=failed(("roomcast",), "recovery"),
        )
    )
    return targets


def verdict(target: Target) -> str:
    """Render a target verdict, with the load generator caveat when it applies."""
    if target.crashed:
        return f"failed (crashed: {target.crashed})"
    text = {True: "met", False: "NOT met", None: "not measured"}[target.met]
    if target.limited and target.met is not None:
        text += f" (limited by the load generator: {target.limited})"
    return text


def pct(value: float | None) -> str:
    """Format a CPU fraction as a percentage of one core."""
    return "—" if value is None else f"{value * 100:.0f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TARGET_HEADER = ("target", "measured", "verdict")
RUN_HEADER = (
    "scenario",
    "server",
    "run",
    "figures",
    "server CPU",
    "loadgen CPU",
    "other CPU",
    "notes",
)
CEILING_HEADER = ("figure", "minimal server", "load generator CPU", "… per message/connection")


def run_rows(results: Results) -> list[list[str]]:
    """Return the per-run table rows."""
    return [
        [
            r.scenario,
            r.role,
            r.run,
            r.summary,
            pct(r.server_cpu),
            pct(r.loadgen_cpu),
            pct(r.other_cpu),
            r.notes,
        ]
        for r in results.runs
    ]


#: (figure key, load generator CPU key, CPU per message key, label) of the ceiling table.
CEILING_KEYS = (
    ("echo1.rtps", "echo1.loadgen", "", "echo, 1 connection: round trips/s"),
    ("echoN.rtps", "echoN.loadgen", "", "echo, N connections: round trips/s"),
    (
        "chat.dps",
        "chat.loadgen",
        "chat.lg_us",
        "chat: deliveries/s, messages batched per member (many per read)",
    ),
    (
        "chat_each.dps",
        "chat_each.loadgen",
        "chat_each.lg_us",
        "chat: deliveries/s, one write per message per member (as the real servers do)",
    ),
    ("connect.cps", "connect.loadgen", "connect.lg_us", "new connections/s"),
)


def ceiling_rows(results: Results) -> list[list[str]]:
    """Return the rows of the load generator ceiling table (the "reference" server's runs)."""
    rows = []
    for key, cpu_key, per_key, label in CEILING_KEYS:
        value = results.key_value("reference", key)
        if value is None:
            continue
        cpu = results.key_value("reference", cpu_key)
        per = results.key_value("reference", per_key) if per_key else None
        rows.append(
            [
                label,
                fmt(value),
                "—" if cpu is None else f"{cpu:.0f} %",
                "—" if per is None else f"{per:.2f} µs",
            ]
        )
    return rows


def print_console(
    results: Results,
    specs: Sequence[MetricSpec],
    idle_counts: Sequence[int],
    printer: Callable[[str], None] = print,
) -> None:
    """Print the results, targets, ceiling and deflate tables (with Rich when installed)."""
    header = result_header(results.roles())
    rows = result_rows(results, specs)
    targets = judge_targets(results, specs, idle_counts)
    target_rows = [[t.text, t.measured, verdict(t)] for t in targets]
    ceiling = ceiling_rows(results)
    deflate = deflate_rows(results.deflate)
    sections = [
        (title, headline, *section_table(results, specs, key))
        for key, title, headline in (
            ("channel", WS_SECTION_TITLES["channel"], channel_headline(results)),
            ("recovery", WS_SECTION_TITLES["recovery"], None),
        )
    ]
    sections = [s for s in sections if s[3]]
    cluster_head, cluster_body = cluster_table(results, specs)
    cluster_line = cluster_headline(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        printer(markdown_table(header, rows))
        printer("")
        printer(markdown_table(TARGET_HEADER, target_rows))
        for title, headline, head, body in sections:
            printer("")
            printer(f"{title} (roomcast servers only: the others have no /ws)")
            if headline:
                printer(headline.replace("**", ""))
            printer(markdown_table(head, body))
        if cluster_body:
            printer("")
            printer(CLUSTER_SECTION_TITLE)
            if cluster_line:
                printer(cluster_line.replace("**", ""))
            printer(markdown_table(cluster_head, cluster_body))
        if ceiling:
            printer("")
            printer(markdown_table(CEILING_HEADER, ceiling))
        if deflate:
            printer("")
            printer(markdown_table(DEFLATE_HEADER, deflate))
        for note in results.notes:
            printer(f"note: {note}")
        return
    console = Console(width=200)

    def show(title: str, head: Sequence[str], body: Sequence[Sequence[str]]) -> None:
        table = Table(title=title)
        for i, name in enumerate(head):
            if i == 0:
                table.add_column(name, justify="left", min_width=44)
            else:
                table.add_column(name, justify="right")
        for row in body:
            table.add_row(*row)
        console.print(table)

    if rows:  # (nothing for a run of the /ws or cluster scenarios alone)
        show("roomcast, the guide's server and Node's ws", header, rows)
    if any(t.met is not None or t.crashed for t in targets):
        ttable = Table(title="targets")
        for name, width in zip(TARGET_HEADER, (56, 56, 50), strict=True):
            ttable.add_column(name, min_width=width)
        for t, row in zip(targets, target_rows, strict=True):
            style = (
                "bold red"
                if t.crashed
                else {True: "green", False: "bold red", None: "yellow"}[t.met]
            )
            ttable.add_row(row[0], row[1], f"[{style}]{row[2]}[/{style}]")
        console.print(ttable)
    for title, headline, head, body in sections:
        show(f"{title} (roomcast servers only: the others have no /ws)", head, body)
        if headline:
            console.print(headline.replace("**", ""), markup=False)
    if cluster_body:
        show(CLUSTER_SECTION_TITLE, cluster_head, cluster_body)
        if cluster_line:
            console.print(cluster_line.replace("**", ""), markup=False)
    if ceiling:
        show("load generator ceiling (minimal picows server)", CEILING_HEADER, ceiling)
    if deflate:
        show("permessage-deflate, compressing a broadcast once", DEFLATE_HEADER, deflate)
    for note in results.notes:
        console.print(f"note: {note}", markup=False)


CLUSTER_SECTION_TITLE = "/ws fan-out across a cluster (roomcast nodes on Redis)"

#: Titles of the /ws sections, by scenario.
WS_SECTION_TITLES = {
    "channel": "/ws channel fan-out",
    "recovery": "/ws recovery after a reconnect",
}


def ws_sections_markdown(
    results: Results, specs: Sequence[MetricSpec], ws_text: Mapping[str, Sequence[str]]
) -> list[str]:
    """Return the /ws sections (those measured): headline, method paragraph and table."""
    parts: list[str] = []
    for key, title in WS_SECTION_TITLES.items():
        header, rows = section_table(results, specs, key)
        if not rows:
            continue
        parts += [f"## {title}", ""]
        headline = channel_headline(results) if key == "channel" else None
        if headline:
            parts += [headline + ".", ""]
        parts += [*ws_text.get(key, ()), "", markdown_table(header, rows), ""]
    return parts


def cluster_section_markdown(
    results: Results, specs: Sequence[MetricSpec], text: Sequence[str]
) -> list[str]:
    """Return the cluster section (if it was measured): headline, method paragraph, table."""
    header, rows = cluster_table(results, specs)
    if not rows:
        return []
    parts = [f"## {CLUSTER_SECTION_TITLE}", ""]
    headline = cluster_headline(results)
    if headline:
        parts += [headline + ".", ""]
    return [*parts, *text, "", markdown_table(header, rows), ""]


def render_markdown(
    results: Results,
    specs: Sequence[MetricSpec],
    idle_counts: Sequence[int],
    how_it_was_run: Sequence[str],
    scenario_text: Sequence[str],
    deflate_text: Sequence[str],
    ws_text: Mapping[str, Sequence[str]] | None = None,
    cluster_text: Sequence[str] = (),
) -> str:
    """Return the full docs/benchmarks.md text (``ws_text``: the /ws sections' prose,
    ``cluster_text``: the cluster section's)."""
    targets = judge_targets(results, specs, idle_counts)
    roles = results.roles()
    ratios = ", ".join(f"{a} ÷ {b}" for a, b in ratio_pairs(roles)) or "none"
    parts = [
        "# Benchmarks",
        "",
        "roomcast against the FastAPI WebSocket guide's own servers "
        "([`benchmarks/baseline/`](../benchmarks/baseline/), verbatim) and against the same "
        "endpoints on Node's `ws` library ([`benchmarks/node/`](../benchmarks/node/)), measured "
        "by [`benchmarks/run.py`](../benchmarks/run.py). This file is written by that script; "
        "do not edit it by hand, run the benchmark again.",
        "",
        "## How it was run",
        "",
        *how_it_was_run,
        "",
        "## Results",
        "",
        f"Ratios: {ratios}. ↑ marks figures where higher is better, ↓ lower. Over several "
        "runs (echo rounds, repeats), rates and latencies are medians and failure counts the "
        "worst run. `roomcast` is roomcast on its own WebSocket transport (broadcasts write one "
        "pre-built frame to every member); `roomcast-asgi` is the same app on uvicorn's "
        "`websockets-sansio` protocol, where roomcast falls back to plain ASGI sends. Load "
        f"generator CPU at or above {BUSY_LOADGEN_PCT:.0f} % of its core means that figure may "
        "be limited by the client side rather than by the server.",
        "",
        markdown_table(result_header(roles), result_rows(results, specs)),
        "",
        "## Targets",
        "",
        'Judged from the figures above by the script. A verdict followed by "limited by the '
        'load generator" names the runs behind it whose load generator used '
        f"{BUSY_LOADGEN_PCT:.0f} % or more of its core: there the server may have had room left, "
        "so a ratio against it is uncertain.",
        "",
        markdown_table(TARGET_HEADER, [[t.text, t.measured, verdict(t)] for t in targets]),
        "",
        *ws_sections_markdown(results, specs, ws_text or {}),
        *cluster_section_markdown(results, specs, cluster_text),
    ]
    ceiling = ceiling_rows(results)
    if ceiling:
        parts += [
            "## Load generator ceiling",
            "",
            "The same loads against `benchmarks/reference_server.py`, a minimal picows (Cython) "
            "server: what the load generator does when the server costs next to nothing. Two "
            "chat figures: with broadcasts batched (the server writes all pending messages to "
            "a member at once, so the load generator reads many per system call: an upper "
            "bound) and with one write per message per member, like the real servers. In the "
            "second, each message mostly arrives in a TCP read of its own, and most of the "
            "load generator's CPU per delivery is the kernel's (the read, and the ACK it sends "
            "back over loopback); that server is itself limited by one write system call per "
            "delivery. The loadgen CPU columns in the results and per-run tables are the real "
            "check that the client side kept up.",
            "",
            markdown_table(CEILING_HEADER, ceiling),
            "",
        ]
    if results.deflate:
        parts += [
            "## permessage-deflate for broadcasts",
            "",
            *deflate_text,
            "",
            markdown_table(DEFLATE_HEADER, deflate_rows(results.deflate)),
            "",
        ]
    parts += [
        "## Scenarios",
        "",
        *scenario_text,
        "",
        "## Every run",
        "",
        "CPU is the share of one core used during the measured window (the server's process "
        "tree on core 0, the load generator on core 1). A load generator near 100 % means the "
        'figure is a lower bound for the server. "Other" is what the rest of the machine used '
        "meanwhile (other processes, hypervisor steal): high values mean a noisy run.",
        "",
        markdown_table(RUN_HEADER, run_rows(results)),
        "",
    ]
    if results.notes:
        parts += ["## Notes", "", *(f"- {n}" for n in results.notes), ""]
    return "\n".join(parts)


# -- the README's figures, read back from docs/benchmarks.md ------------------------------------


def markdown_rows(markdown: str) -> list[dict[str, str]]:
    """Return every row of every table in ``markdown`` as {column header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is None:
            header = cells
        elif not all(set(c) <= {"-", ":"} for c in cells):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def _row(rows: Sequence[dict[str, str]], label: str) -> tuple[dict[str, str], re.Match[str]]:
    """Return the first row whose figure matches ``label`` (a regex), and the match."""
    for row in rows:
        found = re.fullmatch(label, row.get("figure", ""))
        if found:
            return row, found
    raise ValueError(f"docs/benchmarks.md has no row {label!r}")


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("×"))


def _times(value: float) -> str:
    """A ratio as the README writes it: whole from 2 up, two decimals below."""
    return f"{value:.0f}×" if value >= 2 else f"{value:.2f}×"


def readme_figures(markdown: str) -> str:
    """Return the README's sentence of benchmark figures, from docs/benchmarks.md's text.

    The README quotes this sentence verbatim; tests/test_pins_benchmarks.py checks that it
    does, so the README cannot drift from the last run.
    """
    rows = markdown_rows(markdown)
    chat, found = _row(rows, r"chat, ([\d,]+) members: deliveries")
    members = found.group(1)
    idle = [
        (int(m.group(1).replace(",", "")), row)
        for row in rows
        if (m := re.fullmatch(r"([\d,]+) idle /ws/chat: RSS per connection", row.get("figure", "")))
    ]
    if not idle:
        raise ValueError("docs/benchmarks.md has no idle /ws/chat row")
    idle_row = max(idle, key=lambda item: item[0])[1]
    connect, _ = _row(rows, r"new connections \(\d+ clients\): connections")
    recovery, found = _row(rows, r"time until all ([\d,]+) clients have all ([\d,]+) missed")
    clients, missed = found.groups()
    lost_row, _ = _row(rows, r"missed publications never replayed \(lost\)")
    lost = int(_number(lost_row["roomcast"]))
    rel, _ = _row(rows, r"/ws fan-out ÷ chat fan-out, deliveries/s \(medians\)")
    relm, _ = _row(rows, r"/ws fan-out ÷ matched chat fan-out .*")
    return (
        f"chat fan-out to {members} members at "
        f"{_times(_number(chat['roomcast ÷ baseline']))} the guide's deliveries/s and "
        f"{_times(_number(chat['roomcast ÷ node']))} Node's, "
        f"{_number(idle_row['roomcast']):.0f} KiB per idle connection (the guide: "
        f"{_number(idle_row['baseline (guide)']):.0f} KiB), "
        f"{_times(_number(connect['roomcast ÷ baseline']))} the guide's new connections per "
        f"second, {clients} `/ws` clients recovering {missed} missed publications each in "
        f"{_number(recovery['roomcast']) / 1000:.2f} s with "
        f"{'none' if lost == 0 else f'{lost:,}'} lost, and `/ws` fan-out at "
        f"{_number(rel['roomcast']):.2f}× the chat endpoint's deliveries/s "
        f"({_number(relm['roomcast']):.2f}× against chat lines as long as `/ws` frames"
    )


if __name__ == "__main__":
    import pathlib
    import sys

    docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    sys.stdout.write(readme_figures(docs.read_text()) + "\n")
