"""The HTTP API of docs/protocol.md ("The HTTP API"), against in-process servers on both
WebSocket implementations.

The `/ws` client used here is the suite's ``Peer`` (tests/servers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from helpers import (
    GOOD_TOKEN,
    TIMEOUT,
    USER,
    async_wait_until,
    recv_until_closed,
)
from servers import AppServer, channel, peer, publication, serve

# In-process servers serve in the module's event loop (tests/servers.py), and so do the
# HTTP clients of the fixtures below.
pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "test-api-key-5f0c1d2e"
MAX_PUBLICATION = 1024
OTHER_TOKEN, OTHER_USER = "other-token", "other_user"
API_INFO = {"client": None, "user": None}

# Every route of the API, with a body it would accept.
ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/api/publish", {"channel": "c", "data": 1}),
    ("POST", "/api/broadcast", {"channels": ["c"], "data": 1}),
    ("GET", "/api/channels", None),
    ("GET", "/api/presence/c", None),
    ("GET", "/api/history/c", None),
    ("POST", "/api/disconnect", {"user": "nobody"}),
]
ROUTE_IDS = [path.split("/")[2] for _, path, _ in ROUTES]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(
        ws_impl,
        api_key=KEY,
        max_publication_size=MAX_PUBLICATION,
        tokens={GOOD_TOKEN: USER, OTHER_TOKEN: OTHER_USER},
    ) as srv:
        yield srv
    assert KEY not in srv.log(), "the API key reached the log"


@pytest_asyncio.fixture(loop_scope="module")
async def http(api: AppServer) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=api.http_url, headers=headers, timeout=TIMEOUT) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bare(api: AppServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API server that sends only the headers each request gives."""
    async with httpx.AsyncClient(base_url=api.http_url, timeout=TIMEOUT) as c:
        yield c


def ok(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    return resp.json()


# -- on, off, and the key ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_api_is_off_without_a_key(
    server: AppServer, method: str, path: str, body: Any
) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as client:
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status_code == 404, (headers, resp.status_code, resp.text)
        # Even a body the route would refuse: the API is not there at all.
        if method == "POST":
            assert (await client.post(path, content=b"{not json")).status_code == 404


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"X-API-Key": "wrong-key"},
        {"X-API-Key": ""},
    ],
    ids=["none", "wrong-bearer", "longer-bearer", "basic", "no-scheme", "wrong-header", "empty"],
)
async def test_missing_or_wrong_key_is_401(
    bare: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    resp = await bare.request(method, path, json=body, headers=headers)
    assert resp.status_code == 401, (resp.status_code, resp.text)
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}],
    ids=["bearer", "bearer-lowercase", "x-api-key"],
)
async def test_right_key_is_accepted(
    bare: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    resp = await bare.request(method, path, json=body, headers=headers)
    assert isinstance(ok(resp), dict)


async def test_routes_are_in_the_openapi_document(bare: httpx.AsyncClient) -> None:
    spec = (await bare.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        "/api/publish": "post",
        "/api/broadcast": "post",
        "/api/channels": "get",
        "/api/presence/{channel}": "get",
        "/api/history/{channel}": "get",
        "/api/disconnect": "post",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), (path, sorted(paths))
    params = {p["name"] for p in paths["/api/history/{channel}"]["get"]["parameters"]}
    assert {"channel", "limit", "since", "before"} <= params
    docs = await bare.get("/docs")
    assert docs.status_code == 200
    assert "openapi.json" in docs.text


# -- publish and broadcast -----------------------------------------------------------------------


async def test_publish_reaches_ws_subscribers(api: AppServer, http: httpx.AsyncClient) -> None:
    ch = channel("api")
    async with peer(api) as sub, peer(api) as other:
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
        await other.ok("subscribe", channel=ch)
        for k, data in enumerate([{"text": "hi"}, None, [1, "ü", 2.5], "plain"], start=1):
            result = ok(await http.post("/api/publish", json={"channel": ch, "data": data}))
            assert result == {"epoch": epoch, "offset": k}
            assert await sub.push() == publication(ch, k, data, API_INFO)
            assert await other.push() == publication(ch, k, data, API_INFO)
        # Offsets are shared with /ws publications.
        assert (await sub.ok("publish", channel=ch, data="ws"))["offset"] == 5
        result = ok(await http.post("/api/publish", json={"channel": ch, "data": 6}))
        assert result == {"epoch": epoch, "offset": 6}


async def test_broadcast_reaches_every_channel(api: AppServer, http: httpx.AsyncClient) -> None:
    names = [channel("bc") for _ in range(3)]
    async with peer(api) as a, peer(api) as b, peer(api) as both:
        epochs = [(await a.ok("subscribe", channel=names[0]))["epoch"]]
        epochs.append((await b.ok("subscribe", channel=names[1]))["epoch"])
        await both.ok("subscribe", channel=names[0])
        await both.ok("subscribe", channel=names[1])
        await both.ok("publish", channel=names[1], data="first")  # names[1] is at offset 1
        await b.publications(1)
        await both.publications(1)
        data = {"announcement": "maintenance at noon"}
        result = ok(await http.post("/api/broadcast", json={"channels": names, "data": data}))
        assert [r["channel"] for r in result["results"]] == names
        assert [r["offset"] for r in result["results"]] == [1, 2, 1]
        assert [r["epoch"] for r in result["results"]][:2] == epochs
        assert set(result) == {"results"}
        assert all(set(r) == {"channel", "epoch", "offset"} for r in result["results"])
        assert await a.push() == publication(names[0], 1, data, API_INFO)
        assert await b.push() == publication(names[1], 2, data, API_INFO)
        got = [await both.push(), await both.push()]
        assert sorted(got, key=lambda f: f["channel"]) == sorted(
            [publication(names[0], 1, data, API_INFO), publication(names[1], 2, data, API_INFO)],
            key=lambda f: f["channel"],
        )
        # The third channel had no subscriber, but its history has the publication.
        history = ok(await http.get(f"/api/history/{names[2]}"))
        assert history["publications"] == [publication(names[2], 1, data, API_INFO)]
        await a.still_works()


@pytest.mark.parametrize(
    "body",
    [
        {"channel": "no spaces", "data": 1},
        {"channel": "x" * 129, "data": 1},
        {"channel": "", "data": 1},
        {"channel": 5, "data": 1},
        {"channel": "ok"},
        {"data": 1},
        {"channel": "ok", "data": "a" * (MAX_PUBLICATION - 1)},
        [],
        "not an object",
    ],
    ids=[
        "space",
        "too-long",
        "empty",
        "number",
        "no-data",
        "no-channel",
        "too-large",
        "array",
        "string",
    ],
)
async def test_publish_refuses_422(http: httpx.AsyncClient, body: Any) -> None:
    resp = await http.post("/api/publish", json=body)
    assert resp.status_code == 422, (resp.status_code, resp.text)


async def test_publish_malformed_json_is_422(http: httpx.AsyncClient) -> None:
    resp = await http.post(
        "/api/publish", content=b'{"channel": "c", ', headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422, (resp.status_code, resp.text)


async def test_publish_at_the_size_limit(api: AppServer, http: httpx.AsyncClient) -> None:
    ch = channel("api")
    async with peer(api) as sub:
        await sub.ok("subscribe", channel=ch)
        at_limit = "a" * (MAX_PUBLICATION - 2)  # with its quotes: exactly the limit
        ok(await http.post("/api/publish", json={"channel": ch, "data": at_limit}))
        assert (await sub.push())["data"] == at_limit
        resp = await http.post("/api/publish", json={"channel": ch, "data": at_limit + "a"})
        assert resp.status_code == 422
        # Nothing was published by the refused one.
        assert ok(await http.post("/api/publish", json={"channel": ch, "data": 2}))["offset"] == 2


@pytest.mark.parametrize(
    "body",
    [
        {"channels": [], "data": 1},
        {"channels": [f"c{k}" for k in range(1001)], "data": 1},
        {"channels": ["ok", "no spaces"], "data": 1},
        {"channels": "ok", "data": 1},
        {"channels": ["ok"]},
        {"channels": ["ok"], "data": "a" * MAX_PUBLICATION},
    ],
    ids=["none", "1001", "one-bad", "not-a-list", "no-data", "too-large"],
)
async def test_broadcast_refuses_422(api: AppServer, http: httpx.AsyncClient, body: Any) -> None:
    async with peer(api) as sub:
        await sub.ok("subscribe", channel="ok")
        resp = await http.post("/api/broadcast", json=body)
        assert resp.status_code == 422, (resp.status_code, resp.text)
        # All or nothing: not even the good channel got a publication.
        await sub.ok("publish", channel="ok", data="marker")
        assert (await sub.push())["data"] == "marker"


async def test_broadcast_to_1000_channels(api: AppServer, http: httpx.AsyncClient) -> None:
    names = [f"{channel('many')}-{k}" for k in range(1000)]
    result = ok(await http.post("/api/broadcast", json={"channels": names, "data": 0}))
    assert [(r["channel"], r["offset"]) for r in result["results"]] == [(n, 1) for n in names]


# -- channels, presence, history -----------------------------------------------------------------


async def test_channels_lists_subscriber_counts(api: AppServer, http: httpx.AsyncClient) -> None:
    busy, quiet, unheard = channel("ls"), channel("ls"), channel("ls")
    async with peer(api) as a, peer(api) as b:
        await a.ok("subscribe", channel=busy)
        await b.ok("subscribe", channel=busy)
        await a.ok("subscribe", channel=quiet)
        ok(await http.post("/api/publish", json={"channel": unheard, "data": 1}))

        def counts(listing: Any) -> dict[str, int]:
            assert set(listing) == {"channels"}
            assert all(set(c) == {"channel", "subscribers"} for c in listing["channels"])
            return {c["channel"]: c["subscribers"] for c in listing["channels"]}

        mine = {busy, quiet, unheard}
        listed = counts(ok(await http.get("/api/channels")))
        assert {k: v for k, v in listed.items() if k in mine} == {busy: 2, quiet: 1}
        await a.ok("unsubscribe", channel=quiet)
        await b.ws.close()
        listed = counts(ok(await http.get("/api/channels")))
        assert {k: v for k, v in listed.items() if k in mine} == {busy: 1}


async def test_presence(api: AppServer, http: httpx.AsyncClient) -> None:
    ch = channel("pr")
    assert ok(await http.get(f"/api/presence/{ch}")) == {"clients": []}
    async with peer(api, f"/ws?token={GOOD_TOKEN}") as a, peer(api) as b:
        await a.ok("subscribe", channel=ch)
        await b.ok("subscribe", channel=ch)
        via_api = ok(await http.get(f"/api/presence/{ch}"))
        assert via_api == await a.ok("presence", channel=ch)
        assert [(c["client"], c["user"]) for c in via_api["clients"]] == [
            (a.client, USER),
            (b.client, None),
        ]
        b.ws.transport.abort()

        async def only_a() -> bool:
            clients = ok(await http.get(f"/api/presence/{ch}"))["clients"]
            return [c["client"] for c in clients] == [a.client]

        await async_wait_until(only_a, what="b gone from presence")


@pytest.mark.parametrize("path", ["presence", "history"])
@pytest.mark.parametrize(
    "name", ["no%20spaces", "x" * 129, "ch%C3%A4t"], ids=["space", "long", "ä"]
)
async def test_bad_channel_in_path_is_422(http: httpx.AsyncClient, path: str, name: str) -> None:
    resp = await http.get(f"/api/{path}/{name}")
    assert resp.status_code == 422, (resp.status_code, resp.text)


async def test_history(api: AppServer, http: httpx.AsyncClient) -> None:
    ch = channel("hi")
    async with peer(api) as p:
        for k in range(1, 13):
            await p.ok("publish", channel=ch, data={"k": k})
        for query in [
            {},
            {"limit": 5},
            {"since": 3},
            {"since": 3, "limit": 4},
            {"before": 6},
            {"before": 6, "limit": 2},
            {"since": 12},
            {"before": 1},
            {"limit": 1000},
        ]:
            via_api = ok(await http.get(f"/api/history/{ch}", params=query))
            assert via_api == await p.ok("history", channel=ch, **query), query
        page = ok(await http.get(f"/api/history/{ch}", params={"since": 3, "limit": 4}))
        assert page["epoch"] == (await p.ok("history", channel=ch))["epoch"]
        assert (page["offset"], page["start"]) == (12, 1)
        assert page["publications"] == [publication(ch, k, {"k": k}, p.info) for k in range(4, 8)]


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"since": "x"},
        {"since": 1, "before": 5},
    ],
    ids=["limit-0", "limit-1001", "limit-text", "since-text", "since-and-before"],
)
async def test_history_bad_query_is_422(http: httpx.AsyncClient, query: dict[str, Any]) -> None:
    resp = await http.get(f"/api/history/{channel('hq')}", params=query)
    assert resp.status_code == 422, (resp.status_code, resp.text)


# -- disconnect ----------------------------------------------------------------------------------


async def test_disconnect_closes_that_users_connections_4001(
    api: AppServer, http: httpx.AsyncClient
) -> None:
    ch = channel("kick")
    async with (
        peer(api) as watcher,
        peer(api, f"/ws?token={GOOD_TOKEN}") as first,
        peer(api, "/ws", additional_headers={"Authorization": f"Bearer {GOOD_TOKEN}"}) as second,
        peer(api, f"/ws?token={OTHER_TOKEN}") as other,
        peer(api) as anonymous,
    ):
        await watcher.ok("subscribe", channel=ch, join_leave=True)
        for p in (first, second, other, anonymous):
            await p.ok("subscribe", channel=ch)
            assert (await watcher.push())["type"] == "join"
        result = ok(await http.post("/api/disconnect", json={"user": USER}))
        assert result == {"disconnected": 2}
        for kicked in (first, second):
            await recv_until_closed(kicked.ws)
            assert kicked.ws.close_code == 4001, (kicked.ws.close_code, kicked.ws.close_reason)
        left = {(await watcher.push())["info"]["client"] for _ in range(2)}
        assert left == {first.client, second.client}
        clients = ok(await http.get(f"/api/presence/{ch}"))["clients"]
        assert [c["client"] for c in clients] == [watcher.client, other.client, anonymous.client]
        # The others carry on.
        for p in (other, anonymous, watcher):
            await p.still_works()
        assert ok(await http.post("/api/disconnect", json={"user": USER})) == {"disconnected": 0}
        assert ok(await http.post("/api/disconnect", json={"user": "nobody"})) == {
            "disconnected": 0
        }
        await other.still_works()


@pytest.mark.parametrize(
    "body", [{}, {"user": ""}, {"user": 5}, {"who": USER}], ids=["empty", "blank", "number", "key"]
)
async def test_disconnect_refuses_422(http: httpx.AsyncClient, body: Any) -> None:
    resp = await http.post("/api/disconnect", json=body)
    assert resp.status_code == 422, (resp.status_code, resp.text)


async def test_api_publications_are_recovered(api: AppServer) -> None:
    """The API's publications are stored like any other: a late subscriber recovers them."""
    ch = channel("rec")
    async with peer(api) as sub:
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
    async with httpx.AsyncClient(base_url=api.http_url, headers={"X-API-Key": KEY}) as client:
        for k in range(3):
            ok(await client.post("/api/publish", json={"channel": ch, "data": k}))
    async with peer(api) as back:
        result = await back.ok("subscribe", channel=ch, recover={"offset": 0, "epoch": epoch})
        assert result == {"epoch": epoch, "offset": 3, "recovered": True, "replayed": 3}
        assert await back.publications(3) == [publication(ch, k + 1, k, API_INFO) for k in range(3)]
