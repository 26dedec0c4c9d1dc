"""``GET /asyncapi.json``: an AsyncAPI 3.0 document of every WebSocket endpoint, made from code.

What the code knows is read from it rather than copied: the WebSocket routes from the app's
router, the operations from :data:`roomcast.codecs.roomcast_json.OPS`, the error codes from
:class:`~roomcast.codecs.roomcast_json.ErrorCode`, the close codes (and their ``#:``
comments) from :class:`~roomcast.closecodes.CloseCode`, the limits and the channel-name rule
from the server's :class:`~roomcast.settings.Settings`, the token transports from
:mod:`roomcast.auth`. The ``/ws`` frames are pydantic models
(:mod:`roomcast.asyncapi_messages`); their JSON Schemas become the message payloads. What only
prose says (the guide endpoints' texts, which close code an endpoint uses) is written
here, next to the code that turns it into the document.

A WebSocket route with no description here is left out of the document;
``tests/test_asyncapi.py`` compares the document with the app's routes, so it fails then.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute

from roomcast.asyncapi_messages import COMPONENT, PUSHES, message_schemas
from roomcast.auth import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX
from roomcast.closecodes import CloseCode
from roomcast.codecs.roomcast_json import HISTORY_PAGE_BYTES, OPS
from roomcast.http.guide import LEAVE_NOTICE, ROOM_NAME
from roomcast.settings import Settings
from roomcast.version import __version__

__all__ = [
    "ASYNCAPI_PATH",
    "asyncapi_document",
    "asyncapi_router",
    "close_code_descriptions",
]

ASYNCAPI_PATH: Final = "/asyncapi.json"
ASYNCAPI_VERSION: Final = "3.0.0"
WS_BINDING_VERSION: Final = "0.1.0"
#: The query parameter :func:`roomcast.auth.token_from_scope` reads a token from.
TOKEN_QUERY_PARAMETER: Final = "token"


def _ref(*parts: str) -> dict[str, str]:
    """A Reference Object to ``#/part/part/...`` (JSON Pointer escaping applied)."""
    escaped = (part.replace("~", "~0").replace("/", "~1") for part in parts)
    return {"$ref": "#/" + "/".join(escaped)}


# -- close codes -------------------------------------------------------------------------------


@cache
def close_code_descriptions() -> dict[CloseCode, str]:
    """Each close code with its ``#:`` comment in roomcast/closecodes.py (its name without)."""
    descriptions = {code: code.name.replace("_", " ").lower() for code in CloseCode}
    try:
        source = inspect.getsource(CloseCode)
    except (OSError, TypeError):  # no source (a frozen or stripped install)
        return descriptions
    comment: list[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            comment.append(text[2:].strip())
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)\s*=\s*\d+", text)
        if match and match.group(1) in CloseCode.__members__ and comment:
            # The comments are reST; the document's descriptions are Markdown.
            descriptions[CloseCode[match.group(1)]] = " ".join(comment).replace("``", "`")
        comment = []
    return descriptions


def _close_table(codes: Iterable[CloseCode]) -> str:
    docs = close_code_descriptions()
    return "\n".join(f"- `{int(code)}` {code.name}: {docs[code]}" for code in codes)


# -- the guide's endpoints ----------------------------------------------------------------------


def _text(summary: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "summary": summary,
        "contentType": "text/plain",
        "payload": schema if schema is not None else {"type": "string"},
    }


def _prefixed(prefix: str) -> dict[str, Any]:
    return {"type": "string", "pattern": "^" + re.escape(prefix)}


def _binary(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "contentType": "application/octet-stream",
        "payload": {"type": "string", "format": "binary"},
    }


@dataclass(frozen=True)
class Endpoint:
    """A WebSocket endpoint as the document shows it."""

    title: str
    description: str
    #: Frames the client sends (the server receives).
    incoming: dict[str, dict[str, Any]]
    #: Frames the server sends.
    outgoing: dict[str, dict[str, Any]]
    close_codes: Sequence[CloseCode]
    query: dict[str, Any] = field(default_factory=dict)
    secured: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


_COMMON_CLOSES = (
    CloseCode.NORMAL,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
    CloseCode.INTERNAL_ERROR,
    CloseCode.SERVICE_RESTART,
)


def _classic_endpoints(settings: Settings) -> dict[str, Endpoint]:
    text_only = (*_COMMON_CLOSES, CloseCode.UNSUPPORTED_DATA)
    chat_closes = (*text_only, CloseCode.TRY_AGAIN_LATER)
    chat_out = {
        "chatMessage": _text("What a member said, to every member", _prefixed("Client says: ")),
        "chatLeft": _text("A member left", {"type": "string", "const": LEAVE_NOTICE}),
    }
    chat_in = {"chatText": _text("A text message for the room")}
    token_query = {
        TOKEN_QUERY_PARAMETER: {
            "type": "string",
            "description": "A token (also accepted: Authorization: Bearer, or a subprotocol).",
        }
    }
    return {
        "/ws/echo": Endpoint(
            "Echo",
            "Text in, `Echo: {text}` out.",
            {"echoText": _text("Any text")},
            {"echoReply": _text("The text, echoed", _prefixed("Echo: "))},
            text_only,
        ),
        "/ws/chat": Endpoint(
            "Chat",
            "One room: every member (the sender too) gets what any member says.",
            chat_in,
            chat_out,
            chat_closes,
        ),
        "/ws/chat/{room}": Endpoint(
            "Chat room",
            "As /ws/chat, in the named room. An invalid room name is accepted, then closed "
            "with 1008 and the rule as reason.",
            chat_in,
            chat_out,
            chat_closes,
            parameters={
                "room": {
                    "description": f"The room: `{ROOM_NAME.pattern}`.",
                    "examples": ["lobby"],
                }
            },
        ),
        "/ws/secure": Endpoint(
            "Secure",
            "A bad or missing token is refused with HTTP 403 before the handshake completes; "
            "a JWT that expires while connected is closed with 4003.",
            {"secureText": _text("Any text")},
            {
                "secureWelcome": _text(
                    "The first message",
                    {
                        "type": "string",
                        "pattern": r"^Hello, .*! Welcome to the secure WebSocket\.$",
                    },
                ),
                "secureReply": _text("The text, echoed", _prefixed("You said: ")),
            },
            (*text_only, CloseCode.TOKEN_EXPIRED),
            query=token_query,
            secured=True,
        ),
        "/ws/stream": Endpoint(
            "Stream",
            "`count` messages `interval` seconds apart, then close 1000; parameters out of "
            "bounds: accepted, then closed with 1008. Frames the client sends are ignored.",
            {},
            {
                "streamMessage": _text(
                    "The next message", {"type": "string", "pattern": "^Streaming message [0-9]+$"}
                )
            },
            _COMMON_CLOSES,
            query={
                "count": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": settings.stream_max_count,
                    "default": 10,
                },
                "interval": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": settings.stream_max_interval,
                    "default": 1,
                    "description": "Seconds between messages.",
                },
            },
        ),
        "/ws/methods_text": Endpoint(
            "Text frames",
            "Text in, `Server received: {text}` out.",
            {"methodsText": _text("Any text")},
            {"methodsTextReply": _text("The reply", _prefixed("Server received: "))},
            text_only,
        ),
        "/ws/methods_bytes": Endpoint(
            "Binary frames",
            'Bytes in, `b"Server received: " + bytes` out; a text frame is closed with 1003.',
            {"methodsBytes": _binary("Any bytes")},
            {"methodsBytesReply": _binary('b"Server received: " + the bytes')},
            text_only,
        ),
        "/ws/methods_json": Endpoint(
            "JSON frames",
            "JSON in (a text frame), the JSON wrapped out; invalid JSON is closed with 1007.",
            {"methodsJson": {"summary": "Any JSON value", "payload": {}}},
            {
                "methodsJsonReply": {
                    "summary": "The JSON, wrapped",
                    "payload": {
                        "type": "object",
                        "required": ["message", "data"],
                        "properties": {
                            "message": {"const": "Server received your JSON"},
                            "data": {},
                        },
                    },
                }
            },
            (*text_only, CloseCode.INVALID_PAYLOAD),
        ),
        "/ws/methods_raw": Endpoint(
            "Raw frames",
            "Text or bytes in, the same type out with the prefix `Raw echo: `.",
            {"rawText": _text("Any text"), "rawBytes": _binary("Any bytes")},
            {
                "rawTextReply": _text("The text, echoed", _prefixed("Raw echo: ")),
                "rawBytesReply": _binary('b"Raw echo: " + the bytes'),
            },
            _COMMON_CLOSES,
        ),
    }


# -- /ws ------------------------------------------------------------------------------------------


def _realtime_endpoint(settings: Settings) -> Endpoint:
    incoming = {
        f"{op}Request": {
            "name": op,
            "title": f"{op} request",
            "payload": {"$ref": COMPONENT.format(model=f"{op.capitalize()}Request")},
        }
        for op in OPS
    }
    outgoing = {
        f"{op}Reply": {
            "title": f"{op} reply",
            "payload": {"$ref": COMPONENT.format(model=f"{op.capitalize()}Reply")},
        }
        for op in OPS
    }
    outgoing["errorReply"] = {
        "title": "error reply",
        "summary": "A request that failed; the connection stays open.",
        "payload": {"$ref": COMPONENT.format(model="ErrorReply")},
    }
    for kind, model in PUSHES.items():
        outgoing[f"{kind}Push"] = {
            "name": kind,
            "title": f"{kind} push",
            "summary": (model.__doc__ or kind).strip(),
            "payload": {"$ref": COMPONENT.format(model=model.__name__)},
        }
    return Endpoint(
        "Channels (/ws protocol)",
        "roomcast's own protocol: JSON text frames. Requests carry an `id` and an `op`, and get "
        "exactly one reply with that id, in order; pushes carry a `type` and no id. A token "
        "is optional (anonymous clients get ROOMCAST_ANONYMOUS_* channels) and may also come "
        "after connecting, with the `auth` op. A token that does not verify, or a foreign "
        f"origin: HTTP 403. Limits: messages up to {settings.max_message_size} bytes, "
        f"`data` up to {settings.max_publication_size} bytes of JSON, "
        f"{settings.max_subscriptions} subscriptions per connection, "
        f"{settings.outbox_size} unread frames or {settings.outbox_bytes} unread bytes, "
        f"history pages of at most {HISTORY_PAGE_BYTES} bytes, history of {settings.history_size} "
        f"publications per channel.",
        incoming,
        outgoing,
        (
            CloseCode.NORMAL,
            CloseCode.MESSAGE_TOO_BIG,
            CloseCode.INTERNAL_ERROR,
            CloseCode.SERVICE_RESTART,
            CloseCode.DISCONNECTED,
            CloseCode.AUTH_TIMEOUT,
            CloseCode.TOKEN_EXPIRED,
            CloseCode.SLOW,
            CloseCode.TOO_MANY_CONNECTIONS,
            CloseCode.RATE_LIMITED,
        ),
        query={TOKEN_QUERY_PARAMETER: {"type": "string", "description": "A token (optional)."}},
        secured=True,
    )


# -- the document ------------------------------------------------------------------------------


def channel_key(path: str) -> str:
    """A channel's key in the document: ``/ws/chat/{room}`` → ``ws_chat_room``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"


def _security() -> dict[str, dict[str, Any]]:
    return {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT or a static token of ROOMCAST_TOKENS",
            "description": "`Authorization: Bearer TOKEN` (servers, scripts).",
        },
        "queryToken": {
            "type": "httpApiKey",
            "name": TOKEN_QUERY_PARAMETER,
            "in": "query",
            "description": f"`?{TOKEN_QUERY_PARAMETER}=TOKEN` (ends up in proxy logs).",
        },
        "subprotocolToken": {
            "type": "httpApiKey",
            "name": "Sec-WebSocket-Protocol",
            "in": "header",
            "description": f"`Sec-WebSocket-Protocol: {SUBPROTOCOL}, "
            f"{TOKEN_SUBPROTOCOL_PREFIX}TOKEN`: the way a browser can send it; the server "
            f"selects `{SUBPROTOCOL}`.",
        },
    }


def _websocket_paths(routes: Iterable[BaseRoute]) -> list[str]:
    return [route.path for route in routes if isinstance(route, WebSocketRoute)]


def asyncapi_document(
    settings: Settings,
    routes: Iterable[BaseRoute],
    *,
    host: str = "",
    secure: bool = False,
    root_path: str = "",
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the WebSocket routes among ``routes``."""
    known = _classic_endpoints(settings)
    known["/ws"] = _realtime_endpoint(settings)
    server: dict[str, Any] = {
        "host": host or f"{settings.host}:{settings.port}",
        "protocol": "wss" if secure else "ws",
        "title": "roomcast",
    }
    if root_path:
        server["pathname"] = root_path
    security_refs = [_ref("components", "securitySchemes", name) for name in _security()]
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for path in _websocket_paths(routes):
        endpoint = known.get(path)
        if endpoint is None:
            continue  # undocumented: tests/test_asyncapi.py fails on it
        key = channel_key(path)
        channel: dict[str, Any] = {
            "address": path,
            "title": endpoint.title,
            "description": endpoint.description
            + "\n\nClose codes:\n"
            + _close_table(endpoint.close_codes),
            "messages": {**endpoint.incoming, **endpoint.outgoing},
            "x-close-codes": [int(code) for code in endpoint.close_codes],
        }
        if endpoint.parameters:
            channel["parameters"] = endpoint.parameters
        binding: dict[str, Any] = {"method": "GET", "bindingVersion": WS_BINDING_VERSION}
        if endpoint.query:
            binding["query"] = {"type": "object", "properties": endpoint.query}
        channel["bindings"] = {"ws": binding}
        channels[key] = channel

        def refs(names: Iterable[str], key: str = key) -> list[dict[str, str]]:
            return [_ref("channels", key, "messages", name) for name in names]

        if path == "/ws":
            for op in OPS:
                operations[f"{key}_{op}"] = {
                    "action": "receive",
                    "channel": _ref("channels", key),
                    "title": op,
                    "messages": refs([f"{op}Request"]),
                    "reply": {
                        "channel": _ref("channels", key),
                        "messages": refs([f"{op}Reply", "errorReply"]),
                    },
                    "security": security_refs,
                }
            for kind in PUSHES:
                operations[f"{key}_{kind}"] = {
                    "action": "send",
                    "channel": _ref("channels", key),
                    "title": f"{kind} push",
                    "messages": refs([f"{kind}Push"]),
                }
            continue
        if endpoint.incoming:
            operations[f"{key}_receive"] = {
                "action": "receive",
                "channel": _ref("channels", key),
                "messages": refs(endpoint.incoming),
            }
            if endpoint.secured:
                operations[f"{key}_receive"]["security"] = security_refs
        operations[f"{key}_send"] = {
            "action": "send",
            "channel": _ref("channels", key),
            "messages": refs(endpoint.outgoing),
        }
    docs = close_code_descriptions()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "roomcast",
            "version": __version__,
            "description": "The WebSocket endpoints of this roomcast server: the FastAPI "
            "guide's endpoints (docs/endpoints.md) and the /ws channel protocol "
            "(docs/protocol.md). Generated from the code and this server's settings.",
            "license": {"name": "MIT", "url": "https://opensource.org/licenses/MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {"roomcast": server},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": message_schemas(settings),
            "securitySchemes": _security(),
        },
        "x-close-codes": {
            str(int(code)): {"name": code.name, "description": docs[code]} for code in CloseCode
        },
    }


def asyncapi_router(settings: Settings) -> APIRouter:
    """``GET /asyncapi.json`` for an app with ``settings``."""
    router = APIRouter(tags=["operations"])

    @router.get(ASYNCAPI_PATH, summary="AsyncAPI 3.0 document of the WebSocket endpoints")
    async def asyncapi(request: Request) -> JSONResponse:
        document = asyncapi_document(
            settings,
            request.app.router.routes,
            host=request.url.netloc,
            secure=request.url.scheme in ("https", "wss"),
            root_path=request.scope.get("root_path", ""),
        )
        return JSONResponse(document)

    return router
