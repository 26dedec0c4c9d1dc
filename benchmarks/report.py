"""Aggregate benchmark samples, judge the targets, print a table and write docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

ROLES = ("baseline", "roomcast")
Better = Literal["higher", "lower", ""]
Agg = Literal["median", "max", "text"]


@dataclass(frozen=True)
class MetricSpec:
    """One figure of the results table.

    ``better`` says which direction is good ("" = no ratio is shown); ``agg`` says how repeats
    are combined ("max" for counts of failures, so one bad repeat shows; "text" for a verbal
    figure, whose distinct values are all shown).
    """

    key: str
    label: str
    unit: str
    better: Better
    digits: int
    agg: Agg = "median"


def _echo(n: str, name: str) -> list[MetricSpec]:
    """Return the metric specs of the echo scenario with ``n`` connections."""
    head = f"echo, {name}:"
    return [
        MetricSpec(f"echo{n}.rtps", f"{head} round trips", "/s", "higher", 0),
        MetricSpec(f"echo{n}.p50_us", f"{head} p50 round trip", "µs", "lower", 0),
        MetricSpec(f"echo{n}.p99_us", f"{head} p99 round trip", "µs", "lower", 0),
        MetricSpec(f"echo{n}.errors", f"{head} wrong or missing replies", "", "", 0, "max"),
    ]


def metric_specs(echo_conns: int, members: int, idle_conns: int) -> list[MetricSpec]:
    """Return every figure of the results table, labelled with this run's sizes."""
    chat = f"chat, {members:,} members:"
    stall = "chat + 1 stalled member:"
    return [
        *_echo("1", "1 connection"),
        *_echo("N", f"{echo_conns} connections"),
        MetricSpec("chat.dps", f"{chat} deliveries", "/s", "higher", 0),
        MetricSpec("chat.p50_ms", f"{chat} p50 send → last member", "ms", "lower", 1),
        MetricSpec("chat.p99_ms", f"{chat} p99 send → last member", "ms", "lower", 1),
        MetricSpec("chat.lost", f"{chat} lost deliveries", "", "", 0, "max"),
        MetricSpec("stall.dps", f"{stall} deliveries", "/s", "higher", 0),
        MetricSpec("stall.p50_ms", f"{stall} p50 send → last member", "ms", "lower", 1),
        MetricSpec("stall.p99_ms", f"{stall} p99 send → last member", "ms", "lower", 1),
        MetricSpec("stall.lost", f"{stall} lost deliveries", "", "", 0, "max"),
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
        MetricSpec(
            "mem.chat", f"{idle_conns:,} idle /ws/chat: RSS per connection", "KiB", "lower", 1
        ),
        MetricSpec("mem.chat_mib", f"{idle_conns:,} idle /ws/chat: server RSS", "MiB", "lower", 1),
        MetricSpec(
            "mem.echo", f"{idle_conns:,} idle /ws/echo: RSS per connection", "KiB", "lower", 1
        ),
        MetricSpec("mem.echo_mib", f"{idle_conns:,} idle /ws/echo: server RSS", "MiB", "lower", 1),
    ]


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
        vals = [v for v in self.samples.get((role, spec.key), []) if v is not None]
        if not vals:
            return None
        return float(max(vals) if spec.agg == "max" else statistics.median(vals))

    def measured(self, spec: MetricSpec) -> bool:
        """Tell whether ``spec`` was measured for either server."""
        store = self.texts if spec.agg == "text" else self.samples
        return any(store.get((role, spec.key)) for role in ROLES)


def ratio(spec: MetricSpec, base: float | None, room: float | None) -> float | None:
    """Return roomcast ÷ baseline when it means something, else None."""
    if not spec.better or base is None or room is None or base == 0:
        return None
    return room / base


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a figure with thousands separators, or a dash when missing."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    """Format a ratio as 1.23 followed by a multiplication sign, or a dash."""
    return "—" if value is None else f"{value:.2f}×"


def result_rows(results: Results, specs: Sequence[MetricSpec]) -> list[list[str]]:
    """Return the results table rows: figure, unit, baseline, roomcast, ratio."""
    rows = []
    for spec in specs:
        if not results.measured(spec):
            continue
        if spec.agg == "text":
            rows.append(
                [
                    spec.label,
                    "",
                    results.text("baseline", spec),
                    results.text("roomcast", spec),
                    "—",
                ]
            )
            continue
        base, room = results.value("baseline", spec), results.value("roomcast", spec)
        better = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
        rows.append(
            [
                spec.label,
                spec.unit + better,
                fmt(base, spec.digits),
                fmt(room, spec.digits),
                fmt_ratio(ratio(spec, base, room)),
            ]
        )
    return rows


@dataclass
class Target:
    """One target with what was measured and whether it was met (None = not measured)."""

    text: str
    measured: str
    met: bool | None


def _get(results: Results, specs: dict[str, MetricSpec], role: str, key: str) -> float | None:
    """Return the aggregated ``key`` for ``role`` (None if that figure was not run)."""
    spec = specs.get(key)
    return None if spec is None else results.value(role, spec)


def judge_targets(results: Results, spec_list: Sequence[MetricSpec]) -> list[Target]:
    """Judge the four targets from the measured figures (never from constants)."""
    specs = {s.key: s for s in spec_list}

    def val(role: str, key: str) -> float | None:
        return _get(results, specs, role, key)

    def rat(key: str) -> float | None:
        return ratio(specs[key], val("baseline", key), val("roomcast", key))

    targets = []
    r1, rn = rat("echo1.rtps"), rat("echoN.rtps")
    e1, en = val("roomcast", "echo1.errors"), val("roomcast", "echoN.errors")
    met: bool | None = None
    if r1 is not None and rn is not None and e1 is not None and en is not None:
        met = r1 >= 1.0 and rn >= 1.0 and e1 == 0 and en == 0
    targets.append(
        Target(
            "echo round trips/s ≥ 1.0× baseline (1 and N connections), every reply correct",
            f"1 conn {fmt_ratio(r1)}, N conns {fmt_ratio(rn)}; wrong replies {fmt(e1)} / {fmt(en)}",
            met,
        )
    )
    rc, lost = rat("chat.dps"), val("roomcast", "chat.lost")
    targets.append(
        Target(
            "chat fan-out: deliveries/s ≥ 1.0× baseline with 0 lost",
            f"{fmt_ratio(rc)}, lost {fmt(lost)}",
            None if rc is None or lost is None else rc >= 1.0 and lost == 0,
        )
    )
    rel, slost = val("roomcast", "stall.rel"), val("roomcast", "stall.lost")
    base_rel = val("baseline", "stall.rel")
    targets.append(
        Target(
            "one stalled member: roomcast's other members get ≥ 0.9× its own unstalled rate, "
            "0 lost",
            f"roomcast {fmt_ratio(rel)} (baseline {fmt_ratio(base_rel)}), lost {fmt(slost)}",
            None if rel is None or slost is None else rel >= 0.9 and slost == 0,
        )
    )
    mc, me = rat("mem.chat"), rat("mem.echo")
    targets.append(
        Target(
            "memory per idle connection ≤ 1.15× baseline (/ws/chat and /ws/echo)",
            f"chat {fmt_ratio(mc)}, echo {fmt_ratio(me)}",
            None if mc is None or me is None else mc <= 1.15 and me <= 1.15,
        )
    )
    return targets


def verdict(met: bool | None) -> str:
    """Render a target verdict."""
    return {True: "met", False: "NOT met", None: "not measured"}[met]


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


RESULT_HEADER = ("figure", "unit", "baseline (guide)", "roomcast", "roomcast ÷ baseline")
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


CEILING_KEYS = (
    ("echo1.rtps", "echo, 1 connection: round trips/s"),
    ("echoN.rtps", "echo, N connections: round trips/s"),
    ("chat.dps", "chat: deliveries/s"),
)


def ceiling_rows(results: Results) -> list[list[str]]:
    """Return the rows of the load generator ceiling table (the "reference" server's runs)."""
    rows = []
    for key, label in CEILING_KEYS:
        vals = [v for v in results.samples.get(("reference", key), []) if v is not None]
        if vals:
            rows.append([label, fmt(statistics.median(vals))])
    return rows


def print_console(
    results: Results, specs: Sequence[MetricSpec], printer: Callable[[str], None] = print
) -> None:
    """Print the results and targets tables (with Rich when it is installed)."""
    rows = result_rows(results, specs)
    targets = judge_targets(results, specs)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        printer(markdown_table(RESULT_HEADER, rows))
        printer("")
        printer(
            markdown_table(TARGET_HEADER, [[t.text, t.measured, verdict(t.met)] for t in targets])
        )
        return
    console = Console(width=160)
    table = Table(title="roomcast vs the guide's server")
    for i, name in enumerate(RESULT_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    ttable = Table(title="targets")
    for name in TARGET_HEADER:
        ttable.add_column(name)
    for t in targets:
        style = {True: "green", False: "bold red", None: "yellow"}[t.met]
        ttable.add_row(t.text, t.measured, f"[{style}]{verdict(t.met)}[/{style}]")
    console.print(ttable)
    ceiling = ceiling_rows(results)
    if ceiling:
        ctable = Table(title="load generator ceiling (minimal picows server)")
        ctable.add_column("figure")
        ctable.add_column("minimal server", justify="right")
        for row in ceiling:
            ctable.add_row(*row)
        console.print(ctable)
    for note in results.notes:
        console.print(f"note: {note}", markup=False)


def render_markdown(
    results: Results,
    specs: Sequence[MetricSpec],
    how_it_was_run: Sequence[str],
    scenario_text: Sequence[str],
) -> str:
    """Return the full docs/benchmarks.md text."""
    targets = judge_targets(results, specs)
    parts = [
        "# Benchmarks",
        "",
        "roomcast against the FastAPI WebSocket guide's own servers "
        "([`benchmarks/baseline/`](../benchmarks/baseline/), verbatim), measured by "
        "[`benchmarks/run.py`](../benchmarks/run.py). This file is written by that script; "
        "do not edit it by hand, run the benchmark again.",
        "",
        "## How it was run",
        "",
        *how_it_was_run,
        "",
        "## Results",
        "",
        "Ratios are roomcast ÷ baseline; ↑ marks figures where higher is better, ↓ lower. "
        "Over several runs (echo rounds, repeats), rates and latencies are medians and failure "
        "counts the worst run.",
        "",
        markdown_table(RESULT_HEADER, result_rows(results, specs)),
        "",
        "## Targets",
        "",
        "Judged from the figures above by the script.",
        "",
        markdown_table(TARGET_HEADER, [[t.text, t.measured, verdict(t.met)] for t in targets]),
        "",
    ]
    ceiling = ceiling_rows(results)
    if ceiling:
        parts += [
            "## Load generator ceiling",
            "",
            "The same loads against `benchmarks/reference_server.py`, a minimal picows (Cython) "
            "server: what the load generator does when the server costs next to nothing. The "
            "chat figure is an upper bound: that server writes all pending messages to a member "
            "at once, so the load generator reads many per system call, while the real servers "
            'send every message on its own and cost it several µs of CPU per delivery ("loadgen '
            '… per delivery" in the run notes below). The loadgen CPU column below is the real '
            "check that the client side kept up.",
            "",
            markdown_table(("figure", "minimal server"), ceiling),
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
