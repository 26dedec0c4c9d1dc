"""What a ``roomcast bench`` run measured, and its forms: a table, JSON, a latency histogram."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from roomcast.tools.loadgen import percentile_ms

__all__ = ["BenchResult", "latency_metrics", "results_table", "write_histogram"]

#: Every metric a result may have: key (as in --json) → label (as in the table) and format.
_METRICS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "url": ("url", str),
    "channel": ("channel", str),
    "connections": ("connections", str),
    "subscribers": ("subscribers", str),
    "publications": ("publications", str),
    "duration_s": ("duration", lambda v: f"{v:.1f} s"),
    "deliveries": ("deliveries", lambda v: f"{v:,}"),
    "expected": ("expected", lambda v: f"{v:,}"),
    "deliveries_per_s": ("deliveries/s", lambda v: f"{v:,.0f}"),
    "latency_p50_ms": ("latency p50", lambda v: _ms(v)),
    "latency_p90_ms": ("latency p90", lambda v: _ms(v)),
    "latency_p99_ms": ("latency p99", lambda v: _ms(v)),
    "latency_max_ms": ("latency max", lambda v: _ms(v)),
    "lost": ("lost", str),
    "duplicates": ("duplicates", str),
    "out_of_order": ("out of order", str),
    "closed_early": ("closed early", lambda v: _closes(v)),
    "elapsed_s": ("elapsed", lambda v: f"{v:.2f} s"),
}
#: The metrics that must be zero (or empty) for a run to be ``ok``.
_PROBLEMS = ("lost", "duplicates", "out_of_order", "closed_early")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _closes(closed: dict[str, int]) -> str:
    if not closed:
        return "none"
    return ", ".join(f"{count} with {code}" for code, count in sorted(closed.items()))


@dataclass
class BenchResult:
    """What a run measured: ``metrics`` (keys of ``_METRICS``) and every latency, in seconds."""

    kind: str
    metrics: dict[str, Any]
    latencies: list[float] = field(repr=False)

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated, reordered, and no connection closed by the server."""
        return not any(self.metrics.get(key) for key in _PROBLEMS)

    def summary(self) -> dict[str, Any]:
        """The result as ``--json`` prints it."""
        return {"scenario": self.kind, **self.metrics, "ok": self.ok}


def latency_metrics(latencies: Sequence[float]) -> dict[str, float | None]:
    """The latency metrics (milliseconds) of ``latencies`` (seconds)."""
    ordered = sorted(latencies)
    return {
        "latency_p50_ms": percentile_ms(ordered, 50),
        "latency_p90_ms": percentile_ms(ordered, 90),
        "latency_p99_ms": percentile_ms(ordered, 99),
        "latency_max_ms": percentile_ms(ordered, 100),
    }


def results_table(result: BenchResult) -> Table:
    """A Rich table of ``result``: one metric per row."""
    verdict = "ok" if result.ok else "PROBLEMS: see lost / duplicates / closed early"
    table = Table(title=f"roomcast bench {result.kind}", caption=verdict)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        label, fmt = _METRICS[key]
        bad = key in _PROBLEMS and bool(value)
        table.add_row(label, fmt(value), style="bold red" if bad else None)
    return table


def write_histogram(result: BenchResult, path: str) -> str | None:
    """Write a latency histogram of ``result`` to ``path``; return a problem, or None."""
    if not result.latencies:
        return "no latency was measured: no histogram written"
    try:
        # By name: matplotlib is optional, and mypy must not need it installed.
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return (
            f"matplotlib is not installed (pip install matplotlib): no histogram written to {path}"
        )
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    values = [latency * 1000 for latency in result.latencies]
    p50 = result.metrics.get("latency_p50_ms")
    p99 = result.metrics.get("latency_p99_ms")
    figure, axes = plt.subplots(figsize=(8, 4.5))
    try:
        axes.hist(values, bins=60, color="#4c72b0")
        for value, name, style in ((p50, "p50", "--"), (p99, "p99", ":")):
            if value is not None:
                axes.axvline(value, color="black", linestyle=style, label=f"{name} {value:.2f} ms")
        axes.set_xlabel("latency (ms)")
        axes.set_ylabel("messages")
        what = "publish to receipt" if result.kind == "fanout" else "round trip"
        axes.set_title(f"roomcast bench {result.kind}: {what}, {len(values):,} messages")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    except OSError as error:
        return f"cannot write {path}: {error}"
    finally:
        plt.close(figure)
    return None
