"""deploy/nginx.conf, exercised: three roomcast nodes on one Redis behind nginx.

The config is the documented one (docs/scaling.md) with free ports substituted for its example
ports; clients connect through nginx only, so whichever node each lands on, they must meet.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from helpers import HOST, TIMEOUT, RoomcastServer, ServerFactory, free_port, wait_until
from redis_server import RedisServer, redis_server_fixture  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.fixture
def nginx_binary() -> str:
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx not found: CI must install it (.ci/run)")
        pytest.skip("nginx not found on PATH: install nginx to test deploy/nginx.conf")
    return NGINX


def render(config: str, listen: int, nodes: list[int]) -> str:
    """The documented config with its example ports replaced."""
    config = config.replace("127.0.0.1:8080", f"{HOST}:{listen}")
    for example, port in zip((8001, 8002, 8003), nodes, strict=True):
        config = config.replace(f"127.0.0.1:{example} ", f"{HOST}:{port} ")
    for example in ("127.0.0.1:8001 ", "127.0.0.1:8002 ", "127.0.0.1:8003 ", "127.0.0.1:8080;"):
        assert example not in config, f"{example!r}: the example ports changed in the config"
    return config


@pytest.fixture
def nginx(
    nginx_binary: str, redis_server: RedisServer, server_factory: ServerFactory, tmp_path: Path
) -> Iterator[tuple[int, list[RoomcastServer]]]:
    env = {"ROOMCAST_BROKER_URL": redis_server.url, "ROOMCAST_API_KEY": "k"}
    nodes = [server_factory(env=env) for _ in range(3)]
    listen = free_port()
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(CONFIG.read_text(), listen, [n.port for n in nodes]))
    log = open(prefix / "nginx.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [nginx_binary, "-p", str(prefix), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((prefix / "nginx.log").read_text())
            try:
                return (
                    httpx.get(f"http://{HOST}:{listen}/readyz", timeout=TIMEOUT).status_code == 200
                )
            except httpx.HTTPError:
                return False

        wait_until(ready, what="nginx to proxy /readyz")
        yield listen, nodes
    finally:
        proc.terminate()
        proc.wait(timeout=3 * TIMEOUT)
        log.close()


async def test_clients_behind_nginx_meet_whatever_node_they_reach(
    nginx: tuple[int, list[RoomcastServer]],
) -> None:
    listen, nodes = nginx
    url = f"ws://{HOST}:{listen}"
    clients = [await connect(f"{url}/ws") for _ in range(6)]
    try:
        ids = []
        for ws in clients:
            hello = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            ids.append(hello["client"])
            await ws.send(orjson.dumps({"id": 1, "op": "subscribe", "channel": "lb:room"}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert reply["ok"], reply
        # least_conn spread them: more than one node has /ws clients.
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            counts = [(await http.get(f"{n.http_url}/stats")).json()["ws_clients"] for n in nodes]
        assert sum(counts) == 6
        assert sum(1 for c in counts if c) >= 2, counts

        await clients[0].send(
            orjson.dumps({"id": 2, "op": "publish", "channel": "lb:room", "data": "hi"}).decode()
        )
        for ws in clients:
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if frame.get("type") == "publication":
                    break
            assert frame["data"] == "hi"
            assert frame["offset"] == 1
            assert frame["info"]["client"] == ids[0]

        # The guide's chat through nginx, too.
        chat = [await connect(f"{url}/ws/chat") for _ in range(4)]
        try:
            await chat[0].send("through nginx")
            for ws in chat:
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "Client says: through nginx"
        finally:
            for ws in chat:
                await ws.close()
    finally:
        for ws in clients:
            await ws.close()
