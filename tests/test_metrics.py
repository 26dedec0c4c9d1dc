"""``GET /metrics``: Prometheus metrics that add up, on one process and across workers.

Several workers are ``roomcast serve --workers`` processes on one Redis; one process is an
in-process server on each WebSocket implementation.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from helpers import (
    LEFT,
    TIMEOUT,
    RoomcastServer,
    async_wait_until,
    kernel_send_buffer_max,
    raw_ws_handshake,
    recv,
    wait_until,
    ws_connect,
)
from redis_server import (
    RedisServer,
    redis_server_fixture,  # noqa: F401 (a fixture)
    unique_prefix,
)
from servers import AppServer, Peer, ServerStarter, channel, in_server_loop, peer
from test_cluster import connections_per_worker, worker_pids

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

WORKERS = 3
ECHO_CONNS = 30
WS_CONNS = 9
ECHOES_EACH = 4
PUBLICATIONS = 12


async def get(server: RoomcastServer | AppServer, path: str) -> httpx.Response:
    """One request, on a new connection (with several workers, any of them may answer)."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        return await client.get(f"{server.http_url}{path}")


async def scrape(server: RoomcastServer | AppServer) -> Samples:
    resp = await get(server, "/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; fails if the server does not expose it (every series
    exists from the start, at 0, so a missing one is a renamed or lost metric, not a 0)."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels} in /metrics"
    return samples[key]


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}``, or None while a scrape does not show it (yet)."""
    return samples.get((name, frozenset(labels.items())))


# -- several workers, one Redis ------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoomcastServer]:
    server = RoomcastServer(
        tmp_path_factory.mktemp("metrics-workers"),
        env={
            "ROOMCAST_WORKERS": str(WORKERS),
            "ROOMCAST_BROKER_URL": redis_server.url_for(unique_prefix("metrics")),
        },
        startup_timeout=6 * TIMEOUT,
    )
    with server:
        wait_until(
            lambda: server.log().count("Application startup complete.") == WORKERS,
            4 * TIMEOUT,
            "every worker to start",
        )
        assert len(worker_pids(server)) == WORKERS
        yield server
    server.assert_no_traceback()


@pytest.mark.redis
async def test_counters_add_up_across_workers(workers: RoomcastServer) -> None:
    ch = channel("metrics")
    async with AsyncExitStack() as stack:
        echoes: list[ClientConnection] = [
            await stack.enter_async_context(ws_connect(workers, "/ws/echo"))
            for _ in range(ECHO_CONNS)
        ]
        peers: list[Peer] = [
            await stack.enter_async_context(peer(workers)) for _ in range(WS_CONNS)
        ]
        spread = connections_per_worker(workers)
        assert sum(1 for n in spread.values() if n) >= 2, spread

        async def echo(ws: ClientConnection, i: int) -> None:
            for k in range(ECHOES_EACH):
                await ws.send(f"m{i}.{k}")
                assert await recv(ws) == f"Echo: m{i}.{k}"

        await asyncio.gather(*(echo(ws, i) for i, ws in enumerate(echoes)))
        for p in peers:
            await p.ok("subscribe", channel=ch)
        for i in range(PUBLICATIONS):
            await peers[i % WS_CONNS].ok("publish", channel=ch, data=i)
        for p in peers:
            assert [f["data"] for f in await p.publications(PUBLICATIONS)] == list(
                range(PUBLICATIONS)
            )

        messages = ECHO_CONNS * ECHOES_EACH
        expected = {
            ("roomcast_messages_received_total", "/ws/echo"): messages,
            ("roomcast_messages_sent_total", "/ws/echo"): messages,
            ("roomcast_messages_received_total", "/ws"): WS_CONNS + PUBLICATIONS,
            ("roomcast_connections_opened_total", "/ws/echo"): ECHO_CONNS,
            ("roomcast_connections_opened_total", "/ws"): WS_CONNS,
            ("roomcast_connections_open", "/ws/echo"): ECHO_CONNS,
            ("roomcast_connections_open", "/ws"): WS_CONNS,
        }

        def adds_up(samples: Samples) -> bool:
            return (
                all(sample(samples, n, endpoint=e) == v for (n, e), v in expected.items())
                and sample(samples, "roomcast_publications_total") == PUBLICATIONS
                and sample(samples, "roomcast_fanout_deliveries_total", kind="channel")
                == PUBLICATIONS * WS_CONNS
            )

        # Workers flush every second; once the totals add up, every scrape (whichever worker
        # answers it) shows them.
        last: list[Samples] = []

        async def settled() -> bool:
            last[:] = [await scrape(workers)]
            return adds_up(last[0])

        try:
            await async_wait_until(settled, 4 * TIMEOUT, "the totals")
        except AssertionError:
            got = {k: sample(last[0], k[0], endpoint=k[1]) for k in expected}
            raise AssertionError(f"expected {expected}, scraped {got}") from None
        for _ in range(2 * WORKERS):
            samples = await scrape(workers)
            assert adds_up(samples)
            assert value(samples, "roomcast_messages_sent_total", endpoint="/ws") >= (
                WS_CONNS * (2 + PUBLICATIONS)  # connected, subscribe reply, publications
            )
            assert value(samples, "roomcast_received_bytes_total", endpoint="/ws/echo") > 0
            assert value(samples, "roomcast_broker_seconds_count", op="publish") == PUBLICATIONS

    # Every client closed with 1000: the closes add up and nothing is open any more.
    async def all_closed() -> bool:
        samples = await scrape(workers)
        return sample(
            samples, "roomcast_connections_closed_total", code="1000"
        ) == ECHO_CONNS + WS_CONNS and not any(
            v for (name, _), v in samples.items() if name == "roomcast_connections_open"
        )

    await async_wait_until(all_closed, 4 * TIMEOUT, "the closes")


# -- one process -------------------------------------------------------------------------------

OUTBOX = 16
PAD = 4096
MAX_MESSAGES = (kernel_send_buffer_max() + (8 << 20)) // PAD


@in_server_loop
async def test_fanout_histogram_and_slow_consumer(start_server: ServerStarter) -> None:
    server = await start_server(outbox_size=OUTBOX)
    path = f"/ws/chat/m-{uuid.uuid4().hex[:8]}"
    staller, _ = await asyncio.to_thread(raw_ws_handshake, server.port, path, rcvbuf=4096)
    with staller:
        async with ws_connect(server, path, compression=None) as ws:
            await server.await_stats(lambda s: s["chat_members"] == 2, what="both members in")
            sent = 0
            # Send until the staller is cut and the sender hears that it left.
            while True:
                assert sent < MAX_MESSAGES, "the staller was never cut"
                await ws.send(f"{sent:06d}" + "x" * PAD)
                sent += 1
                reply = await recv(ws)
                if reply == LEFT:
                    break
                assert reply.startswith(f"Client says: {sent - 1:06d}"), reply[:40]
            # The notice came right after the echo of the message that cut the staller; the
            # echo of the one after it follows.
            reply = await recv(ws)
            assert reply.startswith(f"Client says: {sent - 1:06d}"), reply[:40]
            samples = await scrape(server)
    room = "/ws/chat/{room}"
    assert value(samples, "roomcast_slow_consumer_disconnects_total", endpoint=room) == 1
    assert value(samples, "roomcast_messages_received_total", endpoint=room) == sent
    # One fan-out per message, and one for the leave notice.
    count = value(samples, "roomcast_fanout_seconds_count", kind="chat")
    assert count == sent + 1
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "roomcast_fanout_seconds_bucket" and dict(labels)["kind"] == "chat"
    )
    assert buckets[0][0] == 1e-5
    assert buckets[-1] == (float("inf"), count)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert 0 < value(samples, "roomcast_fanout_seconds_sum", kind="chat") < count
    # The sender got every message until the cut, the staller some.
    assert value(samples, "roomcast_fanout_deliveries_total", kind="chat") >= sent + 1


@in_server_loop
async def test_metrics_without_key_and_off_switch(start_server: ServerStarter) -> None:
    server = await start_server(api_key="k")
    resp = await get(server, "/openapi.json")
    assert "/metrics" not in resp.json()["paths"]

    async def refused() -> None:
        async with ws_connect(server, "/ws/secure?token=wrong"):
            pass

    with pytest.raises(InvalidStatus):
        await refused()
    async with peer(server) as p:
        await p.ok("subscribe", channel="a")
    samples = await scrape(server)  # no API key needed
    assert value(samples, "roomcast_auth_failures_total", reason="unknown_token") == 1
    assert value(samples, "roomcast_auth_failures_total", reason="origin") == 0
    assert value(samples, "roomcast_connections_opened_total", endpoint="/ws/secure") == 0
    off = await start_server(metrics=False)
    assert (await get(off, "/metrics")).status_code == 404
