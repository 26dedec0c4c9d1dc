"""``GET /asyncapi.json``: valid AsyncAPI 3.0, complete, and true to what the server sends.

The document is fetched from a real server (in-process, on both WebSocket implementations) and
validated against the official AsyncAPI 3.0.0 JSON Schema, vendored in tests/data/asyncapi/
(see the README there). Completeness is checked against the code: every WebSocket route of the
app, every op, error code, close code and push type. Real frames from the server are then
validated against the payload schemas.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
from starlette.routing import WebSocketRoute

from helpers import GOOD_TOKEN, TIMEOUT, recv, ws_connect
from roomcast import CloseCode, Settings, create_app
from roomcast.asyncapi import asyncapi_document
from roomcast.asyncapi_messages import ERROR_CODES, PUSHES, REQUESTS, RESULTS
from roomcast.codecs.roomcast_json import OPS, ErrorCode
from servers import AppServer

SCHEMA_PATH = Path(__file__).parent / "data" / "asyncapi" / "asyncapi-3.0.0.schema.json"
#: The module's server serves in the module's event loop (tests/servers.py): the tests that talk
#: to it run there. Only coroutines take the mark; the others read the fetched document.
in_server_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def document(server: AppServer) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        resp = await http.get(f"{server.http_url}/asyncapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc: dict[str, Any] = resp.json()
    return doc


def errors(validator: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(doc)
    ]


def app_ws_paths() -> set[str]:
    app = create_app(Settings())
    return {route.path for route in app.router.routes if isinstance(route, WebSocketRoute)}


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def ws_channel(doc: dict[str, Any]) -> dict[str, Any]:
    (channel,) = (c for c in doc["channels"].values() if c["address"] == "/ws")
    return channel


# -- valid ---------------------------------------------------------------------------------------


def test_document_is_valid_asyncapi_3(
    validator: jsonschema.Draft7Validator, document: dict[str, Any]
) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert errors(validator, document) == []


@pytest.mark.parametrize(
    "breakage",
    [
        "no info",
        "wrong version",
        "bad action",
        "unknown channel field",
        "server without protocol",
        "message as a bare string",
    ],
)
def test_broken_copy_fails_validation(
    validator: jsonschema.Draft7Validator, document: dict[str, Any], breakage: str
) -> None:
    broken = copy.deepcopy(document)
    operation = next(iter(broken["operations"].values()))
    channel = next(iter(broken["channels"].values()))
    match breakage:
        case "no info":
            del broken["info"]
        case "wrong version":
            broken["asyncapi"] = "3.0"
        case "bad action":
            operation["action"] = "publish"  # AsyncAPI 2's word; 3.0 has send/receive
        case "unknown channel field":
            channel["subscribe"] = {}
        case "server without protocol":
            del next(iter(broken["servers"].values()))["protocol"]
        case "message as a bare string":
            channel["messages"][next(iter(channel["messages"]))] = "text"
    assert errors(validator, broken) != []


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = [node["$ref"] for node in walk(document) if isinstance(node, dict) and "$ref" in node]
    assert refs
    for ref in refs:
        resolve(document, ref)
    # An operation's messages are messages of its own channel (AsyncAPI 3.0, Operation Object).
    for name, operation in document["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation.get("messages", []) + operation.get("reply", {}).get(
            "messages", []
        ):
            assert message["$ref"].startswith(channel_ref + "/messages/"), name


# -- complete --------------------------------------------------------------------------------------


def test_every_websocket_route_is_a_channel(document: dict[str, Any]) -> None:
    """A WebSocket endpoint added to the app without being described here fails this test."""
    paths = app_ws_paths()
    assert {"/ws", "/ws/echo", "/ws/chat", "/ws/chat/{room}", "/ws/secure"} <= paths
    assert len(paths) == 10
    addresses = [channel["address"] for channel in document["channels"].values()]
    assert sorted(addresses) == sorted(paths)
    for channel in document["channels"].values():
        assert channel["messages"], channel["address"]
        assert channel["description"], channel["address"]
    assert set(document["channels"]["ws_chat_room"]["parameters"]) == {"room"}


def test_every_op_has_a_request_and_replies(document: dict[str, Any]) -> None:
    assert set(REQUESTS) == set(OPS)
    assert set(RESULTS) == set(OPS)
    schemas = document["components"]["schemas"]
    channel = ws_channel(document)
    ops = set()
    for operation in document["operations"].values():
        if operation["action"] != "receive" or operation["channel"] != {"$ref": "#/channels/ws"}:
            continue
        (message,) = (resolve(document, m["$ref"]) for m in operation["messages"])
        payload = resolve(document, message["payload"]["$ref"])
        ops.add(payload["properties"]["op"]["const"])
        replies = [resolve(document, m["$ref"]) for m in operation["reply"]["messages"]]
        assert {r["payload"]["$ref"] for r in replies} >= {"#/components/schemas/ErrorReply"}
        assert len(replies) == 2
    assert ops == set(OPS)
    assert schemas["PublishRequest"]["required"] == ["id", "op", "channel", "data"]
    assert set(schemas["HistoryRequest"]["properties"]) >= {"limit", "since", "before"}
    assert set(channel["messages"]) >= {f"{op}Request" for op in OPS}


def test_every_push_type(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert set(PUSHES) == {"connected", "publication", "join", "leave", "refresh", "unsubscribed"}
    for kind, model in PUSHES.items():
        assert schemas[model.__name__]["properties"]["type"]["const"] == kind
        assert f"{kind}Push" in ws_channel(document)["messages"]


def test_every_error_code(document: dict[str, Any]) -> None:
    assert set(ERROR_CODES) == set(ErrorCode)
    code = document["components"]["schemas"]["ErrorCode"]
    assert code["enum"] == [c.value for c in ErrorCode]
    for c in ErrorCode:
        assert f"`{c.value}`" in code["description"]


def test_every_close_code(document: dict[str, Any]) -> None:
    listed = document["x-close-codes"]
    assert set(listed) == {str(int(code)) for code in CloseCode}
    # The descriptions come from the #: comments in roomcast/closecodes.py.
    assert "POST /api/disconnect" in listed["4001"]["description"]
    for channel in document["channels"].values():
        assert set(map(str, channel["x-close-codes"])) <= set(listed)
        for code in channel["x-close-codes"]:
            assert f"`{code}`" in channel["description"]
    used = {code for c in document["channels"].values() for code in c["x-close-codes"]}
    # Every code roomcast itself sends is used by some endpoint (1001/1002/1005/1006 come from
    # the peer or the transport).
    assert used >= {int(c) for c in CloseCode} - {1001, 1002, 1005, 1006}
    assert {4001, 4002, 4003, 4008, 4009, 4029} <= set(ws_channel(document)["x-close-codes"])


def test_security_schemes(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["queryToken"] == schemes["queryToken"] | {"in": "query", "name": "token"}
    assert "roomcast.token." in schemes["subprotocolToken"]["description"]
    secured = {
        resolve(document, op["channel"]["$ref"])["address"]
        for op in document["operations"].values()
        if "security" in op
    }
    assert secured == {"/ws", "/ws/secure"}


def test_settings_and_version_come_from_the_server(document: dict[str, Any]) -> None:
    assert document["info"]["version"] == "0.2.0"
    channel_name = document["components"]["schemas"]["ChannelName"]
    assert channel_name["maxLength"] == Settings().channel_max_length
    other = asyncapi_document(
        Settings(channel_max_length=32, stream_max_count=5), create_app().router.routes
    )
    assert other["components"]["schemas"]["ChannelName"]["pattern"].endswith("{1,32}$")
    query = other["channels"]["ws_stream"]["bindings"]["ws"]["query"]
    assert query["properties"]["count"]["maximum"] == 5


@in_server_loop
async def test_linked_from_the_openapi_docs(server: AppServer) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        openapi = (await http.get(f"{server.http_url}/openapi.json")).json()
    assert "(/asyncapi.json)" in openapi["info"]["description"]
    assert "/asyncapi.json" in openapi["paths"]


# -- true to the wire ------------------------------------------------------------------------------


def payload_validator(document: dict[str, Any], message: str) -> jsonschema.Draft7Validator:
    """A validator for the payload of message ``message`` of the /ws channel."""
    payload = ws_channel(document)["messages"][message]["payload"]
    # In Draft-07 a $ref ignores its siblings: "components" is only there to be referenced.
    return jsonschema.Draft7Validator({**payload, "components": document["components"]})


@in_server_loop
async def test_real_frames_match_the_payload_schemas(
    server: AppServer, document: dict[str, Any]
) -> None:
    def check(message: str, frame: str | bytes) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(frame)
        problems = [e.message for e in payload_validator(document, message).iter_errors(value)]
        assert problems == [], (message, value)
        return value

    requests: list[dict[str, Any]] = [
        {"id": 8, "op": "auth", "token": GOOD_TOKEN},
        {"id": 1, "op": "subscribe", "channel": "doc:a", "join_leave": True},
        {"id": 2, "op": "publish", "channel": "doc:a", "data": {"n": 1}},
        {"id": 3, "op": "presence", "channel": "doc:a"},
        {"id": 4, "op": "history", "channel": "doc:a", "limit": 5},
        {"id": "p", "op": "ping"},
        {"id": 6, "op": "subscribe", "channel": "doc:b", "recover": {"offset": 0, "epoch": "x"}},
        {"id": 7, "op": "unsubscribe", "channel": "doc:b"},
    ]
    for request in requests:
        check(f"{request['op']}Request", json.dumps(request))
    async with ws_connect(server, "/ws") as ws:
        check("connectedPush", await recv(ws))
        for request in requests:
            await ws.send(json.dumps(request))
            while True:
                frame = json.loads(await recv(ws))
                if "type" in frame:
                    check(f"{frame['type']}Push", json.dumps(frame))
                    continue
                assert frame["ok"] is True, frame
                check(f"{request['op']}Reply", json.dumps(frame))
                break
        await ws.send('{"id": 9, "op": "frobnicate"}')
        assert check("errorReply", await recv(ws))["error"]["code"] == "unknown_op"
        await ws.send("not json")
        assert check("errorReply", await recv(ws))["id"] is None


@in_server_loop
async def test_guide_endpoints_match_their_text_patterns(
    server: AppServer, document: dict[str, Any]
) -> None:
    messages = document["channels"]["ws_echo"]["messages"]
    async with ws_connect(server, "/ws/echo") as ws:
        await ws.send("hi")
        reply = await recv(ws)
    jsonschema.validate(reply, messages["echoReply"]["payload"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("hi", messages["echoReply"]["payload"])
    messages = document["channels"]["ws_secure"]["messages"]
    async with ws_connect(server, f"/ws/secure?token={GOOD_TOKEN}") as ws:
        jsonschema.validate(await recv(ws), messages["secureWelcome"]["payload"])
