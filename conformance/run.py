"""Autobahn|Testsuite conformance of roomcast's WebSocket transport, in one command.

Starts ``conformance/echo_app.py`` (an exact echo server) with the chosen WebSocket
implementation, points Autobahn's fuzzing client (``wstest -m fuzzingclient``) at it, reads the
JSON reports and prints the totals per behaviour::

    python conformance/run.py                          # all cases (1-13), roomcast's transport
    python conformance/run.py --cases 1-11             # everything but compression (12, 13)
    python conformance/run.py --cases 6.4.*,7.1.5      # single cases or patterns
    python conformance/run.py --ws websockets-sansio   # uvicorn's default implementation
    python conformance/run.py --compare websockets-sansio --write-docs   # docs/conformance.md

The cases run in chunks (one ``wstest`` run per case group; 12.x and 13.x per sub-group), each
bounded by what is left of ``--timeout``: a chunk that runs out of time loses only its own cases,
which are then reported as MISSING. The exit status is 0 when no case of the ``--ws``
implementation FAILED or went MISSING, 1 when one did, 2 when the run could not start (for
instance no ``wstest``: install it with ``conformance/install.sh``).

``wstest`` is found through ``--wstest``, then the ROOMCAST_WSTEST environment variable, then the
virtualenv ``conformance/install.sh`` makes (ROOMCAST_AUTOBAHN_VENV, default
/opt/autobahn-venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ECHO_APP = HERE / "echo_app.py"
DEFAULT_DOCS = ROOT / "docs" / "conformance.md"
DEFAULT_VENV = Path(os.environ.get("ROOMCAST_AUTOBAHN_VENV") or "/opt/autobahn-venv")
INSTALL_HINT = "install it with: bash conformance/install.sh (or set ROOMCAST_WSTEST)"

#: Autobahn's case groups (there is no 8 and no 11).
GROUPS = (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)
#: Groups run one sub-group per ``wstest`` run: they are the slow ones.
SPLIT_GROUPS = (12, 13)
#: Autobahn's verdicts (``behavior``), in report order, then ours for a case that never ran.
BEHAVIOURS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
MISSING = "MISSING"
#: Verdicts that make the run fail.
BAD = ("FAILED", MISSING)

SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Explanation:
    """Why a verdict is right or acceptable for the cases whose id starts with one of ``prefixes``.

    ``verdict`` is Autobahn's ``behavior`` or, for the closing handshake, its ``behaviorClose``.
    """

    prefixes: tuple[str, ...]
    verdict: str
    title: str
    text: str


#: The verdicts roomcast's transport is known to get, and why each is right or acceptable. A
#: non-OK verdict with no entry here is listed under "not explained yet" in the docs.
EXPLANATIONS: tuple[Explanation, ...] = (
    Explanation(
        ("3.", "4.", "5.15"),
        "NON-STRICT",
        "the message before a broken frame is not echoed",
        "In these cases the client sends a valid text message and, right behind it in the "
        "same write, a frame that breaks the protocol: reserved bits set with no extension "
        "that defines them (3.x), a reserved opcode (4.x), a continuation frame with nothing "
        "to continue (5.15). The strict outcome (OK) is the echo of the valid message, then "
        "the failure; NON-STRICT is the failure alone. The transport parses every frame it "
        "has read as soon as it reads it, so it finds the broken frame and fails the "
        "connection with 1002 (protocol error) before the app task has run; when the app "
        "then sends its echo, the connection is already closing and nothing more is sent "
        "(RFC 6455 section 5.5.1). Failing the connection as soon as the error is seen is "
        "what section 7.1.7 asks for, and data the app had not answered yet may be lost when "
        "a connection is failed, so this is correct; Autobahn accepts it as NON-STRICT. (To "
        "get OK the transport would have to hold the failure back until the app has taken "
        "every message read before the bad frame.) Whether the app task gets to run between "
        "the two frames depends on how the client's writes arrive, so a case or two of "
        "these (4.2.5, for one) is OK in some runs and NON-STRICT in others; uvicorn's "
        "`websockets-sansio` behaves the same way.",
    ),
    Explanation(
        ("6.4.",),
        "NON-STRICT",
        "invalid UTF-8 found when the frame is complete, not byte by byte",
        "Cases 6.4.3 and 6.4.4 send one text frame in three TCP writes with a pause after "
        "each; the invalid UTF-8 is in the second write. The strictest endpoint fails the "
        "connection as soon as those bytes arrive, before the frame is complete (OK); "
        "NON-STRICT means it failed the connection (with 1007, the right code) once the "
        "whole frame was in. The transport validates each frame's payload when the frame is "
        "complete (decoding incrementally across the frames of a fragmented message, which "
        "is why 6.4.1 and 6.4.2, the same bytes as separate frames, are OK). RFC 6455 "
        "section 8.1 asks for the connection to be failed when invalid UTF-8 is found, not "
        "for validation below the frame; a frame is bounded by the message size limit.",
    ),
    Explanation(
        ("7.1.6",),
        "INFORMATIONAL",
        "a close right behind unanswered messages",
        "Case 7.1.6 sends a 256 KiB message, a short message, a close and a ping back to "
        "back. The transport answers the close as soon as it reads it (RFC 6455 section "
        "5.5.1), before the app has echoed the messages read just before it; after its close "
        "frame the server sends no more data, so those echoes are dropped. Either order is "
        "allowed, which is why Autobahn only records the outcome (INFORMATIONAL).",
    ),
    Explanation(
        ("7.13.",),
        "INFORMATIONAL",
        "close codes outside every range RFC 6455 defines",
        "Cases 7.13.1 and 7.13.2 close with codes 5000 and 65535. RFC 6455 section 7.4.2 "
        "defines 1000-4999 only, so the spec does not say what to do; Autobahn accepts "
        "1000, an echo of the code, or 1002. The transport answers 1002 (protocol error, "
        'reason "invalid close code"), as it does for the other codes an endpoint must '
        "not send (the 7.9.x cases, which are OK).",
    ),
    Explanation(
        ("7.3.6",),
        "FAILED BY CLIENT",
        "a malformed close frame: the client, not the server, closes TCP",
        "Case 7.3.6 sends a close frame with a 126-byte payload (control frames may carry "
        "125 at most). The transport answers with close 1002, which is what the case "
        "expects (the case's verdict is OK), but then waits for the client's close frame "
        "before it closes TCP. The client counts its own (malformed) close as its half of "
        "the closing handshake, sends nothing more and drops the connection itself after "
        "one second; Autobahn prefers the server to close TCP first (RFC 6455 section "
        "7.1.1). This is a preference, not a failure: the connection ends cleanly either "
        "way. A server that closes (or half-closes, as the websockets library does) TCP "
        "right after the close frame it sends when failing a connection (section 7.1.7) "
        "would get plain OK.",
    ),
)


#: What is behind another implementation's FAILED cases and log tracebacks, for the docs.
COMPARISON_NOTES: dict[tuple[str, str], str] = {
    ("websockets-sansio", "7.1.5"): (
        "The client sends the first fragment of a text message, a close, then the last "
        "fragment. A control frame may come between the fragments of a message (RFC 6455 "
        "section 5.4), so the close must be answered with 1000; the websockets library's "
        "sans-I/O protocol, which uvicorn's `websockets-sansio` runs on, raises "
        '"incomplete fragmented message" instead and answers 1002.'
    ),
    ("websockets-sansio", "traceback"): (
        "uvicorn's `websockets-sansio` decodes a text message only once it is complete, and "
        'logs invalid UTF-8 with `logger.exception` ("Invalid UTF-8 sequence received from '
        'client.") before it closes with 1007: one ERROR line and one traceback per '
        "invalid-UTF-8 case in group 6."
    ),
}


# -- case selection ---------------------------------------------------------------------------


def parse_cases(text: str) -> list[str]:
    """Autobahn case patterns for ``text``: ``*``/``all``, ``1-11``, ``9``, ``6.4.*``, ``7.1.5``."""
    patterns: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in ("*", "all"):
            patterns += [f"{group}.*" for group in GROUPS]
        elif re.fullmatch(r"\d+-\d+", item):
            low, high = (int(part) for part in item.split("-"))
            patterns += [f"{group}.*" for group in GROUPS if low <= group <= high]
        elif re.fullmatch(r"\d+", item):
            patterns.append(f"{item}.*")
        elif re.fullmatch(r"[\d.*]+", item):
            patterns.append(item)
        else:
            raise SystemExit(f"run.py: bad case pattern {item!r}")
    return patterns


def chunk_key(case_id: str) -> str:
    """The ``wstest`` run a case belongs to: its group, or its sub-group for 12.x and 13.x."""
    parts = case_id.split(".")
    if int(parts[0]) in SPLIT_GROUPS:
        return ".".join(parts[:2])
    return parts[0]


def case_sort_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


_RESOLVE = r"""
import json, sys
from autobahntestsuite.caseset import CaseSet
from autobahntestsuite.case import (Cases, CaseBasename, CaseCategories, CaseSetname,
                                    CaseSubCategories)
spec = json.loads(sys.argv[1])
case_set = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
sys.stdout.write("CASES " + json.dumps(case_set.parseSpecCases(spec)) + "\n")
"""


def wstest_python(wstest: Path) -> str:
    """The interpreter of a ``wstest`` console script (its shebang)."""
    with wstest.open("rb") as script:
        first = script.readline().decode(errors="replace").strip()
    if first.startswith("#!"):
        return shlex.split(first[2:])[0]
    return str(wstest.parent / "python")


def resolve_cases(wstest: Path, cases: list[str], exclude: list[str]) -> list[str]:
    """The case ids that ``wstest`` will run for these patterns (asked of Autobahn itself)."""
    spec = json.dumps({"cases": cases, "exclude-cases": exclude})
    proc = subprocess.run(
        [wstest_python(wstest), "-c", _RESOLVE, spec],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("CASES "):
            return sorted(json.loads(line[6:]), key=case_sort_key)
    raise SystemExit(f"run.py: could not list Autobahn's cases:\n{proc.stderr[-2000:]}")


# -- wstest -----------------------------------------------------------------------------------


def find_wstest(given: str | None = None) -> Path | None:
    """``wstest``: ``given``, ROOMCAST_WSTEST, the install script's venv, then PATH."""
    for candidate in (
        given,
        os.environ.get("ROOMCAST_WSTEST"),
        str(DEFAULT_VENV / "bin" / "wstest"),
        shutil.which("wstest"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def wstest_versions(wstest: Path) -> str:
    try:
        proc = subprocess.run(
            [str(wstest), "-a"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    python = subprocess.run(
        [wstest_python(wstest), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    return ", ".join([*reversed(lines), f"Python {python}"])


# -- the echo server --------------------------------------------------------------------------


class EchoServer:
    """``echo_app.py`` in a subprocess; its stderr (uvicorn's log) goes to ``log``."""

    def __init__(self, ws: str, log: Path, close_timeout: float) -> None:
        self.ws = ws
        self.log = log
        self.close_timeout = close_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.restarts = 0
        self.past_cpu = 0.0

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        src = str(ROOT / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        command = [sys.executable, str(ECHO_APP), "--ws", self.ws]
        command += ["--close-timeout", str(self.close_timeout)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(self.proc.stdout.fileno(), 256)
                    if not chunk:
                        break
                    line += chunk
        match = re.match(rb"PORT (\d+)", line)
        if not match:
            self.stop()
            raise SystemExit(
                f"run.py: the echo server ({self.ws}) did not start; its log:\n"
                + self.log.read_text(errors="replace")[-3000:]
            )
        self.port = int(match.group(1))
        time.sleep(0.3)  # uvicorn's startup, after the socket is bound and listening

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server used so far, all its runs added (Linux)."""
        total = self.past_cpu
        if self.proc is not None:
            try:
                fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                pass
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        """Restart a server that died (it is reported: it should never happen)."""
        if not self.alive():
            self.past_cpu = self.cpu_seconds()
            self.restarts += 1
            with self.log.open("a") as log:
                log.write(f"\n*** run.py: the echo server had exited; restart {self.restarts}\n")
            self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.past_cpu = self.cpu_seconds()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(SERVER_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None


# -- results ----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case_id: str
    behavior: str
    behavior_close: str = ""
    remote_close_code: int | None = None
    duration_ms: int = 0
    report: dict[str, Any] = field(default_factory=dict)  # the case's JSON report
    note: str = ""


@dataclass
class Run:
    """One implementation's results."""

    ws: str
    cases: dict[str, CaseResult] = field(default_factory=dict)
    seconds: float = 0.0
    chunk_seconds: dict[str, float] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)
    server_restarts: int = 0
    tracebacks: list[str] = field(default_factory=list)
    log_errors: int = 0
    server_cpu: float = 0.0
    wstest_cpu: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(case.behavior for case in self.cases.values())

    def failed(self) -> list[CaseResult]:
        return [case for case in self.sorted_cases() if case.behavior in BAD]

    def not_ok(self) -> list[CaseResult]:
        return [case for case in self.sorted_cases() if case.behavior != "OK"]

    def close_issues(self) -> list[CaseResult]:
        return [
            case
            for case in self.sorted_cases()
            if case.behavior not in BAD and case.behavior_close not in ("OK", "INFORMATIONAL", "")
        ]

    def sorted_cases(self) -> list[CaseResult]:
        return [self.cases[key] for key in sorted(self.cases, key=case_sort_key)]

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "ws": self.ws,
            "seconds": round(self.seconds, 1),
            "counts": {name: counts.get(name, 0) for name in (*BEHAVIOURS, MISSING)},
            "total": len(self.cases),
            "timed_out_chunks": self.timed_out,
            "server_restarts": self.server_restarts,
            "server_tracebacks": len(self.tracebacks),
            "server_cpu_seconds": round(self.server_cpu, 1),
            "wstest_cpu_seconds": round(self.wstest_cpu, 1),
            "not_ok": {
                case.case_id: {
                    "behavior": case.behavior,
                    "behaviorClose": case.behavior_close,
                    "remoteCloseCode": case.remote_close_code,
                    "result": case.report.get("result", case.note),
                    "resultClose": case.report.get("resultClose", ""),
                }
                for case in self.not_ok()
            },
            "close_issues": [case.case_id for case in self.close_issues()],
        }


def read_chunk(outdir: Path, agent: str, expected: list[str], run: Run) -> None:
    """Fold one chunk's index.json and case reports into ``run``."""
    index_file = outdir / "index.json"
    index = json.loads(index_file.read_text()).get(agent, {}) if index_file.exists() else {}
    for case_id in expected:
        entry = index.get(case_id)
        if entry is None:
            run.cases[case_id] = CaseResult(case_id, MISSING, note="no report: the case never ran")
            continue
        result = CaseResult(
            case_id,
            entry.get("behavior", "FAILED"),
            entry.get("behaviorClose", ""),
            entry.get("remoteCloseCode"),
            int(entry.get("duration") or 0),
        )
        report_file = outdir / entry.get("reportfile", "")
        if report_file.is_file():
            result.report = json.loads(report_file.read_text())
        run.cases[case_id] = result


def last_case_started(log: Path) -> str:
    found = re.findall(r"Running test case ID (\S+)", log.read_text(errors="replace"))
    return found[-1] if found else "?"


def scan_server_log(log: Path, run: Run) -> None:
    text = log.read_text(errors="replace") if log.exists() else ""
    # A traceback: its header, the indented frames, and the unindented exception line.
    pattern = r"(?m)^Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*.*"
    run.tracebacks = re.findall(pattern, text)
    run.log_errors = len(re.findall(r"(?m)^ERROR", text))


def run_suite(
    ws: str,
    wstest: Path,
    case_ids: list[str],
    workdir: Path,
    deadline: float,
    close_timeout: float,
) -> Run:
    """All of ``case_ids`` against ``ws``, chunk by chunk, until ``deadline``."""
    run = Run(ws)
    wsdir = workdir / ws
    wsdir.mkdir(parents=True, exist_ok=True)
    server = EchoServer(ws, wsdir / "server.log", close_timeout)
    chunks: dict[str, list[str]] = {}
    for case_id in case_ids:
        chunks.setdefault(chunk_key(case_id), []).append(case_id)
    started = time.monotonic()
    server.start()
    try:
        for key, ids in chunks.items():
            server.ensure()
            outdir = wsdir / f"reports-{key}"
            spec = {
                "outdir": str(outdir),
                "servers": [{"agent": "roomcast", "url": f"ws://127.0.0.1:{server.port}/"}],
                "cases": ids,
                "exclude-cases": [],
                "exclude-agent-cases": {},
            }
            spec_file = wsdir / f"spec-{key}.json"
            spec_file.write_text(json.dumps(spec, indent=2))
            log = wsdir / f"wstest-{key}.log"
            left = deadline - time.monotonic()
            chunk_start = time.monotonic()
            server_cpu = server.cpu_seconds()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            if left <= 1:
                run.timed_out.append(key)
                read_chunk(outdir, "roomcast", ids, run)
                for case_id in ids:
                    run.cases[case_id].note = "not run: --timeout was used up"
                continue
            with log.open("wb") as log_file:
                try:
                    subprocess.run(
                        [str(wstest), "-m", "fuzzingclient", "-s", str(spec_file)],
                        cwd=wsdir,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        timeout=left,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    run.timed_out.append(key)
            run.chunk_seconds[key] = time.monotonic() - chunk_start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            wstest_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
            server_cpu = server.cpu_seconds() - server_cpu
            run.wstest_cpu += wstest_cpu
            read_chunk(outdir, "roomcast", ids, run)
            if key in run.timed_out:
                hung = last_case_started(log)
                for case_id in ids:
                    if run.cases[case_id].behavior == MISSING:
                        run.cases[case_id].note = f"not run: --timeout hit during case {hung}"
            counts = Counter(run.cases[case_id].behavior for case_id in ids)
            say(
                f"  {ws:18} {key:>5} {len(ids):4} cases {run.chunk_seconds[key]:6.1f} s"
                f" (CPU: server {server_cpu:5.1f} s, wstest {wstest_cpu:5.1f} s)  "
                + "  ".join(f"{name} {n}" for name, n in sorted(counts.items()))
                + ("  (TIMEOUT)" if key in run.timed_out else "")
            )
    finally:
        server.stop()
        run.seconds = time.monotonic() - started
        run.server_restarts = server.restarts
        run.server_cpu = server.cpu_seconds()
        scan_server_log(server.log, run)
        meta = {
            "seconds": run.seconds,
            "chunk_seconds": run.chunk_seconds,
            "timed_out": run.timed_out,
            "server_restarts": run.server_restarts,
            "server_cpu": run.server_cpu,
            "wstest_cpu": run.wstest_cpu,
        }
        (wsdir / "run.json").write_text(json.dumps(meta, indent=2))
    return run


def load_suite(ws: str, case_ids: list[str], workdir: Path) -> Run:
    """A run made before with ``--outdir workdir``, read back (``--reuse``)."""
    run = Run(ws)
    wsdir = workdir / ws
    meta_file = wsdir / "run.json"
    if not meta_file.is_file():
        raise SystemExit(f"run.py: no earlier run of {ws} in {workdir} (no {meta_file})")
    meta = json.loads(meta_file.read_text())
    run.seconds = meta["seconds"]
    run.chunk_seconds = meta["chunk_seconds"]
    run.timed_out = meta["timed_out"]
    run.server_restarts = meta["server_restarts"]
    run.server_cpu = meta["server_cpu"]
    run.wstest_cpu = meta["wstest_cpu"]
    chunks: dict[str, list[str]] = {}
    for case_id in case_ids:
        chunks.setdefault(chunk_key(case_id), []).append(case_id)
    for key, ids in chunks.items():
        read_chunk(wsdir / f"reports-{key}", "roomcast", ids, run)
    scan_server_log(wsdir / "server.log", run)
    return run


# -- output -----------------------------------------------------------------------------------


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(part) for part in parts) + "\n")
    sys.stdout.flush()


def plain(text: str, limit: int = 0) -> str:
    """Autobahn's HTML-ish description as one line of plain text."""
    text = re.sub(r"<br\s*/?>", " ", text or "")
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    text = re.sub(r"\s+", " ", text).strip()
    if limit and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def wire_tail(report: dict[str, Any], entries: int = 8) -> list[str]:
    """The end of a case's wire log, one readable line per entry."""
    lines = []
    for entry in report.get("wirelog", [])[-entries:]:
        kind = entry[0]
        if kind in ("TF", "RF"):
            length, data = entry[1]
            opcode, fin, rsv = entry[2], entry[3], entry[4]
            who = "client sent frame" if kind == "TF" else "server sent frame"
            lines.append(
                f"{who} opcode={opcode} fin={fin} rsv={rsv} len={length} {str(data)[:60]!r}"
            )
        elif kind in ("TO", "RO"):
            length, data = entry[1]
            who = "client wrote" if kind == "TO" else "client read"
            lines.append(f"{who} {length} octets {str(data)[:48]}")
        else:
            lines.append(json.dumps(entry)[:100])
    return lines


def behaviour(case: CaseResult) -> str:
    """What the server did in a case, in a few words, from the case's report."""
    report = case.report
    if not report:
        return case.note
    parts = []
    received = report.get("received") or []
    messages = sum(1 for event in received if event[0] == "message")
    timeouts = [str(event[1]) for event in received if event[0] == "timeout"]
    if messages:
        parts.append(f"{messages} message(s) echoed")
    elif any(report.get("expected", {}).get(name) for name in ("OK", "NON-STRICT")):
        parts.append("nothing echoed")
    if timeouts:
        parts.append(f"still open after pause(s) {', '.join(timeouts)}")
    code = report.get("remoteCloseCode")
    if code is not None:
        reason = report.get("remoteCloseReason")
        who = "started the close" if not report.get("closedByMe") else "answered the close"
        parts.append(f"server {who} with {code}" + (f' "{reason}"' if reason else ""))
    else:
        parts.append("no close frame from the server")
    if report.get("droppedByMe"):
        parts.append("client dropped TCP")
    result = str(report.get("result", ""))
    if result and not result.startswith("Actual events match"):
        parts.append(f"Autobahn: {result}")
    if case.behavior_close not in ("OK", "INFORMATIONAL", ""):
        parts.append(f"close: {report.get('resultClose', '')}")
    return "; ".join(parts)


def describe_failure(case: CaseResult) -> list[str]:
    report = case.report
    if not report:
        return [f"{case.case_id} {case.behavior}: {case.note}"]
    lines = [
        f"{case.case_id} {case.behavior} (close: {case.behavior_close})",
        f"    case:     {plain(report.get('description', ''), 200)}",
        f"    expected: {plain(report.get('expectation', ''), 200)}",
        f"    result:   {report.get('result')}",
        f"    close:    {report.get('resultClose')} (server code {report.get('remoteCloseCode')}"
        f", client code {report.get('localCloseCode')}, clean={report.get('wasClean')}"
        f", closedByMe={report.get('closedByMe')}, droppedByMe={report.get('droppedByMe')}"
        f", reason={report.get('wasNotCleanReason')})",
        f"    expected events: {json.dumps(report.get('expected'))[:300]}",
        f"    received events: {json.dumps(report.get('received'))[:300]}",
        "    wire log end:",
    ]
    lines += [f"      {line}" for line in wire_tail(report)]
    return lines


def print_summary(run: Run) -> None:
    counts = run.counts()
    total = len(run.cases)
    say(f"\n== {run.ws}: {total} cases in {run.seconds:.1f} s")
    say("   " + "  ".join(f"{name} {counts.get(name, 0)}" for name in (*BEHAVIOURS, MISSING)))
    if run.timed_out:
        say(f"   chunks cut by --timeout: {', '.join(run.timed_out)}")
    if run.server_restarts:
        say(f"   the echo server died and was restarted {run.server_restarts} time(s)")
    say(f"   CPU: server {run.server_cpu:.1f} s, wstest {run.wstest_cpu:.1f} s")
    say(f"   server log: {len(run.tracebacks)} traceback(s), {run.log_errors} ERROR line(s)")
    for case in run.not_ok():
        if case.behavior not in BAD:
            result = case.report.get("result", "") if case.report else case.note
            say(f"   {case.behavior:13} {case.case_id:9} {result}")
    for case in run.close_issues():
        say(
            f"   close {case.behavior_close:11} {case.case_id:9} "
            f"{case.report.get('resultClose', '')} (code {case.remote_close_code})"
        )
    for case in run.failed():
        for line in describe_failure(case):
            say("   " + line)
    if run.tracebacks:
        say("   first traceback in the server log:")
        for line in run.tracebacks[0].rstrip().splitlines()[-12:]:
            say("     " + line)


def chunk_time(run: Run, *, compression: bool) -> float:
    """Seconds spent in the compression groups (12, 13), or in all the others."""
    return sum(
        seconds
        for key, seconds in run.chunk_seconds.items()
        if (int(key.split(".")[0]) in SPLIT_GROUPS) == compression
    )


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def explanation_for(case_id: str, verdict: str) -> Explanation | None:
    """The explanation for ``verdict`` on ``case_id`` with the longest matching prefix."""
    best: tuple[int, Explanation] | None = None
    for explanation in EXPLANATIONS:
        if explanation.verdict != verdict:
            continue
        for prefix in explanation.prefixes:
            if case_id.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), explanation)
    return None if best is None else best[1]


def write_docs(path: Path, runs: list[Run], case_spec: str, command: str, wstest: Path) -> None:
    subject = runs[0]
    names = [run.ws for run in runs]
    today = dt.date.today().isoformat()
    out: list[str] = [
        "# WebSocket conformance: Autobahn|Testsuite",
        "",
        "roomcast's own WebSocket transport (`roomcast.transport`, the protocol class uvicorn "
        "runs with `--ws roomcast`) is checked against the "
        "[Autobahn|Testsuite](https://github.com/crossbario/autobahn-testsuite) fuzzing "
        "client, the reference conformance suite for RFC 6455 (framing, pings, reserved "
        "bits, opcodes, fragmentation, UTF-8, closing handshake, limits) and RFC 7692 "
        "(permessage-deflate). "
        + (
            f"The same run against uvicorn's own `{'`, `'.join(names[1:])}` is shown beside it."
            if len(runs) > 1
            else ""
        ),
        "",
        "This file is written by `conformance/run.py --write-docs`; do not edit it by hand.",
        "",
        "## How it was run",
        "",
        "```sh",
        "bash conformance/install.sh          # once: wstest in a Python 2.7 virtualenv",
        command,
        "```",
        "",
        f"- Date: {today}; machine: {os.cpu_count()} cores, {platform.system()}, "
        f"Python {platform.python_version()}, uvicorn {version('uvicorn')}, "
        f"websockets {version('websockets')}.",
        f"- Client: `wstest -m fuzzingclient` ({wstest_versions(wstest)}), cases `{case_spec}`"
        f" ({len(subject.cases)} cases), one `wstest` run per case group (12.x and 13.x per "
        "sub-group). Groups 12 and 13 (1000 compressed messages per case) take most of the "
        "time, and most of that CPU time is the Python 2 client's, not the server's (see "
        "the CPU row below).",
        "- Server: `conformance/echo_app.py`, a raw ASGI app that echoes every message "
        "unchanged (text as text, binary as binary), served by uvicorn with "
        "`ws_max_size=64 MiB` (Autobahn's 9.x cases send up to 16 MiB), "
        "`ws_per_message_deflate=True`, keepalive pings off (a server ping inside a case is "
        "not what the case expects), close timeout 5 s.",
        "- Verdicts are Autobahn's `behavior` per case: OK, NON-STRICT (allowed, but not the "
        "strictest reading), INFORMATIONAL (the RFC leaves it open; recorded only), "
        "UNIMPLEMENTED (an optional feature is missing), FAILED. MISSING is run.py's own: the "
        "case produced no report (time limit or a dead server).",
        "",
        "## Totals",
        "",
        "| verdict | " + " | ".join(f"`{name}`" for name in names) + " |",
        "| --- | " + " | ".join("---:" for _ in runs) + " |",
    ]
    for name in (*BEHAVIOURS, MISSING):
        if name == MISSING and not any(run.counts().get(MISSING) for run in runs):
            continue
        cells = " | ".join(str(run.counts().get(name, 0)) for run in runs)
        out.append(f"| {name} | {cells} |")
    out += [
        "| **total** | " + " | ".join(f"**{len(run.cases)}**" for run in runs) + " |",
        "| wall time, all (s) | " + " | ".join(f"{run.seconds:.0f}" for run in runs) + " |",
        "| wall time, groups 1-10 (s) | "
        + " | ".join(f"{chunk_time(run, compression=False):.0f}" for run in runs)
        + " |",
        "| wall time, groups 12-13 (s) | "
        + " | ".join(f"{chunk_time(run, compression=True):.0f}" for run in runs)
        + " |",
        "| CPU: server / wstest (s) | "
        + " | ".join(f"{run.server_cpu:.0f} / {run.wstest_cpu:.0f}" for run in runs)
        + " |",
        "| tracebacks in the server log | "
        + " | ".join(str(len(run.tracebacks)) for run in runs)
        + " |",
        "",
    ]
    # Every case that is not plain OK for some implementation, side by side.
    ids = sorted(
        {case.case_id for run in runs for case in run.not_ok()}
        | {case.case_id for run in runs for case in run.close_issues()},
        key=case_sort_key,
    )
    out += ["## Cases that are not plain OK", ""]
    if not ids:
        out += ["None: every case is OK.", ""]
    else:
        out += [
            "One column per implementation: Autobahn's verdict, and its verdict on the closing "
            "handshake where that is not OK. *What the server did* is read off the case's "
            f"report for `{subject.ws}` (and for another implementation where its verdict "
            "differs).",
            "",
            "| case | what the case does | "
            + " | ".join(f"`{name}`" for name in names)
            + " | what the server did |",
            "| --- | --- | " + " | ".join("---" for _ in runs) + " | --- |",
        ]
        for case_id in ids:
            report = next((run.cases[case_id].report for run in runs if case_id in run.cases), {})
            row: list[str] = []
            did: list[str] = []
            for run in runs:
                case = run.cases.get(case_id)
                if case is None:
                    row.append("-")
                    continue
                cell = case.behavior
                if case.behavior_close not in ("OK", "INFORMATIONAL", ""):
                    cell += f" (close: {case.behavior_close})"
                row.append(cell)
                if run is subject or cell != row[0]:
                    prefix = "" if run is subject else f"`{run.ws}`: "
                    did.append(prefix + md_cell(behaviour(case)))
            out.append(
                f"| {case_id} | {md_cell(plain(report.get('description', ''), 140))} | "
                + " | ".join(row)
                + f" | {'<br>'.join(did)} |"
            )
        out.append("")
    # Explanations, one section per explained group of the subject's non-OK verdicts.
    explained: dict[Explanation, list[str]] = {}
    unexplained: list[str] = []
    verdicts = [(case, case.behavior) for case in subject.not_ok() if case.behavior not in BAD]
    verdicts += [(case, case.behavior_close) for case in subject.close_issues()]
    for case, verdict in verdicts:
        found = explanation_for(case.case_id, verdict)
        if found is None:
            result = case.report.get("result", "") if case.report else case.note
            unexplained.append(f"- {case.case_id} {verdict}: {result}")
        elif case.case_id not in explained.setdefault(found, []):
            explained[found].append(case.case_id)
    if explained or unexplained:
        out += [f"## Why these verdicts are right for `{subject.ws}`", ""]
        for explanation, case_ids in explained.items():
            cases = ", ".join(case_ids)
            out += [f"### {explanation.verdict}: {explanation.title} ({cases})", ""]
            out += [explanation.text, ""]
        if unexplained:
            out += ["### Not explained yet", "", *unexplained, ""]
    for run in runs:
        failed = run.failed()
        if run is not subject and not failed:
            continue
        out += [f"## FAILED for `{run.ws}`", ""]
        if not failed:
            out += ["None.", ""]
            continue
        out += ["```text"]
        for case in failed:
            out += describe_failure(case)
        out += ["```", ""]
        for case in failed:
            note = COMPARISON_NOTES.get((run.ws, case.case_id))
            if note:
                out += [f"{case.case_id}: {note}", ""]
    for run in runs[1:]:
        if run.tracebacks:
            out += [
                f"## `{run.ws}`: traceback in the server log",
                "",
                f"`{run.ws}` logged {len(run.tracebacks)} traceback(s) during the run. "
                + COMPARISON_NOTES.get((run.ws, "traceback"), "")
                + " The last lines of the first:",
                "",
                "```text",
                *run.tracebacks[0].rstrip().splitlines()[-8:],
                "```",
                "",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")
    say(f"\nwrote {path}")


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Autobahn|Testsuite's fuzzing client against an echo server on "
        "roomcast's transport (or uvicorn's own, for comparison)."
    )
    parser.add_argument(
        "--cases", default="*", help="'*' (default: 1-13), '1-11', '9', '6.4.*,7.1.5', ..."
    )
    parser.add_argument("--exclude", default="", help="case patterns to leave out, same syntax")
    parser.add_argument(
        "--ws",
        default="roomcast",
        help="implementation under test: roomcast (default) | websockets-sansio | websockets "
        "| wsproto; its FAILED cases set the exit status",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="WS",
        help="also run the same cases against this implementation (repeatable); "
        "shown beside --ws, never changes the exit status",
    )
    parser.add_argument("--wstest", help="path to wstest (default: $ROOMCAST_WSTEST, the venv)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds for everything, per implementation (default 1800)",
    )
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--outdir", type=Path, help="keep spec, logs and HTML reports here")
    parser.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="run nothing: read the results an earlier run left in --outdir DIR",
    )
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=DEFAULT_DOCS,
        type=Path,
        metavar="PATH",
        help=f"write the Markdown report (default {DEFAULT_DOCS.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)

    wstest = find_wstest(args.wstest)
    if wstest is None:
        say(f"run.py: wstest not found; {INSTALL_HINT}")
        return 2
    patterns = parse_cases(args.cases)
    exclude = parse_cases(args.exclude) if args.exclude else []
    case_ids = resolve_cases(wstest, patterns, exclude)
    if not case_ids:
        say(f"run.py: no Autobahn case matches --cases {args.cases!r}")
        return 2
    implementations = [args.ws, *[ws for ws in args.compare if ws != args.ws]]
    say(f"wstest: {wstest}; {len(case_ids)} cases; implementations: {', '.join(implementations)}")

    if args.reuse:
        runs = [load_suite(ws, case_ids, args.reuse) for ws in implementations]
    else:
        runs = run_all(implementations, wstest, case_ids, args)
    for run in runs:
        print_summary(run)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cases": args.cases, "wstest": str(wstest), "runs": [r.to_json() for r in runs]},
                indent=2,
            )
        )
    if args.write_docs:
        command = "python conformance/run.py" + "".join(f" {flag}" for flag in _doc_flags(args))
        write_docs(args.write_docs, runs, args.cases, command, wstest)
    subject = runs[0]
    bad = subject.failed()
    say(
        f"\n{subject.ws}: {len(bad)} case(s) FAILED or MISSING"
        + (f": {', '.join(case.case_id for case in bad)}" if bad else "")
    )
    return 1 if bad else 0


def run_all(
    implementations: list[str], wstest: Path, case_ids: list[str], args: argparse.Namespace
) -> list[Run]:
    workdir = args.outdir or Path(tempfile.mkdtemp(prefix="roomcast-autobahn-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    try:
        for ws in implementations:
            deadline = time.monotonic() + args.timeout
            runs.append(run_suite(ws, wstest, case_ids, workdir, deadline, args.close_timeout))
    finally:
        if args.outdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"\nreports, specs and logs: {workdir}")
    return runs


def _doc_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.cases != "*":
        flags.append(f"--cases {shlex.quote(args.cases)}")
    if args.exclude:
        flags.append(f"--exclude {shlex.quote(args.exclude)}")
    if args.ws != "roomcast":
        flags.append(f"--ws {args.ws}")
    flags += [f"--compare {ws}" for ws in args.compare]
    flags.append("--write-docs")
    return flags


if __name__ == "__main__":
    sys.exit(main())
