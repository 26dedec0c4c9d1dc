"""The server-side HTTP API: publish, broadcast, channels, presence, history, disconnect.

For the application's own backend. Off unless ``ROOMCAST_API_KEY`` is set; every request then
carries the key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The key is checked
from the request head by :func:`api_gate` (in :class:`~roomcast.http.bodies.BodyGuard`)
before any body is read, and again by the routes' dependency.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from pydantic import BaseModel, Field
from starlette.types import Scope

from roomcast.codecs.roomcast_json import (
    CODEC,
    RequestError,
    channel_pattern,
    channel_rule,
    encode_data,
    encode_info,
    history_result,
)
from roomcast.core.node import Node
from roomcast.http.bodies import Gate, Refusal, header, route_path
from roomcast.settings import Settings

__all__ = ["api_gate", "api_router", "key_refusal"]

#: Publications made through the API name no client and no user.
API_INFO = encode_info(None, None)


class PublishBody(BaseModel):
    channel: str = Field(description="The channel to publish to.", examples=["chat:lobby"])
    data: Any = Field(description="Any JSON value; delivered as sent.", examples=[{"text": "hi"}])


class BroadcastBody(BaseModel):
    channels: list[str] = Field(min_length=1, max_length=1000, description="Channels.")
    data: Any = Field(description="Any JSON value, published to each channel.")


class DisconnectBody(BaseModel):
    user: str = Field(min_length=1, description="Close every /ws connection of this user.")


class PositionOut(BaseModel):
    epoch: str
    offset: int


class ChannelPositionOut(PositionOut):
    channel: str


class BroadcastOut(BaseModel):
    results: list[ChannelPositionOut]


class ChannelOut(BaseModel):
    channel: str
    subscribers: int


class ChannelsOut(BaseModel):
    channels: list[ChannelOut]


class PresenceClient(BaseModel):
    client: str
    user: str | None
    connected_at: str


class PresenceOut(BaseModel):
    clients: list[PresenceClient]


class PublicationOut(BaseModel):
    type: str = "publication"
    channel: str
    offset: int
    data: Any
    info: dict[str, str | None]


class HistoryOut(BaseModel):
    epoch: str
    offset: int
    start: int
    publications: list[PublicationOut]


class DisconnectOut(BaseModel):
    disconnected: int


def key_refusal(
    settings: Settings, authorization: str | None, x_api_key: str | None
) -> Refusal | None:
    """Why a request with these headers may not use the API (404: off; 401: no or a wrong
    key), or ``None``."""
    if settings.api_key is None:
        return Refusal(404, "the HTTP API is off: set ROOMCAST_API_KEY to turn it on")
    given = x_api_key
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
    expected = settings.api_key.get_secret_value().encode()
    # Bytes as sent (latin-1, as ASGI gives them): no encoding error for any header value.
    if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), expected):
        return Refusal(401, "a valid API key is required", {"WWW-Authenticate": "Bearer"})
    return None


def api_gate(settings: Settings) -> Gate:
    """The key check of every ``/api/...`` request, from its head (before its body is read)."""

    def gate(scope: Scope) -> Refusal | None:
        if not route_path(scope).startswith("/api/"):
            return None
        return key_refusal(settings, header(scope, b"authorization"), header(scope, b"x-api-key"))

    return gate


def api_router(node: Node) -> APIRouter:
    """The ``/api`` routes of ``node``: every call goes through the node, as ``/ws``'s do."""
    settings = node.settings
    name_pattern = channel_pattern(settings.channel_max_length)
    name_rule = channel_rule(settings.channel_max_length)

    def require_key(
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
        x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> None:
        refusal = key_refusal(settings, authorization, x_api_key)
        if refusal is not None:
            raise HTTPException(refusal.status, refusal.detail, headers=refusal.headers or None)

    router = APIRouter(prefix="/api", tags=["server API"], dependencies=[Depends(require_key)])

    def channel_ok(channel: str) -> str:
        if name_pattern.fullmatch(channel) is None:
            raise HTTPException(422, name_rule)
        return channel

    def data_ok(data: Any) -> bytes:
        try:
            return encode_data(data, settings.max_publication_size)
        except RequestError as error:
            raise HTTPException(422, error.message) from None

    @router.post("/publish", summary="Publish to a channel")
    async def publish(body: PublishBody) -> PositionOut:
        channel = channel_ok(body.channel)
        position = await node.publish(channel, data_ok(body.data), API_INFO)
        return PositionOut(epoch=position.epoch, offset=position.offset)

    @router.post("/broadcast", summary="Publish the same data to many channels")
    async def broadcast(body: BroadcastBody) -> BroadcastOut:
        channels = [channel_ok(channel) for channel in body.channels]
        data = data_ok(body.data)
        results = []
        for channel in channels:
            position = await node.publish(channel, data, API_INFO)
            results.append(
                ChannelPositionOut(channel=channel, epoch=position.epoch, offset=position.offset)
            )
        return BroadcastOut(results=results)

    @router.get("/channels", summary="Channels with at least one subscriber")
    async def channels() -> ChannelsOut:
        counts = await node.channels()
        return ChannelsOut(
            channels=[ChannelOut(channel=name, subscribers=n) for name, n in sorted(counts.items())]
        )

    @router.get("/presence/{channel}", summary="Who is subscribed to a channel")
    async def presence(channel: str) -> PresenceOut:
        clients = await node.presence(channel_ok(channel))
        return PresenceOut.model_validate({"clients": clients})

    @router.get(
        "/history/{channel}",
        summary="Stored publications of a channel",
        response_model=HistoryOut,
    )
    async def history(
        channel: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        since: Annotated[int | None, Query(ge=0)] = None,
        before: Annotated[int | None, Query(ge=0)] = None,
    ) -> Response:
        if since is not None and before is not None:
            raise HTTPException(422, "give 'since' or 'before', not both")
        channel = channel_ok(channel)
        page = await node.history(channel, since=since, before=before, limit=limit)
        # Encoded as /ws sends them, without a model per publication. A page is bounded in
        # bytes as on /ws (HISTORY_PAGE_BYTES): it may hold fewer than `limit`.
        frames = [CODEC.publication(channel, publication) for publication in page.publications]
        body = history_result(
            page.epoch, page.offset, page.start, frames, keep_newest=since is None
        )
        return Response(body, media_type="application/json")

    @router.post("/disconnect", summary="Close every /ws connection of a user (close 4001)")
    async def disconnect(body: DisconnectBody) -> DisconnectOut:
        return DisconnectOut(disconnected=await node.disconnect_user(body.user))

    return router
