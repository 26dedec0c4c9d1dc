"""The README's sentence of benchmark figures, read back from docs/benchmarks.md's tables."""

from __future__ import annotations

import re
from collections.abc import Sequence


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
