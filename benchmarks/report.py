"""Print a run's tables and write docs/benchmarks.md from its samples.

The samples and how to read them are ``samples.py``; which figures each scenario shows,
``specs.py``; the targets and their verdicts, ``targets.py``; the README's sentence of
figures, ``readme.py`` (``python benchmarks/report.py`` prints it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from benchconfig import CLUSTER_KINDS
from deflate import DEFLATE_HEADER, deflate_rows
from readme import markdown_rows, readme_figures
from samples import MetricSpec, Results, RunRecord, cluster_nodes, fmt, fmt_ratio, ratio
from scale_report import BAR_HEADER, SCALE_SECTION_TITLE, bar_headline, bar_rows, scale_tables
from specs import (
    CHANNEL_BAR,
    CLUSTER_RATIOS,
    CLUSTER_TITLES,
    CLUSTER_ZERO,
    MATCHED_WHY,
    RATIOS,
    ROLE_TITLES,
    WS_ROLES,
    metric_specs,
)
from targets import BUSY_LOADGEN_PCT, judge_targets, verdict

#: What the report gives, with what a reader of a run needs beside it (the samples, the figures
#: of each scenario, the verdicts, the README's sentence): tests/test_pins_benchmarks.py reads
#: them from here.
__all__ = [
    "Results",
    "RunRecord",
    "cluster_headline",
    "judge_targets",
    "markdown_rows",
    "metric_specs",
    "print_console",
    "readme_figures",
    "render_markdown",
    "verdict",
]


def cluster_kinds(results: Results, specs: Sequence[MetricSpec]) -> list[str]:
    """Return the cluster configurations with any figure, in column order."""
    keys = [s.key for s in specs if s.section == "cluster"]
    return [k for k in CLUSTER_KINDS if any(results.samples.get((k, key)) for key in keys)]


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
    scale = [(f"{SCALE_SECTION_TITLE}: {t}", h, b) for t, h, b in scale_tables(results, specs)]
    bars = bar_rows(results, specs)
    if bars:
        scale.append((f"{SCALE_SECTION_TITLE}: the bar", list(BAR_HEADER), bars))
    bar_line = bar_headline(results)
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
        for title, head, body in scale:
            printer("")
            printer(title)
            printer(markdown_table(head, body))
        if bar_line:
            printer(bar_line.replace("**", ""))
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
    for title, head, body in scale:
        show(title, head, body)
    if bar_line:
        console.print(bar_line.replace("**", ""), markup=False)
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


def scale_section_markdown(
    results: Results, specs: Sequence[MetricSpec], text: Sequence[str]
) -> list[str]:
    """Return the scale section (if it was measured): the bar's headline and table, the method
    paragraph, one table per endpoint."""
    tables = scale_tables(results, specs)
    if not tables:
        return []
    parts = [f"## {SCALE_SECTION_TITLE}", ""]
    headline = bar_headline(results)
    if headline:
        parts += [headline + ".", ""]
    bars = bar_rows(results, specs)
    if bars:
        parts += [markdown_table(BAR_HEADER, bars), ""]
    parts += [*text, ""]
    for title, header, rows in tables:
        parts += [f"### {title}", "", markdown_table(header, rows), ""]
    return parts


def render_markdown(
    results: Results,
    specs: Sequence[MetricSpec],
    idle_counts: Sequence[int],
    how_it_was_run: Sequence[str],
    scenario_text: Sequence[str],
    deflate_text: Sequence[str],
    ws_text: Mapping[str, Sequence[str]] | None = None,
    cluster_text: Sequence[str] = (),
    scale_text: Sequence[str] = (),
) -> str:
    """Return the full docs/benchmarks.md text (``ws_text``: the /ws sections' prose,
    ``cluster_text``: the cluster section's, ``scale_text``: the scale section's)."""
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
        *scale_section_markdown(results, specs, scale_text),
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


if __name__ == "__main__":
    import pathlib
    import sys

    docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    sys.stdout.write(readme_figures(docs.read_text()) + "\n")
