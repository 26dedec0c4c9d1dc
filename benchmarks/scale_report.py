"""The scale section of the report: a table per endpoint, and the bar a node on Redis must clear.

The bar (issue 16): in the same run, one node on ``redis://`` delivers at least
:data:`BAR_DPS` of the deliveries/s of the same node on ``memory://``, with a p99 at most
:data:`BAR_P99` times ``memory://``'s and nothing lost, at max rate and paced, for chat and for
``/ws``; the same on ``redis+cluster://``. Only figures that were measured are judged: a
missing one reads "not measured", a crashed run "failed".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchconfig import SCALE_CONFIGS, SCALE_PEERS
from samples import MetricSpec, Results, fmt, fmt_ratio
from specs import SCALE_ENDPOINTS, SCALE_TITLES

#: Deliveries/s on a broker ÷ on memory://, at least.
BAR_DPS = 0.8
#: p99 on a broker ÷ on memory://, at most.
BAR_P99 = 2.0
#: The brokers judged against memory://.
BAR_BROKERS = {"redis": "redis://", "redis-cluster": "redis+cluster://"}
SHAPES = ("max", "paced")
SCALE_SECTION_TITLE = "Scale-out: one node on each broker, N nodes, and the peers"
BAR_HEADER = (
    "endpoint, load",
    "broker",
    f"deliveries/s ÷ memory:// (bar ≥ {BAR_DPS:.2f}×)",
    f"p99 ÷ memory:// (bar ≤ {BAR_P99:.2f}×)",
    "lost, errors (bar 0)",
    "verdict",
)


def scale_nodes(results: Results) -> int:
    """Return how many nodes the N-node configuration ran (0 if it did not run)."""
    return int(results.key_value("nodes", "scale.nodes", "max") or 0)


def scale_rows(results: Results, endpoint: str) -> list[str]:
    """Return the configurations with figures of ``endpoint``, in table order."""
    return [
        row
        for row in (*SCALE_CONFIGS, *SCALE_PEERS)
        if any(results.samples.get((row, f"scale.{endpoint}.{shape}.runs")) for shape in SHAPES)
    ]


def row_title(results: Results, row: str) -> str:
    """Return the table title of configuration ``row``."""
    return SCALE_TITLES[row].format(n=scale_nodes(results) or "N")


def scale_tables(
    results: Results, specs: Sequence[MetricSpec]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """Return (title, header, rows) of every endpoint and load shape that has figures: one row
    per configuration, one column per figure."""
    tables = []
    for endpoint, what in SCALE_ENDPOINTS.items():
        rows = scale_rows(results, endpoint)
        for shape in SHAPES:
            cols = [
                s
                for s in specs
                if s.section == "scale" and s.key.split(".")[1:3] == [endpoint, shape]
            ]
            if not rows or not cols:
                continue
            header = ["server"]
            for spec in cols:
                better = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
                unit = f" ({spec.unit}{better})" if spec.unit or better else ""
                header.append(spec.label.split(": ", 1)[1] + unit)
            body = [
                [row_title(results, row), *(fmt(results.value(row, s), s.digits) for s in cols)]
                for row in rows
                if results.samples.get((row, f"scale.{endpoint}.{shape}.runs"))
            ]
            title = f"{what}, {cols[0].label.split(': ', 1)[0]}"
            if body:
                tables.append((title, header, body))
    return tables


@dataclass
class Bar:
    """One line of the bar: a broker against memory:// for one endpoint and load shape."""

    endpoint: str
    shape: str
    broker: str
    dps: float | None  # deliveries/s ÷ memory://'s
    p99: float | None  # p99 ÷ memory://'s
    lost: float | None  # lost deliveries, worst run (both configurations)
    errors: float | None  # /ws errors, worst run (both configurations)
    crashed: list[str]

    @property
    def met(self) -> bool | None:
        """Tell whether the bar is cleared (None: not measured)."""
        if self.crashed:
            return False
        if None in (self.dps, self.p99, self.lost, self.errors):
            return None
        return (
            self.dps >= BAR_DPS  # type: ignore[operator]
            and self.p99 <= BAR_P99  # type: ignore[operator]
            and self.lost == 0
            and self.errors == 0
        )

    @property
    def verdict(self) -> str:
        """Say "met", "NOT met", "not measured" or "failed (crashed: …)"."""
        if self.crashed:
            return f"failed (crashed: {'; '.join(self.crashed)})"
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def _worst(results: Results, rows: Sequence[str], key: str) -> float | None:
    """Return the worst count ``key`` over every run of ``rows`` (None unless all have it)."""
    counts = [results.every_run(row, key, key.rsplit(".", 1)[0] + ".runs") for row in rows]
    if any(c is None for c in counts):
        return None
    return max(c or 0.0 for c in counts)


def scale_bars(results: Results) -> list[Bar]:
    """Judge every broker against memory:// for every endpoint and load shape."""
    bars = []
    for endpoint in SCALE_ENDPOINTS:
        for shape in SHAPES:
            key = f"scale.{endpoint}.{shape}"
            mem_dps = results.key_value("memory", f"{key}.dps")
            mem_p99 = results.key_value("memory", f"{key}.p99_ms")
            for broker in BAR_BROKERS:
                dps = results.key_value(broker, f"{key}.dps")
                p99 = results.key_value(broker, f"{key}.p99_ms")
                rows = ("memory", broker)
                bars.append(
                    Bar(
                        endpoint,
                        shape,
                        broker,
                        dps / mem_dps if dps is not None and mem_dps else None,
                        p99 / mem_p99 if p99 is not None and mem_p99 else None,
                        _worst(results, rows, f"{key}.lost"),
                        _worst(results, rows, f"{key}.errors"),
                        results.crashed(rows, key),
                    )
                )
    return bars


def shape_titles(specs: Sequence[MetricSpec]) -> dict[str, str]:
    """Return each load shape's title ("max" → "max rate, 200 msgs"), from the specs' labels."""
    titles = {}
    for spec in specs:
        if spec.section == "scale":
            shape = spec.key.split(".")[2]
            titles.setdefault(shape, spec.label.split(": ", 1)[0])
    return titles


def bar_rows(results: Results, specs: Sequence[MetricSpec]) -> list[list[str]]:
    """Return the bar table's rows (those with anything measured or crashed)."""
    titles = shape_titles(specs)
    rows = []
    for bar in scale_bars(results):
        if bar.dps is None and bar.p99 is None and not bar.crashed:
            continue
        what = "chat" if bar.endpoint == "chat" else "/ws"
        rows.append(
            [
                f"{what}, {titles.get(bar.shape, bar.shape)}",
                BAR_BROKERS[bar.broker],
                fmt_ratio(bar.dps),
                fmt_ratio(bar.p99),
                f"{fmt(bar.lost)}, {fmt(bar.errors)}",
                bar.verdict,
            ]
        )
    return rows


def bar_headline(results: Results) -> str | None:
    """Return the bar's verdict per broker (over both endpoints and shapes), or None if no
    broker was measured against memory://."""
    bars = scale_bars(results)
    parts = []
    for broker, url in BAR_BROKERS.items():
        mine = [b for b in bars if b.broker == broker]
        if all(b.dps is None and not b.crashed for b in mine):
            continue
        met = sum(1 for b in mine if b.met)
        if any(b.crashed for b in mine):
            verdict = "**failed** (a run crashed)"
        elif met == len(mine):
            verdict = "**met**"
        elif any(b.met is False for b in mine):
            verdict = "**NOT met**"
        else:
            verdict = "**not measured**"
        parts.append(f"{url} {verdict} ({met} of {len(mine)} lines)")
    if not parts:
        return None
    return (
        f"A node on Redis against the same node on memory:// (deliveries/s ≥ {BAR_DPS:.2f}×, "
        f"p99 ≤ {BAR_P99:.2f}×, nothing lost, chat and /ws, max rate and paced): "
        + "; ".join(parts)
    )
