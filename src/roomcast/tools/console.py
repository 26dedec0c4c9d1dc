"""What the ``roomcast`` commands for people print, and how they exit (docs/cli.md).

Exit codes: 0 success (and a normal close of ``connect``), 1 failure (refused handshake,
unreachable server, HTTP error of the API, failed benchmark), 2 bad usage, 3 ``connect`` ended by
the server with a close code other than 1000/1001, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console

__all__ = [
    "EXIT_ABNORMAL_CLOSE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "compact",
    "fail",
    "print_json",
    "stderr",
    "stdout",
]

#: Exit codes (see the module docstring).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ABNORMAL_CLOSE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def stdout() -> Console:
    """The console for results: what arrived, tables, JSON."""
    # soft_wrap: received frames are printed as they are, never folded at the console width.
    return Console(soft_wrap=True, highlight=False)


def stderr() -> Console:
    """The console for everything else: progress, what happened, errors."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``roomcast: message`` in red on stderr and exit with ``code``."""
    stderr().print(f"roomcast: {message}", style="bold red", markup=False)
    raise typer.Exit(code)


def print_json(value: Any) -> None:
    """Print ``value`` as indented, colored JSON."""
    stdout().print_json(json.dumps(value))


def compact(value: Any) -> str:
    """``value`` as JSON on one line, without spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
