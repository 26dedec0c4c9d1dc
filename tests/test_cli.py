"""The commands for people (docs/cli.md): connect, publish, presence, history, bench.

Every test runs ``python -m roomcast ...`` as a subprocess against a real server. ``connect`` is
driven through a pseudo-terminal (stdlib ``pty``) as a person would use it, and through pipes as
a script would.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as sync_connect

from helpers import GOOD_TOKEN, TIMEOUT, USER, RoomcastServer, terminate

KEY = "cli-test-key-7d41"
#: Upper bound for one CLI run (interpreter start-up included).
RUN_TIMEOUT = 6 * TIMEOUT
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without ROOMCAST_* settings, and a wide console for Rich's tables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roomcast", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=RUN_TIMEOUT,
    )


class Terminal:
    """``python -m roomcast ARGS`` with a pseudo-terminal as stdin, stdout and stderr."""

    def __init__(self, args: Sequence[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roomcast", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env(),
            start_new_session=True,
        )
        os.close(slave)
        self.output = ""

    def _read(self, until: float) -> bool:
        """Read what is there (waiting until ``until`` at most); False at end of output."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        if not chunk:
            return False
        self.output += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r\n", "\n")
        return True

    def expect(self, text: str, within: float = TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while text not in self.output:
            if time.monotonic() >= deadline or not self._read(deadline):
                raise AssertionError(f"{text!r} not seen within {within:.1f}s in:\n{self.output}")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, within: float = 2 * TIMEOUT) -> int:
        """Collect the rest of the output and return the exit code."""
        deadline = time.monotonic() + within
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.1))
        while self._read(time.monotonic() + 0.05):
            if time.monotonic() >= deadline:
                break
        try:
            return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {within:.1f}s:\n{self.output}") from None

    def close(self) -> None:
        terminate(self.proc, TIMEOUT)
        with contextlib.suppress(OSError):
            os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Any]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(args)
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()


@pytest.fixture(scope="module")
def server(process_server: RoomcastServer) -> RoomcastServer:
    """A ``roomcast serve`` process with default settings (the CLI is tested end to end)."""
    return process_server


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    """A server with the HTTP API on (the conftest ``server`` has it off)."""
    srv = RoomcastServer(tmp_path_factory.mktemp("api"), env={"ROOMCAST_API_KEY": KEY})
    with srv:
        yield srv
    srv.assert_no_traceback()


# -- connect ---------------------------------------------------------------------------------


def test_connect_in_a_terminal_echo_then_ctrl_d(server: RoomcastServer, terminal: Any) -> None:
    term = terminal("connect", server.url("/ws/echo"))
    term.expect("Ctrl-D to close")
    term.type(b"hello from a terminal\n")
    term.expect("< Echo: hello from a terminal")
    term.type(b"second line\n")
    term.expect("< Echo: second line")
    term.type(b"\x04")  # Ctrl-D at the start of a line: end of input
    assert term.wait() == 0, term.output
    assert "closed: 1000" in term.output


def test_connect_json_in_a_terminal(server: RoomcastServer, terminal: Any) -> None:
    term = terminal("connect", "--json", server.url("/ws/methods_json"))
    term.expect("Ctrl-D to close")
    term.type(b"this is not json\n")
    term.expect("not JSON, not sent")
    term.type(b'{"numbers": [1, 2],   "ok": true}\n')
    # Pretty-printed, one key per line.
    term.expect('"message": "Server received your JSON"')
    term.expect('"numbers": [')
    term.type(b"\x04")
    assert term.wait() == 0, term.output
    # The server never saw the invalid line (it would have closed with 1007).
    assert "1007" not in term.output


def test_connect_from_a_pipe(server: RoomcastServer) -> None:
    done = run_cli("connect", server.url("/ws/echo"), stdin="one\n\ntwo\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # The echo of what was sent and what arrives may interleave; each in its own order.
    assert [line for line in lines if line.startswith(">")] == ["> one", "> two"]
    assert [line for line in lines if line.startswith("<")] == ["< Echo: one", "< Echo: two"]
    assert "closed: 1000" in done.stderr


def test_connect_json_from_a_pipe_sends_compact(server: RoomcastServer) -> None:
    done = run_cli("connect", "--json", server.url("/ws/methods_json"), stdin='{ "a" : 1 }\n')
    assert done.returncode == 0, done.stderr
    assert '> {"a":1}' in done.stdout
    reply = done.stdout.split("< ", 1)[1]
    assert json.loads(reply) == {"message": "Server received your JSON", "data": {"a": 1}}


def test_connect_refused_handshake(server: RoomcastServer) -> None:
    done = run_cli("connect", server.url("/ws/secure"))
    assert done.returncode == 1
    assert "handshake refused: HTTP 403" in done.stderr


def test_connect_with_token(server: RoomcastServer) -> None:
    done = run_cli("connect", "--token", GOOD_TOKEN, server.url("/ws/secure"), stdin="hi\n")
    assert done.returncode == 0, done.stderr
    assert f"< Hello, {USER}! Welcome to the secure WebSocket." in done.stdout
    assert "< You said: hi" in done.stdout


def test_connect_shows_an_abnormal_close(server: RoomcastServer) -> None:
    done = run_cli("connect", "--binary", server.url("/ws/echo"), stdin="bytes\n")
    assert done.returncode == 3
    assert "closed by the server: 1003" in done.stderr


# -- the HTTP API ----------------------------------------------------------------------------


def test_publish_and_history(api_server: RoomcastServer) -> None:
    url = ("--url", api_server.http_url)
    done = run_cli("publish", "cli:history", '{"text": "hi"}', *url, "--api-key", KEY)
    assert done.returncode == 0, done.stderr
    assert "published to cli:history: offset 1" in done.stdout
    # Not JSON: sent as a JSON string. The key comes from the environment this time.
    env = cli_env({"ROOMCAST_API_KEY": KEY})
    done = run_cli("publish", "cli:history", "plain words", *url, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["offset"] == 2

    done = run_cli("history", "cli:history", *url, "--json", env=env)
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    assert [p["data"] for p in page["publications"]] == [{"text": "hi"}, "plain words"]
    done = run_cli("history", "cli:history", *url, "--since", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert "history of cli:history" in done.stdout
    assert '"plain words"' in done.stdout
    assert '{"text":"hi"}' not in done.stdout
    done = run_cli("history", "cli:history", *url, "--before", "2", "--limit", "1", env=env)
    assert '{"text":"hi"}' in done.stdout
    assert '"plain words"' not in done.stdout


def test_presence(api_server: RoomcastServer) -> None:
    url = ("--url", api_server.http_url, "--api-key", KEY)
    done = run_cli("presence", "cli:presence", *url)
    assert done.returncode == 0, done.stderr
    assert "nobody is subscribed to cli:presence" in done.stdout
    with sync_connect(api_server.url("/ws"), open_timeout=TIMEOUT) as ws:
        client = json.loads(ws.recv(timeout=TIMEOUT))["client"]
        ws.send(json.dumps({"id": 1, "op": "subscribe", "channel": "cli:presence"}))
        assert json.loads(ws.recv(timeout=TIMEOUT))["ok"] is True
        done = run_cli("presence", "cli:presence", *url)
        assert done.returncode == 0, done.stderr
        assert "presence on cli:presence: 1 client(s)" in done.stdout
        assert client in done.stdout
        assert "(anonymous)" in done.stdout
        done = run_cli("presence", "cli:presence", *url, "--json")
        assert [c["client"] for c in json.loads(done.stdout)["clients"]] == [client]


def test_api_errors(api_server: RoomcastServer, server: RoomcastServer) -> None:
    url = ("--url", api_server.http_url)
    done = run_cli("presence", "c", *url)
    assert done.returncode == 1
    assert "HTTP 401: an API key is required" in done.stderr
    done = run_cli("publish", "c", "1", *url, "--api-key", "wrong")
    assert done.returncode == 1
    assert "HTTP 401: an API key was refused" in done.stderr
    done = run_cli("publish", "no spaces", "1", *url, "--api-key", KEY)
    assert done.returncode == 1
    assert "HTTP 422" in done.stderr
    assert "channel names are" in done.stderr
    done = run_cli("history", "c", *url, "--api-key", KEY, "--since", "1", "--before", "2")
    assert done.returncode == 2
    # The conftest server has no ROOMCAST_API_KEY: the API is off.
    done = run_cli("history", "c", "--url", server.http_url, "--api-key", KEY)
    assert done.returncode == 1
    assert "HTTP 404: the HTTP API is off" in done.stderr
    done = run_cli("presence", "c", "--url", "http://127.0.0.1:1", "--api-key", KEY)
    assert done.returncode == 1
    assert "cannot reach http://127.0.0.1:1" in done.stderr


# -- bench -----------------------------------------------------------------------------------


def row(table: str, label: str) -> str:
    """The value of ``label``'s row in a results table."""
    match = re.search(rf"^\W*{re.escape(label)}\s*\W\s*(.+?)\s*\W*$", table, re.MULTILINE)
    assert match, f"no row {label!r} in:\n{table}"
    return match.group(1)


def test_bench_echo(api_server: RoomcastServer) -> None:
    done = run_cli(
        "bench", "echo", api_server.url("/ws/echo"), "--connections", "4", "--duration", "0.5"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "roomcast bench echo" in done.stdout
    assert int(row(done.stdout, "deliveries").replace(",", "")) > 0
    assert float(row(done.stdout, "deliveries/s").replace(",", "")) > 0
    assert row(done.stdout, "lost") == "0"
    assert row(done.stdout, "closed early") == "none"


def test_bench_fanout(api_server: RoomcastServer, tmp_path: Path) -> None:
    png = tmp_path / "latency.png"
    done = run_cli(
        "bench", "fanout", api_server.ws_url,  # no path: /ws is the default
        "--subscribers", "20", "--messages", "25", "--histogram", str(png),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "roomcast bench fanout" in done.stdout
    assert row(done.stdout, "deliveries") == "500"
    assert float(row(done.stdout, "deliveries/s").replace(",", "")) > 0
    assert row(done.stdout, "lost") == "0"
    assert row(done.stdout, "duplicates") == "0"
    assert row(done.stdout, "out of order") == "0"
    assert row(done.stdout, "latency p99").endswith(" ms")
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in done.stderr
        assert not png.exists()
    else:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_fanout_json_and_refused(api_server: RoomcastServer) -> None:
    done = run_cli(
        "bench", "fanout", api_server.url("/ws"), "--subscribers", "3", "--messages", "5",
        "--channel", "bench:cli", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] is True
    assert (summary["deliveries"], summary["lost"], summary["channel"]) == (15, 0, "bench:cli")
    # /ws/secure refuses the handshake without a token: a clear error, no table.
    done = run_cli("bench", "echo", api_server.url("/ws/secure"), "--connections", "2")
    assert done.returncode == 1
    assert "handshake refused: HTTP 403" in done.stderr
