"""The ``/ws`` protocol's wire format, sans I/O: parse requests, check fields, encode frames.

The spec is ``docs/protocol.md``. Nothing here touches a socket or the event loop, so every
rule can be tested on plain values. Frames the server sends are built as bytes: a publication
is encoded once per node (by :data:`CODEC`, when it reaches the channel hub) and the same bytes
go to every subscriber; history replies embed the encoded publications as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import orjson

from roomcast.brokers.base import Publication

__all__ = [
    "CODEC",
    "HISTORY_LIMIT_DEFAULT",
    "HISTORY_LIMIT_MAX",
    "HISTORY_PAGE_BYTES",
    "OPS",
    "ErrorCode",
    "Request",
    "RequestError",
    "RoomcastJsonCodec",
    "channel_pattern",
    "channel_rule",
    "connected_frame",
    "encode_data",
    "encode_info",
    "error_reply",
    "event_frame",
    "history_result",
    "lossy_numbers",
    "ok_reply",
    "parse_request",
    "publication_frame",
    "utc_now",
]

OPS: Final = ("subscribe", "unsubscribe", "publish", "presence", "history", "ping", "auth")
MAX_ID_LENGTH: Final = 64
#: ``history``'s ``limit``: its default, and the most one request may ask for.
HISTORY_LIMIT_DEFAULT: Final = 100
HISTORY_LIMIT_MAX: Final = 1000
#: The characters of a channel name; the part before the first ":" is its namespace.
CHANNEL_CHARS: Final = "A-Za-z0-9_.:@=-"


class ErrorCode(StrEnum):
    """The ``error.code`` of a failed request (docs/protocol.md, "Error codes")."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    BAD_CHANNEL = "bad_channel"
    TOO_LARGE = "too_large"
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class RequestError(Exception):
    """A request the server answers with ``ok: false``; the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: its id, its operation and the whole object (the operation's fields)."""

    id: int | str
    op: str
    body: dict[str, Any]
    #: The frame as received.
    text: str

    # -- field readers: each raises RequestError(bad_request) naming the field --------------

    def string(self, name: str) -> str:
        value = self.body.get(name)
        if not isinstance(value, str):
            raise self._bad(f"'{name}' must be a string")
        return value

    def integer(
        self, name: str, *, low: int, high: int | None = None, default: int | None = None
    ) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        # bool is an int subclass in Python, but true is not a number in JSON.
        if type(value) is not int or value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise self._bad(f"'{name}' must be an integer {bounds}")
        return value

    def boolean(self, name: str, *, default: bool = False) -> bool:
        value = self.body.get(name, default)
        if type(value) is not bool:
            raise self._bad(f"'{name}' must be true or false")
        return value

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._bad(f"'{name}' must be an object")
        return value

    def _bad(self, message: str) -> RequestError:
        return RequestError(ErrorCode.BAD_REQUEST, message, self.id)


def parse_request(frame: str | bytes) -> Request:
    """Parse one client frame; raises :class:`RequestError` with the id when one was read."""
    if isinstance(frame, bytes):
        raise RequestError(ErrorCode.BAD_REQUEST, "binary frames are not part of the protocol")
    try:
        body = orjson.loads(frame)
    except orjson.JSONDecodeError as error:
        raise RequestError(ErrorCode.BAD_REQUEST, f"invalid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    request_id = body.get("id")
    if not (
        type(request_id) is int
        or (type(request_id) is str and 0 < len(request_id) <= MAX_ID_LENGTH)
    ):
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"'id' must be an integer or a string of 1-{MAX_ID_LENGTH} characters",
        )
    op = body.get("op")
    if not isinstance(op, str):
        raise RequestError(ErrorCode.BAD_REQUEST, "'op' must be a string", request_id)
    if op not in OPS:
        raise RequestError(
            ErrorCode.UNKNOWN_OP,
            f"unknown op {op[:64]!r}; expected one of {', '.join(OPS)}",
            request_id,
        )
    return Request(request_id, op, body, frame)


#: 19 digits in a row: the shortest integer literal that may not fit in 64 bits.
_LONG_NUMBER = re.compile(r"\d{19}")
#: An integer literal (no fraction, no exponent) of 19 digits or more.
_INTEGER_LITERAL = re.compile(r"(?<![\d.eE+-])-?\d{19,}(?![\d.eE])")


def lossy_numbers(text: str, value: object) -> bool:
    """Whether parsing ``text`` into ``value`` turned an integer beyond 64 bits into a float.

    orjson reads such integers as floats, silently; ``data`` must be delivered as sent, so the
    server refuses them instead. The scan for a long run of digits keeps this off the common
    path; only then is ``value`` walked.
    """
    if _LONG_NUMBER.search(text) is None:
        return False
    # The integer literals too large for 64 bits, as orjson turned them into floats. (A float
    # such as 1e19 written as a float is no loss; the literals may also sit inside strings,
    # which is why the parsed value is walked for them.)
    lost = {
        float(literal)
        for literal in _INTEGER_LITERAL.findall(text)
        if not -(2**63) <= int(literal) < 2**64
    }
    if not lost:
        return False
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            if item in lost:
                return True
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.values())
    return False


def channel_pattern(max_length: int) -> re.Pattern[str]:
    """The rule for channel names of at most ``max_length`` characters."""
    return re.compile(f"[{CHANNEL_CHARS}]{{1,{max_length}}}")


def channel_rule(max_length: int) -> str:
    """The rule as a sentence, for error messages."""
    return f"channel names are 1-{max_length} characters of A-Z a-z 0-9 _ - . : @ ="


# -- frames the server sends ---------------------------------------------------------------


def ok_reply(request_id: int | str, result: bytes) -> bytes:
    """``{"id": ..., "ok": true, "result": <result>}`` around an encoded result."""
    return b'{"id":' + orjson.dumps(request_id) + b',"ok":true,"result":' + result + b"}"


def error_reply(request_id: int | str | None, code: ErrorCode, message: str) -> bytes:
    """``{"id": ..., "ok": false, "error": {"code": ..., "message": ...}}``."""
    return orjson.dumps(
        {"id": request_id, "ok": False, "error": {"code": code.value, "message": message}}
    )


def encode_info(client: str | None, user: str | None) -> bytes:
    """The ``info`` object naming a publisher, or who joined or left."""
    return orjson.dumps({"client": client, "user": user})


def publication_frame(channel: str, offset: int, data: bytes, info: bytes) -> bytes:
    """A ``publication`` push; ``data`` and ``info`` are already-encoded JSON."""
    return (
        b'{"type":"publication","channel":'
        + orjson.dumps(channel)
        + b',"offset":%d,"data":' % offset
        + data
        + b',"info":'
        + info
        + b"}"
    )


def encode_data(value: Any, limit: int, request_id: int | str | None = None) -> bytes:
    """A publication's ``data`` as JSON, checked against the publication size ``limit``."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as error:
        # Only from the HTTP API, whose JSON parser takes integers of any size.
        raise RequestError(ErrorCode.BAD_REQUEST, f"data: {error}", request_id) from None
    if len(data) > limit:
        raise RequestError(
            ErrorCode.TOO_LARGE, f"data is {len(data)} bytes; the limit is {limit}", request_id
        )
    return data


def event_frame(kind: str, channel: str, info: bytes) -> bytes:
    """A ``join`` or ``leave`` push."""
    return b'{"type":"%s","channel":%s,"info":%s}' % (kind.encode(), orjson.dumps(channel), info)


def refresh_frame(expires_at: float) -> bytes:
    """The ``refresh`` push: the connection's token expires at ``expires_at`` (Unix time)."""
    return orjson.dumps({"type": "refresh", "expires_at": int(expires_at)})


def unsubscribed_frame(channel: str, reason: str) -> bytes:
    """The ``unsubscribed`` push: the server ended the subscription to ``channel``."""
    return orjson.dumps({"type": "unsubscribed", "channel": channel, "reason": reason})


def connected_frame(client: str, user: str | None, version: str) -> bytes:
    """The first push of every connection."""
    return orjson.dumps({"type": "connected", "client": client, "user": user, "version": version})


#: The most a ``history`` result holds, in bytes of JSON: with its reply's envelope (an id is at
#: most 64 characters) the frame stays within 1 MiB, the message size limit common clients have
#: by default (the websockets library's ``max_size``), and one request cannot make the server
#: build a reply of ``limit`` x the publication size limit.
HISTORY_PAGE_BYTES: Final = (1 << 20) - 1024


def history_result(
    epoch: str,
    offset: int,
    start: int,
    publications: Sequence[bytes],
    *,
    max_bytes: int = HISTORY_PAGE_BYTES,
    keep_newest: bool = False,
) -> bytes:
    """The result of ``history``: stored publication frames embedded as they are.

    It holds as many of ``publications`` (oldest first) as fit in ``max_bytes``, and at least
    one, so that a client paging on always moves on: the oldest of them for a page forwards
    (``since``), the newest with ``keep_newest`` (``before``, or the latest page).
    """
    head = b'{"epoch":%s,"offset":%d,"start":%d,"publications":[' % (
        orjson.dumps(epoch),
        offset,
        start,
    )
    room = max_bytes - len(head) - 2
    order = reversed(publications) if keep_newest else iter(publications)
    taken = 0
    for frame in order:
        room -= len(frame) + 1  # the frame and its comma
        if room < 0 and taken:
            break
        taken += 1
    if taken < len(publications):
        dropped = len(publications) - taken
        publications = publications[dropped:] if keep_newest else publications[:taken]
    return head + b",".join(publications) + b"]}"


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. ``2026-11-26T13:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RoomcastJsonCodec:
    """The ``/ws`` wire format as the channel hub sees it: publications and events to frames."""

    __slots__ = ()

    name: Final = "roomcast-json"
    #: Frames are text (JSON).
    text: Final = True

    def publication(self, channel: str, publication: Publication) -> bytes:
        """The ``publication`` push of ``publication`` on ``channel``."""
        return publication_frame(channel, publication.offset, publication.data, publication.info)

    def event(self, channel: str, kind: str, info: bytes) -> bytes:
        """The ``join`` or ``leave`` push."""
        return event_frame(kind, channel, info)


#: The one instance: the hub groups subscribers by codec, one encoding per group.
CODEC: Final = RoomcastJsonCodec()
