"""Operating roomcast: liveness and readiness endpoints, and JSON log lines.

(``/readyz`` turning 503 within 5 s of Redis going away and 200 again after it returns is in
``test_chaos.py``; metrics in ``test_metrics.py``.)
"""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from helpers import (
    GOOD_TOKEN,
    TIMEOUT,
    async_wait_until,
    recv,
    ws_connect,
)
from servers import AppServer, ServerStarter

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "ops-test-api-key-0123456789"


async def test_healthz_and_readyz(server: AppServer) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
        for path in ("/healthz", "/health"):
            reply = await http.get(path)
            assert (reply.status_code, reply.json()) == (200, {"status": "ok"})
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["broker"] == "ok"


async def test_json_logs_name_the_connection_and_never_a_secret(
    start_server: ServerStarter,
) -> None:
    server = await start_server(log_format="json", api_key=API_KEY, access_log=True)
    offset = server.log_offset()
    async with ws_connect(server, f"/ws/secure?token={GOOD_TOKEN}") as ws:
        await recv(ws)
    async with ws_connect(server, "/ws/methods_bytes") as ws:
        await ws.send("text where bytes are expected")  # closed 1003, logged with its conn id
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1003, (ws.close_code, ws.close_reason)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
        reply = await http.get("/api/channels", headers={"Authorization": f"Bearer {API_KEY}"})
        assert reply.status_code == 200
    await async_wait_until(
        lambda: "closed 1003" in server.log_since(offset), TIMEOUT, "the 1003 close logged"
    )
    text = server.log_since(offset)
    assert GOOD_TOKEN not in text
    assert API_KEY not in text
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert entries, "no log lines"
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= entry.keys(), entry
    closed = [e for e in entries if "closed 1003" in e["message"]]
    assert closed, entries
    assert all(e.get("conn") for e in closed)
