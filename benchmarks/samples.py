"""What a benchmark run recorded: every sample by server and metric, and how to read them.

:class:`Results` keeps every sample (a run may repeat a scenario) and the notes of each
run; :class:`MetricSpec` says how one metric is labelled, aggregated and compared. The
report (``report.py``) and the targets (``targets.py``) read the samples through them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from deflate import DeflateRow

#: The servers compared, in column order.
ROLES = ("baseline", "node", "roomcast", "roomcast-asgi")

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
    if scenario.startswith("scale: "):  # "scale: chat, max", "scale: /ws, paced"
        endpoint, shape = scenario.removeprefix("scale: ").split(", ", 1)
        return (f"scale.{'chat' if endpoint == 'chat' else 'ws'}.{shape.split()[0].rstrip(',')}",)
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


def cluster_nodes(results: Results) -> int:
    """Return how many nodes the cluster configuration ran (0 if it did not run)."""
    return int(results.key_value("cluster", "cluster.nodes", "max") or 0)


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
