"""The guide's original servers (benchmarks/baseline/, verbatim) fail what roomcast passes.

Each test here runs the guide's own code under plain uvicorn and checks the weakness that a
roomcast test guards against, so that those roomcast tests are known to be able to fail:
test_bad_input.py expects 1003/1007/1009 without a traceback, test_chat_robustness.py expects
a room to keep going past a member that stopped reading.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import (
    HOST,
    TIMEOUT,
    free_port,
    kernel_send_buffer_max,
    raw_ws_handshake,
    recv,
    wait_until,
)

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline"


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


@contextmanager
def guide_server(tmp_path: Path, module: str) -> Iterator[tuple[int, Path]]:
    """``uvicorn {module}:app`` from the guide's code; yields its port and log file."""
    port = free_port()
    log_path = tmp_path / f"{module}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"{module}:app", "--host", HOST, "--port", str(port)],
            cwd=BASELINE,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is not None or _accepting(port), 4 * TIMEOUT, module)
        assert proc.poll() is None, log_path.read_text()
        yield port, log_path
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


async def _close_code(url: str, message: str | bytes) -> int | None:
    async with connect(url, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        await ws.send(message)
        try:
            while True:
                await recv(ws)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


async def test_guide_echo_answers_a_binary_frame_with_a_traceback(tmp_path: Path) -> None:
    with guide_server(tmp_path, "echo_server") as (port, log):
        code = await _close_code(f"ws://{HOST}:{port}/ws/echo", b"binary")
        assert code != 1003
        wait_until(lambda: "Traceback" in log.read_text(), what="the guide's traceback")


async def test_guide_json_answers_invalid_json_with_a_traceback(tmp_path: Path) -> None:
    with guide_server(tmp_path, "methods_json_server") as (port, log):
        code = await _close_code(f"ws://{HOST}:{port}/ws/methods_json", "{not json")
        assert code != 1007
        wait_until(lambda: "Traceback" in log.read_text(), what="the guide's traceback")


async def test_guide_echo_accepts_a_message_over_one_mib(tmp_path: Path) -> None:
    with guide_server(tmp_path, "echo_server") as (port, _):
        url = f"ws://{HOST}:{port}/ws/echo"
        async with connect(url, max_size=None, open_timeout=TIMEOUT) as ws:
            await ws.send("x" * (1024 * 1024 + 1))
            assert len(await recv(ws)) == len("Echo: ") + 1024 * 1024 + 1


async def test_guide_chat_stalls_behind_a_member_that_stopped_reading(tmp_path: Path) -> None:
    pad = 4096
    budget = (kernel_send_buffer_max() + (8 << 20)) // pad
    with guide_server(tmp_path, "chat_server") as (port, _):
        staller, _ = await asyncio.to_thread(raw_ws_handshake, port, "/ws/chat", 4096)
        with staller:
            url = f"ws://{HOST}:{port}/ws/chat"
            async with connect(url, max_queue=None) as sender, connect(url, max_queue=None) as ws:
                for sent in range(budget):
                    await sender.send(f"{sent:06d}".ljust(pad, "x"))
                    try:
                        async with asyncio.timeout(TIMEOUT):
                            while not (await ws.recv()).startswith(f"Client says: {sent:06d}"):
                                pass
                    except TimeoutError:
                        break
                else:
                    pytest.fail(f"the guide's room kept going for {budget} messages of {pad} B")
