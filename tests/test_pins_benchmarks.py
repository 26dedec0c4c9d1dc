"""The benchmark report's verdicts and the README's figures, without running a benchmark.

A verdict may only say "correct" or "met" about what was measured: a count that no run recorded
reads "not measured", and a run that crashed makes the verdict "failed" (the survivors' zeros
say nothing about it). The README quotes docs/benchmarks.md's last run; it must quote it right.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> Iterator[object]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report as module

        yield module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def cluster_run(results: object, kind: str, *, counts: bool = True, lost: float = 0) -> None:
    add = results.add  # type: ignore[attr-defined]
    add(kind, "cluster.dps", 1000.0)
    add(kind, "cluster.runs", 1)
    add(kind, "cluster.nodes", 3 if kind == "cluster" else 1)
    if counts:
        add(kind, "cluster.lost", lost)
        for key in ("duplicates", "out_of_order", "errors"):
            add(kind, f"cluster.{key}", 0)


def test_cluster_all_zero_in_every_run_is_correct(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    for kind in ("cluster", "single-memory", "single-redis"):
        cluster_run(results, kind)
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert "lost 0, duplicates 0, out of order 0, errors 0 (**all 0: correct**)" in head


def test_cluster_throughput_only_is_not_measured(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    for kind in ("cluster", "single-memory", "single-redis"):
        cluster_run(results, kind, counts=False)
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert "correct" not in head
    assert "lost not measured" in head
    assert head.endswith("(**not measured**)")


def test_cluster_count_missing_in_one_run_is_not_measured(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    cluster_run(results, "cluster")
    cluster_run(results, "cluster", counts=False)  # a second round without the counts
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert head.endswith("(**not measured**)"), head


def test_cluster_crashed_run_fails_the_verdict(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    for kind in ("cluster", "single-memory"):
        cluster_run(results, kind)
    results.runs.append(
        report.RunRecord(  # type: ignore[attr-defined]
            "/ws cluster fan-out", "single-redis", "1.1", "FAILED", None, None, "boom"
        )
    )
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert "correct" not in head
    assert "**failed**: 1 run(s) crashed: /ws cluster fan-out on single-redis (run 1.1)" in head


def test_cluster_every_run_crashed_still_has_a_headline(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    results.runs.append(
        report.RunRecord(  # type: ignore[attr-defined]
            "/ws cluster fan-out", "cluster", "1.1", "FAILED", None, None, "boom"
        )
    )
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert "**failed**" in head
    assert "median deliveries/s: —" in head


def test_cluster_a_count_above_0_is_not_correct(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    cluster_run(results, "cluster")
    cluster_run(results, "cluster", lost=3)
    head = report.cluster_headline(results)  # type: ignore[attr-defined]
    assert head is not None
    assert "lost 3" in head
    assert head.endswith("(**NOT all 0**)")


def chat_target(report: object, results: object) -> object:
    specs = report.metric_specs(  # type: ignore[attr-defined]
        echo_conns=64, members=1000, idle_counts=[100], connect_clients=32
    )
    targets = report.judge_targets(results, specs, [100])  # type: ignore[attr-defined]
    (target,) = [
        t for t in targets if t.text.startswith("roomcast: chat fan-out deliveries/s ≥ 1.0×")
    ]
    return target


def test_target_with_a_crashed_run_fails(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    for role, dps in (("baseline", 1000.0), ("roomcast", 5000.0)):
        results.add(role, "chat.dps", dps)
        results.add(role, "chat.lost", 0)
    assert report.verdict(chat_target(report, results)) == "met"  # type: ignore[attr-defined]
    # A second roomcast chat run crashed: its lost count was never taken.
    results.runs.append(
        report.RunRecord("chat", "roomcast", "2", "FAILED", None, None, "boom")  # type: ignore[attr-defined]
    )
    text = report.verdict(chat_target(report, results))  # type: ignore[attr-defined]
    assert text == "failed (crashed: chat on roomcast (run 2))"
    # Another scenario's crash is not this target's.
    results.runs[-1] = report.RunRecord(  # type: ignore[attr-defined]
        "new connections", "roomcast", "2", "FAILED", None, None, "boom"
    )
    assert report.verdict(chat_target(report, results)) == "met"  # type: ignore[attr-defined]


def test_target_without_its_count_is_not_measured(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    for role in ("baseline", "roomcast"):
        results.add(role, "chat.dps", 1000.0)
    verdict = report.verdict(chat_target(report, results))  # type: ignore[attr-defined]
    assert verdict == "not measured"


def test_readme_quotes_the_last_benchmark_run(report: object) -> None:
    """The README's figures are docs/benchmarks.md's (``python benchmarks/report.py`` prints
    the sentence to paste after a new run)."""
    figures = report.readme_figures((REPO / "docs" / "benchmarks.md").read_text())  # type: ignore[attr-defined]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert figures in readme, f"README.md should say: {figures}"


def test_readme_figures_follow_the_tables(report: object) -> None:
    """The sentence is read from the tables, not fixed: another run, other figures."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    figures = report.readme_figures  # type: ignore[attr-defined]
    rows = report.markdown_rows(text)  # type: ignore[attr-defined]
    chat = next(r for r in rows if r.get("figure") == "chat, 1,000 members: deliveries")
    recovery = next(r for r in rows if r.get("figure", "").startswith("time until all"))
    changed = text.replace(f"| {chat['roomcast ÷ baseline']} |", "| 3.40× |", 1).replace(
        f"| {recovery['roomcast']} |", "| 1,250 |", 1
    )
    assert "at 3.40× the guide's" not in figures(changed)
    assert "at 3× the guide's" in figures(changed)
    assert "each in 1.25 s" in figures(changed)
    lost = text.replace(
        "| missed publications never replayed (lost) |  | 0 |",
        "| missed publications never replayed (lost) |  | 7 |",
    )
    assert "with 7 lost" in figures(lost)


def scale_run(
    results: object, row: str, endpoint: str, shape: str, dps: float, p99: float, lost: float = 0
) -> None:
    add = results.add  # type: ignore[attr-defined]
    key = f"scale.{endpoint}.{shape}"
    add(row, f"{key}.dps", dps)
    add(row, f"{key}.p99_ms", p99)
    add(row, f"{key}.lost", lost)
    add(row, f"{key}.errors", 0)
    add(row, f"{key}.runs", 1)


def scale_target(report: object, results: object, url: str = "redis://") -> object:
    specs = report.metric_specs(  # type: ignore[attr-defined]
        echo_conns=64, members=1000, idle_counts=[100], connect_clients=32
    )
    targets = report.judge_targets(results, specs, [100])  # type: ignore[attr-defined]
    (target,) = [t for t in targets if t.text.startswith(f"roomcast on {url}:")]
    return target


def scale_all(results: object, redis_dps: float = 900.0, redis_p99: float = 150.0) -> None:
    for endpoint in ("chat", "ws"):
        for shape in ("max", "paced"):
            scale_run(results, "memory", endpoint, shape, 1000.0, 100.0)
            scale_run(results, "redis", endpoint, shape, redis_dps, redis_p99)


def test_scale_bar_met_only_when_every_load_clears_it(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    scale_all(results)
    assert report.verdict(scale_target(report, results)) == "met"  # type: ignore[attr-defined]
    # The cluster was not run: its bar is not measured, not met.
    text = report.verdict(scale_target(report, results, "redis+cluster://"))  # type: ignore[attr-defined]
    assert text == "not measured"


@pytest.mark.parametrize(
    ("dps", "p99", "lost"), [(790.0, 150.0, 0), (900.0, 201.0, 0), (900.0, 150.0, 1)]
)
def test_scale_bar_not_met(report: object, dps: float, p99: float, lost: float) -> None:
    """Below 0.8 times memory's deliveries/s, above twice its p99, or one delivery lost: not met."""
    results = report.Results()  # type: ignore[attr-defined]
    scale_all(results)
    scale_run(results, "redis", "ws", "paced", dps, p99, lost)  # a second /ws paced run
    scale_run(results, "redis", "ws", "paced", dps, p99, lost)  # (the median moves)
    assert report.verdict(scale_target(report, results)) == "NOT met"  # type: ignore[attr-defined]


def test_scale_bar_without_a_lost_count_is_not_measured(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    scale_all(results)
    results.add("redis", "scale.chat.max.runs", 1)  # a run that recorded no counts
    assert report.verdict(scale_target(report, results)) == "not measured"  # type: ignore[attr-defined]


def test_scale_bar_with_a_crashed_run_fails(report: object) -> None:
    results = report.Results()  # type: ignore[attr-defined]
    scale_all(results)
    results.runs.append(
        report.RunRecord("scale: /ws, paced", "memory", "1.2", "FAILED", None, None, "boom")  # type: ignore[attr-defined]
    )
    text = report.verdict(scale_target(report, results))  # type: ignore[attr-defined]
    assert text == "failed (crashed: scale: /ws, paced on memory (run 1.2))"
