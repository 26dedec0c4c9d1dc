"""The server process: CLI, workers, tokens, redaction, shutdown, liveness, startup log.

Each of these runs ``roomcast serve`` (or another ASGI server) as a process. Where the WebSocket
implementation does the work (the handshake's log line, the close on a signal, the pings) a test
runs on both of them, as the in-process endpoint tests do.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import (
    GOOD_TOKEN,
    HOST,
    TIMEOUT,
    RawFrameReader,
    RoomcastServer,
    ServerFactory,
    async_wait_until,
    base_env,
    free_port,
    raw_ws_handshake,
    recv,
    ws_connect,
)
from servers import TRANSPORTS

SERVE = [sys.executable, "-m", "roomcast", "serve"]


def run_cli(
    args: list[str], env: dict[str, str], within: float = 3 * TIMEOUT
) -> tuple[int, str, str]:
    """Run the CLI to completion (bounded); on overrun kill its whole session and fail."""
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=within)
        pytest.fail(f"{args} still running after {within:.0f}s:\n{out}\n{err}")
    return proc.returncode, out, err


# -- a) several workers need a shared broker ---------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_workers_without_shared_broker_refused(how: str) -> None:
    port = free_port()
    args = [*SERVE, "--host", HOST, "--port", str(port)]
    env = base_env()
    if how == "flag":
        args += ["--workers", "2"]
    else:
        env["ROOMCAST_WORKERS"] = "2"
    started = time.monotonic()
    code, out, err = run_cli(args, env)
    assert code != 0, (out, err)
    assert time.monotonic() - started < 3 * TIMEOUT
    assert "Traceback" not in err, err
    # Why: rooms would be split across processes; what to do: configure a shared broker.
    assert re.search(r"process|worker", err, re.IGNORECASE), err
    assert "room" in err.lower(), err
    assert "ROOMCAST_BROKER_URL" in err or "--broker" in err, err
    # Nothing is listening.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{HOST}:{port}/health", timeout=TIMEOUT)


# -- b) a generated token when none is configured ----------------------------------------------


async def test_generated_token(server_factory: ServerFactory) -> None:
    server = server_factory(env={"ROOMCAST_TOKENS": None})
    token_lines = [line for line in server.log().splitlines() if "token" in line.lower()]
    assert len(token_lines) == 1, token_lines
    token = token_lines[0].split()[-1]
    assert len(token) >= 16, token_lines
    assert token != GOOD_TOKEN

    quoted = urllib.parse.quote(token, safe="")
    async with ws_connect(server, f"/ws/secure?token={quoted}") as ws:
        greeting = await recv(ws)
        assert isinstance(greeting, str)
        assert re.fullmatch(r"Hello, .+! Welcome to the secure WebSocket\.", greeting), greeting
        await ws.send("hi")
        assert await recv(ws) == "You said: hi"
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, f"/ws/secure?token={GOOD_TOKEN}"):
            pass
    assert info.value.response.status_code == 403
    assert server.log().count(token) == 1


# -- c) tokens never reach the log -------------------------------------------------------------


on_both_transports = pytest.mark.parametrize("ws", list(TRANSPORTS.values()), ids=list(TRANSPORTS))


@on_both_transports
async def test_token_redacted_from_logs(server_factory: ServerFactory, ws: str) -> None:
    server = server_factory(
        env={"ROOMCAST_ACCESS_LOG": "true", "ROOMCAST_LOG_LEVEL": "info", "ROOMCAST_WS": ws}
    )
    bad = "wrong-token-4711"
    async with ws_connect(server, f"/ws/secure?token={GOOD_TOKEN}") as ws:
        assert (await recv(ws)).startswith("Hello, ")
    with pytest.raises(InvalidStatus):
        async with ws_connect(server, f"/ws/secure?token={bad}"):
            pass
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        resp = await client.get(f"{server.http_url}/health?token={GOOD_TOKEN}&x=1")
        assert resp.status_code == 200
        resp = await client.get(f"{server.http_url}/health?a=b&token={GOOD_TOKEN}")
        assert resp.status_code == 200

    # The three request lines (two handshakes, two GETs) are logged, redacted.
    def logged() -> bool:
        text = server.log()
        return text.count("token=[redacted]") >= 4 and text.count("/health") >= 2

    try:
        await async_wait_until(logged, what="redacted request lines")
    except AssertionError:
        pytest.fail(f"redacted request lines missing from the log:\n{server.log()}")
    await server.await_stats(lambda s: s["connections"] == 0, what="all closed")
    text = server.log()
    assert GOOD_TOKEN not in text, text
    assert bad not in text, text
    assert "/ws/secure" in text


# -- d) graceful shutdown ----------------------------------------------------------------------

DRAIN = 2.0


@on_both_transports
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_graceful_shutdown(
    server_factory: ServerFactory, sig: signal.Signals, ws: str
) -> None:
    server = server_factory(env={"ROOMCAST_DRAIN_TIMEOUT": str(DRAIN), "ROOMCAST_WS": ws})
    async with (
        ws_connect(server, "/ws/echo") as echo,
        ws_connect(server, "/ws/chat") as member,
        ws_connect(server, "/ws/stream?count=1000&interval=1") as stream,
    ):
        await echo.send("before")
        assert await recv(echo) == "Echo: before"
        await member.send("before")
        assert await recv(member) == "Client says: before"
        assert await recv(stream) == "Streaming message 1"
        await server.await_stats(lambda s: s["connections"] == 3, what="three clients")

        async def close_code(ws: ClientConnection) -> int | None:
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd is not None else None

        server.send_signal(sig)
        started = time.monotonic()
        async with asyncio.timeout(DRAIN + TIMEOUT):
            codes = await asyncio.gather(*(close_code(ws) for ws in (echo, member, stream)))
        # 1012 (service restart), as docs/endpoints.md and the README promise: a client
        # reconnects; 1001 (going away) would tell a browser the page is leaving.
        assert codes == [1012, 1012, 1012], codes
        assert time.monotonic() - started < DRAIN + TIMEOUT
    returncode = await asyncio.to_thread(server.wait, DRAIN + 2 * TIMEOUT)
    assert returncode == 0, server.log()
    assert "Traceback" not in server.log()


async def test_shutdown_when_idle_is_quick(server_factory: ServerFactory) -> None:
    server = server_factory(env={"ROOMCAST_DRAIN_TIMEOUT": "30"})
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.wait, 2 * TIMEOUT) == 0, server.log()
    # With no connections nothing has to drain: no waiting for the 30 s timeout.
    assert time.monotonic() - started < 2 * TIMEOUT


# -- e) liveness -------------------------------------------------------------------------------

PING = 0.5


@on_both_transports
async def test_peer_that_never_pongs_is_dropped(server_factory: ServerFactory, ws: str) -> None:
    server = server_factory(
        env={
            "ROOMCAST_PING_INTERVAL": str(PING),
            "ROOMCAST_PING_TIMEOUT": str(PING),
            "ROOMCAST_WS": ws,
        }
    )
    async with ws_connect(server, "/ws/echo") as healthy:
        sock, initial = await asyncio.to_thread(raw_ws_handshake, server.port, "/ws/echo")
        with sock:
            await server.await_stats(lambda s: s["connections"] == 2, what="both connected")
            # The silent peer is cut after about one interval plus one timeout.
            await server.await_stats(
                lambda s: s["connections"] == 1, within=4 * PING + TIMEOUT, what="silent peer cut"
            )
            frames, code, _ = await asyncio.to_thread(
                RawFrameReader(sock, initial).frames_until_close, TIMEOUT
            )
            assert code == 1011
            assert frames, "the server should have pinged first"
            assert {op for op, _ in frames} == {9}, frames
        # The websockets client answers pings on its own and stays through several intervals.
        for i in range(6):
            await asyncio.sleep(PING)
            await healthy.send(f"still {i}")
            assert await recv(healthy) == f"Echo: still {i}"
        await asyncio.sleep(3 * PING)  # idle: only pings and pongs on the wire
        await healthy.send("idle ok")
        assert await recv(healthy) == "Echo: idle ok"
        assert (await server.astats())["connections"] == 1


# -- f) the command line and uvicorn directly --------------------------------------------------

OPTIONS = [
    "--host",
    "--port",
    "--workers",
    "--broker",
    "--max-message-size",
    "--outbox-size",
    "--ping-interval",
    "--ping-timeout",
    "--drain-timeout",
    "--log-level",
    "--access-log",
]


def test_serve_help_mentions_every_option() -> None:
    env = base_env({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    code, out, err = run_cli([*SERVE, "--help"], env)
    assert code == 0, err
    for option in OPTIONS:
        assert option in out, (option, out)
    import typer.main

    from roomcast.cli import cli

    command = typer.main.get_command(cli)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    assert serve.params
    for param in serve.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert opt in out, (opt, out)


PLAIN_SERVERS = {
    # Plain ASGI servers: the hub's fallback (no roomcast.frames extension) must serve rooms.
    "uvicorn": ["-m", "uvicorn", "roomcast.app:app", "--host", HOST, "--port"],
    "hypercorn": ["-m", "hypercorn", "roomcast.app:app", "--bind"],
}


@pytest.mark.parametrize("name", sorted(PLAIN_SERVERS))
async def test_plain_asgi_servers_serve_the_app(server_factory: ServerFactory, name: str) -> None:
    if importlib.util.find_spec(name) is None:
        # Both are test dependencies (pyproject's [test] extra): CI must have them.
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {name} (pip install '.[test]')", pytrace=False)
        pytest.skip(f"{name} is not installed")
    port = free_port()
    where = str(port) if name == "uvicorn" else f"{HOST}:{port}"
    server = server_factory(argv=[sys.executable, *PLAIN_SERVERS[name], where], port=port)
    async with ws_connect(server, "/ws/echo") as ws:
        await ws.send(f"via {name}")
        assert await recv(ws) == f"Echo: via {name}"
    async with ws_connect(server, "/ws/chat") as a, ws_connect(server, "/ws/chat") as b:
        await server.await_stats(lambda s: s["chat_members"] == 2, what="both joined")
        for i in range(20):
            await a.send(f"m{i}")
        for member in (a, b):
            assert [await recv(member) for _ in range(20)] == [
                f"Client says: m{i}" for i in range(20)
            ]
        await b.close()
        assert await recv(a) == "A client left the chat"


# -- g) the startup log says where to connect --------------------------------------------------


def test_startup_log_says_where(process_server: RoomcastServer) -> None:
    assert f"ws://{HOST}:{process_server.port}" in process_server.log()
