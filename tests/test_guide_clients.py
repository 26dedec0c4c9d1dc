"""The guide's five client scripts, run unchanged (as processes) against roomcast on port 8000:
an in-process server on each WebSocket implementation."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from helpers import HOST, TIMEOUT
from servers import AppServer, serve

GUIDE_PORT = 8000  # hard-coded in the guide's scripts
CLIENTS = Path(__file__).parent / "guide_clients"

EXPECTED = {
    "echo_client.py": ["Response received: Echo: Hello, FastAPI!"],
    "stream_client.py": [f"Streamed response: Streaming message {i}" for i in range(1, 11)]
    + ["Stream ended."],
    "text_client.py": ["Text endpoint response: Server received: Hello, text endpoint!"],
    "bytes_client.py": ["Bytes endpoint response: b'Server received: Hello, bytes endpoint!'"],
    "json_client.py": [
        'JSON endpoint response: {"message":"Server received your JSON",'
        '"data":{"greeting":"Hello, JSON endpoint!"}}'
    ],
}

# The scripts must stay byte-for-byte the guide's (a formatter run over tests/ would change them).
SHA256 = {
    "bytes_client.py": "411488eaeb9ee67bc6b224c28214aa0cb0e0f0a3e7dd79c1d02d39e247cd6ae9",
    "echo_client.py": "49fc3de6fdcc375058fc98a2c5e131bd4def6db7748584d27b05d0a5ffb05710",
    "json_client.py": "69b0ac48b6fd6acefc2428fe83fda778eedb0da5b0b42a44d10289aaf03f3a63",
    "stream_client.py": "465fdc0c5d29912fb8385f47f678095c4247331ac521268e03c6e959343fefa1",
    "text_client.py": "46458c3f91382714a39654d6219267920f057b957e43f7e555e6a496339732fd",
}

# The stream script runs for the guide's default ten messages one second apart.
SCRIPT_BUDGET = {"stream_client.py": 10 + 3 * TIMEOUT}


def _port_busy(port: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            return f"{HOST}:{port} is busy ({errno.errorcode.get(exc.errno or 0, exc)})"
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guide_server(ws_impl: str) -> AsyncIterator[AppServer]:
    busy = _port_busy(GUIDE_PORT)
    if busy:
        message = f"the guide's client scripts hard-code port {GUIDE_PORT}, but {busy}"
        if os.environ.get("CI"):
            pytest.fail(message + "; free the port for CI")
        pytest.skip(message)
    async with serve(ws_impl, port=GUIDE_PORT) as srv:
        yield srv


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_guide_client_is_verbatim(script: str) -> None:
    digest = hashlib.sha256((CLIENTS / script).read_bytes()).hexdigest()
    assert digest == SHA256[script], f"{script} differs from the guide's script"


# The server serves in the module's event loop (tests/servers.py), the script in a thread.
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("script", sorted(EXPECTED))
async def test_guide_client_script(guide_server: AppServer, script: str) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(CLIENTS / script)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_BUDGET.get(script, 3 * TIMEOUT),
        stdin=subprocess.DEVNULL,
        cwd=CLIENTS,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == EXPECTED[script], result.stderr
    assert result.stdout.endswith("\n")
