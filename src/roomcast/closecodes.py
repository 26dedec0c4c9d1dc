"""WebSocket close codes used by roomcast, in one place.

Codes 1000-1015 are defined by RFC 6455 section 7.4.1 and the IANA registry; 4000-4999 are
reserved for applications (RFC 6455 section 7.4.2), where the `/ws` protocol's own codes live.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CloseCode"]


class CloseCode(IntEnum):
    """A close code with the reason roomcast sends it."""

    #: The exchange is complete (e.g. ``/ws/stream`` sent its last message).
    NORMAL = 1000
    #: The peer is going away (browser tab closed, server shutting down).
    GOING_AWAY = 1001
    #: The peer broke the WebSocket framing rules.
    PROTOCOL_ERROR = 1002
    #: A frame of a type the endpoint does not take (binary on a text endpoint, or the reverse).
    UNSUPPORTED_DATA = 1003
    #: No close code was present (never sent on the wire; RFC 6455 section 7.1.5).
    NO_STATUS = 1005
    #: The connection dropped without a close frame (never sent on the wire).
    ABNORMAL = 1006
    #: The payload is not what the endpoint accepts (invalid JSON, invalid UTF-8).
    INVALID_PAYLOAD = 1007
    #: The handshake or a message broke a policy (bad token).
    POLICY_VIOLATION = 1008
    #: A message over ``ROOMCAST_MAX_MESSAGE_SIZE``.
    MESSAGE_TOO_BIG = 1009
    #: The server hit an unexpected condition, or the peer stopped answering pings.
    INTERNAL_ERROR = 1011
    #: The server is restarting (graceful shutdown); reconnect shortly.
    SERVICE_RESTART = 1012
    #: The client could not keep up (its outbox overflowed); reconnect and read faster.
    TRY_AGAIN_LATER = 1013
    #: ``/ws``: the connection was closed through the HTTP API (``POST /api/disconnect``);
    #: clients should not reconnect on their own.
    DISCONNECTED = 4001
    #: ``/ws``: the connection neither authenticated nor subscribed within
    #: ``ROOMCAST_AUTH_TIMEOUT``.
    AUTH_TIMEOUT = 4002
    #: ``/ws``: the connection's token expired and no fresh one came (``auth``) in time.
    TOKEN_EXPIRED = 4003
    #: ``/ws``: the client read too slowly (its outbox overflowed); reconnect and recover.
    SLOW = 4008
    #: ``/ws``: the user or the IP address already holds the most connections allowed.
    TOO_MANY_CONNECTIONS = 4009
    #: ``/ws``: the client kept sending over ``ROOMCAST_RATE_LIMIT`` after being told.
    RATE_LIMITED = 4029
