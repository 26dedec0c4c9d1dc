"""Autobahn|Testsuite against roomcast's own WebSocket transport: no case may FAIL.

Runs ``conformance/run.py --cases 1-11`` (every case group but compression, 12 and 13, which
take minutes; run those with ``python conformance/run.py``). It needs Autobahn's ``wstest``
(Python 2.7), which ``bash conformance/install.sh`` installs; found through ROOMCAST_WSTEST or
the install script's virtualenv (ROOMCAST_AUTOBAHN_VENV, default /opt/autobahn-venv). Without
it the test skips, except under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "conformance" / "run.py"
#: Cases 1-11 take about 25 s on 2 cores; the rest of the budget is slack for a busy machine.
RUN_TIMEOUT = 240

pytestmark = pytest.mark.slow


def find_wstest() -> Path | None:
    venv = Path(os.environ.get("ROOMCAST_AUTOBAHN_VENV") or "/opt/autobahn-venv")
    for candidate in (os.environ.get("ROOMCAST_WSTEST"), str(venv / "bin" / "wstest")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def require_wstest() -> Path:
    """wstest, or skip (fail under CI, which installs it with conformance/install.sh)."""
    found = find_wstest()
    if found is None:
        reason = (
            "Autobahn's wstest is not installed: run `bash conformance/install.sh` "
            "(or point ROOMCAST_WSTEST at a wstest binary)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI needs it: {reason}", pytrace=False)
        pytest.skip(reason)
    return found


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_autobahn_cases_1_to_11_do_not_fail(tmp_path: Path) -> None:
    wstest = require_wstest()
    summary_file = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--cases",
            "1-11",
            "--wstest",
            str(wstest),
            "--timeout",
            str(RUN_TIMEOUT),
            "--outdir",
            str(tmp_path / "reports"),
            "--json",
            str(summary_file),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT + 30,
        check=False,
        cwd=ROOT,
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert summary_file.exists(), f"run.py wrote no summary (exit {proc.returncode}):\n{output}"
    run = json.loads(summary_file.read_text())["runs"][0]
    assert run["ws"] == "roomcast"
    counts = run["counts"]
    # Every case of groups 1-10 ran (9.x included: messages of up to 16 MiB).
    assert run["total"] == 301, output  # autobahntestsuite 0.8.2, groups 1-10
    assert counts["MISSING"] == 0, output
    assert counts["FAILED"] == 0, output
    assert counts["UNIMPLEMENTED"] == 0, output
    # Broken input is refused with a close code and one log line, never a traceback.
    assert run["server_tracebacks"] == 0, output
    assert run["server_restarts"] == 0, output
    assert proc.returncode == 0, output
