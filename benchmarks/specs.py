"""Which figures the report shows, per scenario: labels, units, which way is better."""

from __future__ import annotations

from collections.abc import Sequence

from samples import Agg, Better, MetricSpec, mem_key

ROLE_TITLES = {
    "baseline": "baseline (guide)",
    "node": "node (ws)",
    "roomcast": "roomcast",
    "roomcast-asgi": "roomcast-asgi (fallback)",
}

#: Ratio columns: (numerator, denominator).
RATIOS = (("roomcast", "baseline"), ("roomcast-asgi", "baseline"), ("roomcast", "node"))


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
    paced_messages: int = 2000,
    interval_ms: float = 1.0,
) -> list[MetricSpec]:
    """Return every figure of the results table and of the /ws, cluster and scale sections,
    labelled with this run's sizes."""
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
        + scale_specs(messages, paced_messages, interval_ms)
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


#: The rows of the scale tables: roomcast on each broker, then the peers (chat only).
SCALE_TITLES = {
    "memory": "roomcast, memory://",
    "redis": "roomcast, redis://",
    "redis-cluster": "roomcast, redis+cluster://",
    "nodes": "{n} roomcast nodes, redis://",
    "baseline": "the guide's code (baseline)",
    "node": "Node ws",
    "socketify": "socketify (uWebSockets)",
}

#: The endpoints of the scale tables, and what their receivers are.
SCALE_ENDPOINTS = {"chat": "chat (`/ws/chat`)", "ws": "`/ws` channel"}

#: The scale figures of every load shape: (key, label, unit, better, digits, aggregation).
SCALE_FIGURES: tuple[tuple[str, str, str, Better, int, Agg], ...] = (
    ("dps", "deliveries", "/s", "higher", 0, "median"),
    ("p50_ms", "p50 send → last receiver", "ms", "lower", 1, "median"),
    ("p99_ms", "p99 send → last receiver", "ms", "lower", 1, "median"),
    ("srv_us", "server CPU per delivery", "µs", "lower", 2, "median"),
    ("lost", "lost", "", "", 0, "max"),
)


def shape_title(messages: int, interval_ms: float) -> str:
    """Name a load shape: "max rate, 200 msgs" (``interval_ms`` 0), "paced, 1 msg per ms,
    2,000 msgs"."""
    if interval_ms <= 0:
        return f"max rate, {messages:,} msgs"
    every = "ms" if interval_ms == 1 else f"{interval_ms:g} ms"
    return f"paced, 1 msg per {every}, {messages:,} msgs"


def scale_specs(messages: int, paced_messages: int, interval_ms: float) -> list[MetricSpec]:
    """Return the figures of the scale tables, ``scale.<endpoint>.<shape>.<figure>``, each
    labelled "<shape>: <figure>"."""
    shapes = {"max": shape_title(messages, 0), "paced": shape_title(paced_messages, interval_ms)}
    return [
        MetricSpec(
            f"scale.{endpoint}.{shape}.{key}",
            f"{title}: {label}",
            unit,
            better,
            digits,
            agg,
            "scale",
        )
        for endpoint in SCALE_ENDPOINTS
        for shape, title in shapes.items()
        for key, label, unit, better, digits, agg in SCALE_FIGURES
    ]
