"""The prose of docs/benchmarks.md that describes the run: machine, versions, scenarios."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psutil

from benchconfig import Config
from servers import REPO_DIR, ROOMCAST_ENV

VERSIONED = (
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "uvloop",
    "httptools",
    "picows",
    "psutil",
    "roomcast",
)


def _version(dist: str) -> str:
    """Return an installed distribution's version, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    """Describe the checkout: short commit (+ "with local changes"), or "no commit yet"."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain"))
    if not rev:
        return "no commit yet (working tree)"
    return rev + (" with local changes" if dirty else "")


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def how_it_was_run(
    cfg: Config, argv: Sequence[str], pinned: bool, wall_s: float, fd_limit: int
) -> list[str]:
    """Return the "How it was run" bullet list."""
    cmd = " ".join(["python", "benchmarks/run.py", *(shlex.quote(a) for a in argv)])
    versions = ", ".join(f"{d} {_version(d)}" for d in VERSIONED)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ROOMCAST_ENV.items())
    roomcast_cmd = (
        "the baseline again (--roomcast-as-baseline, harness self-test)"
        if cfg.roomcast_as_baseline
        else f"`{env} python -m roomcast serve --host 127.0.0.1 --port PORT` "
        "(one process serving every endpoint; src/ first on PYTHONPATH)"
    )
    return [
        f"- Command: `{cmd}` (repeats: {cfg.repeats}; took {wall_s:.0f} s)",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"code: {_git_revision()}",
        f"- Machine: {os.cpu_count()} cores ({_cpu_model()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}",
        f"- Packages: {versions}",
        "- Pinning: "
        + (
            "each server on core 0 (`taskset -c 0`), the load generator on core 1 "
            "(`sched_setaffinity`)"
            if pinned
            else "none (fewer than 2 cores)"
        ),
        "- Load generator: one process, picows (Cython WebSocket client) on uvloop, "
        f"callbacks in Python; file descriptor limit raised to {fd_limit:,}",
        "- Baseline: `uvicorn echo_server:app --host 127.0.0.1 --port PORT` (resp. "
        "`chat_server:app`), run from `benchmarks/baseline/`, plain uvicorn defaults "
        "(INFO logging, access log on)",
        f"- roomcast: {roomcast_cmd}",
        "- A fresh server process for every chat and memory run; the echo runs share one "
        "process per server. Both servers run on loopback only.",
    ]


def scenario_text(cfg: Config) -> list[str]:
    """Return the "Scenarios" bullet list, with this run's sizes."""
    return [
        f"- **echo**: 1 and {cfg.echo_conns} connections to `/ws/echo`, each in a closed loop "
        "(send, await the reply, check it is exactly `Echo: ` + what was sent, send the next); "
        f"{cfg.warmup:g} s unmeasured, then {cfg.duration:g} s measured; both servers stay up "
        f"and take turns for {cfg.echo_rounds} round(s) (order flipped every round), medians "
        "kept. Round trips/s counts replies in the window; latency is send → reply per round "
        "trip.",
        f"- **chat**: {cfg.members:,} members on `/ws/chat`, connected 50 at a time; a "
        "warm-up message must reach all of them (so every member is registered) before "
        f"member #1 sends {cfg.messages} messages of 64 bytes back to back (each carries its "
        "sequence number; every receipt is checked against the exact expected text). "
        "Deliveries/s = deliveries ÷ (last receipt − first send); latency = time the last "
        "member got message i − send time of i; lost = expected − received after waiting up "
        f"to {cfg.drain_timeout:g} s (or {cfg.idle_timeout:g} s without any delivery).",
        "- **chat + 1 stalled member**: the same plus one member that connects over a raw "
        "socket with SO_RCVBUF = 4096 and TCP_MAXSEG = 1024 set before connecting, does the "
        "upgrade by hand and never reads again (on loopback, Linux would otherwise give the "
        "server a send buffer of megabytes for it, which no short run fills). Before the "
        f"measured burst, {cfg.fill_messages} messages of 1 KiB fill its buffers (not measured; "
        f"waited for until all healthy members have them, or {cfg.idle_timeout:g} s without "
        "progress). Lost counts the healthy members only; a room that stops delivering is "
        'reported as STALLED. "÷ own unstalled" divides this run\'s deliveries/s by the same '
        "server's plain chat figure. The stalled member's connection is drained (3 s at most) "
        "after the measurement, to see whether the server had closed it; a server that cuts a "
        "slow member only once a queue of many messages overflows may leave it open here, "
        "which the next scenario settles.",
        "- **chat, 1 sender + 1 stalled member**: a room of two on a fresh server; the "
        "sender sends 1 KiB messages in batches of 100 (3,000 at most) until either it gets "
        "`A client left the chat` (the server cut the stalled member) or its own messages stop "
        "coming back for 2 s (the room stalled).",
        f"- **memory**: {cfg.idle_conns:,} connections to `/ws/chat` (members that send "
        "nothing) and, on another fresh server, to `/ws/echo`; server RSS (psutil, whole process "
        f"tree) after one warm-up round trip and {cfg.settle:g} s, then again {cfg.settle:g} s "
        "after the last connection opened; per connection = growth ÷ connections.",
        "- **load generator ceiling**: echo and chat against `benchmarks/reference_server.py` "
        "(see above), once per invocation.",
        "- Before each measurement the harness waits (2 minutes at most per invocation) until "
        "other processes use less than 0.15 of a core.",
    ]
