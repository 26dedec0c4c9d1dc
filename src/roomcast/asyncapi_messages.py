"""The ``/ws`` frames (docs/protocol.md) as pydantic models, for ``GET /asyncapi.json``.

Their JSON Schemas are the payloads of the ``/ws`` messages in the AsyncAPI document
(:mod:`roomcast.asyncapi`): :func:`message_schemas` makes its ``components.schemas``. The
models describe the frames; the server does not parse with them (its codec is
:mod:`roomcast.codecs.roomcast_json`), and ``tests/test_asyncapi.py`` checks real frames
against these schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints, create_model
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from roomcast.codecs.roomcast_json import (
    CHANNEL_CHARS,
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    MAX_ID_LENGTH,
    OPS,
    ErrorCode,
)
from roomcast.settings import Settings
from roomcast.version import __version__

__all__ = [
    "COMPONENT",
    "ERROR_CODES",
    "PUSHES",
    "REQUESTS",
    "RESULTS",
    "message_schemas",
]

#: Where a schema of ``components.schemas`` is: a JSON Reference template.
COMPONENT: Final = "#/components/schemas/{model}"


class ChannelName(RootModel[str]):
    """A channel name; its schema is made per server (``ROOMCAST_CHANNEL_MAX_LENGTH``)."""


RequestId = Annotated[
    int | Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)],
    Field(description="Chosen by the client; the reply carries it back."),
]
ClientId = Annotated[
    str, Field(pattern="^[0-9a-f]{12}$", description="A connection's id (12 hex digits).")
]
User = Annotated[str | None, Field(description="The user; null for anonymous clients.")]


class _Request(BaseModel):
    # Fields an operation does not know are ignored (newer clients, older servers).
    model_config = ConfigDict(extra="allow")

    id: RequestId


class Recover(BaseModel):
    offset: int = Field(ge=0, description="The offset of the last publication the client saw.")
    epoch: str = Field(description="The epoch that offset belongs to.")


class SubscribeRequest(_Request):
    op: Literal["subscribe"]
    channel: ChannelName
    recover: Recover | None = Field(None, description="Replay what was missed since then.")
    join_leave: bool = Field(False, description="Also push join/leave events of this channel.")


class UnsubscribeRequest(_Request):
    op: Literal["unsubscribe"]
    channel: ChannelName


class PublishRequest(_Request):
    op: Literal["publish"]
    channel: ChannelName
    data: Any = Field(description="Any JSON value; stored and delivered as sent.")


class PresenceRequest(_Request):
    op: Literal["presence"]
    channel: ChannelName


class HistoryRequest(_Request):
    op: Literal["history"]
    channel: ChannelName
    limit: int | None = Field(HISTORY_LIMIT_DEFAULT, ge=1, le=HISTORY_LIMIT_MAX)
    since: int | None = Field(None, ge=0, description="Only offsets > since, oldest first.")
    before: int | None = Field(
        None, ge=0, description="Only offsets < before, the newest; not with since."
    )


class PingRequest(_Request):
    op: Literal["ping"]


class AuthRequest(_Request):
    op: Literal["auth"]
    token: str = Field(description="A JWT or a static token (ROOMCAST_TOKENS).")


class Info(BaseModel):
    """Who published, joined or left (both null for publications of the HTTP API)."""

    client: ClientId | None
    user: User


class Position(BaseModel):
    epoch: str = Field(description="Names the channel's history stream.")
    offset: int = Field(ge=0, description="The channel's latest offset (0: none yet).")


class SubscribeResult(Position):
    recovered: bool | SkipJsonSchema[None] = Field(
        None, description="Only with recover: every missed publication is replayed."
    )
    replayed: int | SkipJsonSchema[None] = Field(
        None, ge=0, description="Only with recover: publication pushes that follow the reply."
    )


class PublishResult(Position):
    pass


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PresenceClient(BaseModel):
    client: ClientId
    user: User
    connected_at: str = Field(json_schema_extra={"format": "date-time"})


class PresenceResult(BaseModel):
    clients: list[PresenceClient]


class PublicationPush(BaseModel):
    """A publication on a channel this connection is subscribed to."""

    type: Literal["publication"]
    channel: ChannelName
    offset: int = Field(ge=1)
    data: Any
    info: Info


class HistoryResult(Position):
    start: int = Field(ge=1, description="The lowest offset the history still holds.")
    publications: list[PublicationPush]


class AuthResult(BaseModel):
    user: str
    expires_at: int | None = Field(description="Unix seconds; null: the token does not expire.")


class ConnectedPush(BaseModel):
    """The first frame of every connection."""

    type: Literal["connected"]
    client: ClientId
    user: User
    version: str = Field(examples=[__version__])


class JoinPush(BaseModel):
    """Another client subscribed (for subscriptions made with join_leave)."""

    type: Literal["join"]
    channel: ChannelName
    info: Info


class LeavePush(BaseModel):
    """A client unsubscribed or disconnected (for subscriptions made with join_leave)."""

    type: Literal["leave"]
    channel: ChannelName
    info: Info


class RefreshPush(BaseModel):
    """The token expires soon: send a fresh one with auth, or be closed with 4003."""

    type: Literal["refresh"]
    expires_at: int = Field(description="Unix seconds.")


class UnsubscribedPush(BaseModel):
    """The server ended a subscription: the connection's new token does not allow it."""

    type: Literal["unsubscribed"]
    channel: ChannelName
    reason: str


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str


class ErrorReply(BaseModel):
    """A request that failed, or a frame that is no request (id null when none was read)."""

    id: RequestId | None
    ok: Literal[False]
    error: ErrorBody


REQUESTS: Final[dict[str, type[BaseModel]]] = {
    "subscribe": SubscribeRequest,
    "unsubscribe": UnsubscribeRequest,
    "publish": PublishRequest,
    "presence": PresenceRequest,
    "history": HistoryRequest,
    "ping": PingRequest,
    "auth": AuthRequest,
}
RESULTS: Final[dict[str, type[BaseModel]]] = {
    "subscribe": SubscribeResult,
    "unsubscribe": Empty,
    "publish": PublishResult,
    "presence": PresenceResult,
    "history": HistoryResult,
    "ping": Empty,
    "auth": AuthResult,
}
PUSHES: Final[dict[str, type[BaseModel]]] = {
    "connected": ConnectedPush,
    "publication": PublicationPush,
    "join": JoinPush,
    "leave": LeavePush,
    "refresh": RefreshPush,
    "unsubscribed": UnsubscribedPush,
}
#: ``ErrorCode`` members carry no docs of their own: docs/protocol.md, "Error codes".
ERROR_CODES: Final[dict[ErrorCode, str]] = {
    ErrorCode.BAD_REQUEST: "not a JSON object, no valid id, binary, or a field missing or wrong",
    ErrorCode.UNKNOWN_OP: "op is not one of the operations",
    ErrorCode.BAD_CHANNEL: "the channel name is missing, not a string, or breaks the rule",
    ErrorCode.TOO_LARGE: "data is over ROOMCAST_MAX_PUBLICATION_SIZE bytes",
    ErrorCode.ALREADY_SUBSCRIBED: "subscribe to a channel this connection is subscribed to",
    ErrorCode.NOT_SUBSCRIBED: "unsubscribe from a channel it is not subscribed to",
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: "a subscription beyond ROOMCAST_MAX_SUBSCRIPTIONS",
    ErrorCode.UNAUTHORIZED: "auth with a token that does not verify",
    ErrorCode.FORBIDDEN: "no permission for this channel and op, or auth for another user",
    ErrorCode.RATE_LIMITED: "over ROOMCAST_RATE_LIMIT; the request was not handled",
    ErrorCode.UNAVAILABLE: "the broker cannot be reached right now; retry later",
    ErrorCode.INTERNAL: "the server failed (details in its log)",
}


def _reply_model(op: str) -> type[BaseModel]:
    result = RESULTS.get(op, Empty)
    return create_model(
        f"{op.capitalize()}Reply",
        __doc__=f"The reply to a successful {op} request.",
        id=(RequestId, ...),
        ok=(Literal[True], ...),
        result=(result, ...),
    )


def _generic_request(op: str) -> type[BaseModel]:
    """For an op of ``OPS`` not described in :data:`REQUESTS` (the test catches it)."""
    return create_model(
        f"{op.capitalize()}Request",
        __base__=_Request,
        op=(Literal[op], ...),
    )


def message_schemas(settings: Settings) -> dict[str, Any]:
    """``components.schemas``: every /ws model, the channel-name rule and the error codes."""
    models: list[type[BaseModel]] = [REQUESTS.get(op) or _generic_request(op) for op in OPS]
    models += [_reply_model(op) for op in OPS]
    models += [ErrorReply, *PUSHES.values()]
    _, top = models_json_schema([(model, "validation") for model in models], ref_template=COMPONENT)
    schemas: dict[str, Any] = top.get("$defs", {})
    length = settings.channel_max_length
    schemas["ChannelName"] = {
        "type": "string",
        "title": "ChannelName",
        "pattern": f"^[{CHANNEL_CHARS}]{{1,{length}}}$",
        "minLength": 1,
        "maxLength": length,
        "description": "The part before the first `:` is the namespace (`chat:lobby`).",
    }
    schemas["ErrorCode"] = {
        "type": "string",
        "title": "ErrorCode",
        "enum": [code.value for code in ErrorCode],
        "description": "\n".join(
            f"- `{code.value}`: {ERROR_CODES.get(code, code.name.lower())}" for code in ErrorCode
        ),
    }
    return schemas
