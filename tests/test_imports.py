"""Starting the server loads none of the tooling: ``roomcast.tools``, httpx, Rich, matplotlib.

``roomcast serve``, ``uvicorn roomcast.app:app`` and ``create_app`` must not pay for
``roomcast connect`` or ``roomcast bench``, in start-up time and in the memory of every worker:
:mod:`roomcast.cli` declares those commands and imports :mod:`roomcast.tools` inside them. Only
a fresh process shows what an entry point imports, so every check starts one: ``python -c``
for the import paths, and a real ``roomcast serve`` under ``python -X importtime``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from websockets.sync.client import connect as sync_connect

from helpers import HOST, TIMEOUT, RoomcastServer, base_env, free_port

#: What the server must not import: these packages and every module below them. picows and
#: psutil are the benchmarks' (the ``bench`` extra), matplotlib ``roomcast bench --histogram``'s.
TOOLING = ("roomcast.tools", "httpx", "rich", "matplotlib", "picows", "psutil")
#: Upper bound for one interpreter run.
RUN_TIMEOUT = 6 * TIMEOUT

#: The ways to start the server without running it: Python code for ``python -c``.
ENTRY_POINTS = {
    # uvicorn/hypercorn roomcast.app:app, and every worker of roomcast serve --workers N.
    "roomcast.app:app": "import roomcast.app",
    "create_app": "from roomcast import Settings, create_app\ncreate_app(Settings())",
    # roomcast serve: the command line with every command declared, before serve runs.
    "the roomcast command": "import typer.main\nfrom roomcast.cli import cli\n"
    "typer.main.get_command(cli)",
}


def tooling_among(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that are tooling (see :data:`TOOLING`)."""
    return sorted(
        name
        for name in modules
        if any(name == top or name.startswith(f"{top}.") for top in TOOLING)
    )


def modules_after(code: str) -> list[str]:
    """Every module a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=base_env(),
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return modules


def test_a_tool_command_shows_up() -> None:
    """What the checks below look for is what a command of the tools imports."""
    loaded = tooling_among(modules_after("import roomcast.tools.api, roomcast.tools.bench"))
    assert {"roomcast.tools.api", "roomcast.tools.bench", "httpx", "rich"} <= set(loaded)


@pytest.mark.parametrize("code", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_entry_point_imports_no_tooling(code: str) -> None:
    modules = modules_after(code)
    assert "roomcast.factory" in modules
    assert tooling_among(modules) == []


def test_roomcast_serve_imports_no_tooling(tmp_path: Path) -> None:
    """A real ``python -m roomcast serve``, up and serving /ws, has imported no tooling."""
    port = free_port()
    argv = [sys.executable, "-X", "importtime", "-m", "roomcast", "serve"]
    argv += ["--host", HOST, "--port", str(port)]
    srv = RoomcastServer(tmp_path, port=port, argv=argv)
    with srv, sync_connect(srv.url("/ws"), open_timeout=TIMEOUT) as ws:
        # The connected push: the /ws path has run too (what it imports lazily is loaded).
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "connected"
    # -X importtime: "import time: <self us> | <cumulative us> | <indented module name>".
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in srv.log().splitlines()
        if line.startswith("import time:") and "imported package" not in line
    ]
    assert {"roomcast.cli", "roomcast.factory", "uvicorn"} <= set(imported)
    assert tooling_among(imported) == []
