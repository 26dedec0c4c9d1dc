"""roomcast's exceptions.

Every error a client can cause carries the close code it ends the connection with::

    RoomcastError
    └── ClientError          (the client did something the endpoint does not accept)
        ├── UnsupportedData  1003  wrong frame type
        ├── InvalidPayload   1007  e.g. invalid JSON
        ├── PolicyViolation  1008  e.g. a query parameter out of bounds
        ├── MessageTooBig    1009  over ROOMCAST_MAX_MESSAGE_SIZE
        └── RateLimited      1008  over ROOMCAST_RATE_LIMIT (the frame is kept)
    ConfigurationError       a setting that cannot work (not tied to a connection)
"""

from __future__ import annotations

from roomcast.closecodes import CloseCode

__all__ = [
    "ClientError",
    "ConfigurationError",
    "InvalidPayload",
    "MessageTooBig",
    "PolicyViolation",
    "RateLimited",
    "RoomcastError",
    "UnsupportedData",
]


class RoomcastError(Exception):
    """Root of every roomcast exception."""


class ConfigurationError(RoomcastError):
    """The settings describe a server that cannot work as asked."""


class ClientError(RoomcastError):
    """A client broke an endpoint's rules; the connection ends with :attr:`close_code`."""

    close_code: CloseCode = CloseCode.POLICY_VIOLATION

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        #: Sent in the close frame; RFC 6455 section 5.5 limits it to 123 bytes.
        self.reason = reason.encode()[:123].decode(errors="ignore")


class UnsupportedData(ClientError):
    """A binary frame where text is expected, or the reverse."""

    close_code = CloseCode.UNSUPPORTED_DATA


class InvalidPayload(ClientError):
    """A message whose content the endpoint cannot accept, such as invalid JSON."""

    close_code = CloseCode.INVALID_PAYLOAD


class PolicyViolation(ClientError):
    """A request the endpoint refuses by policy, such as a parameter out of bounds."""

    close_code = CloseCode.POLICY_VIOLATION


class MessageTooBig(ClientError):
    """A message larger than the configured maximum."""

    close_code = CloseCode.MESSAGE_TOO_BIG


class RateLimited(PolicyViolation):
    """A message over the connection's rate limit; :attr:`frame` is the refused message.

    The classic endpoints close with 1008; ``/ws`` answers it with a ``rate_limited`` error
    and closes with 4029 only if the client keeps on.
    """

    def __init__(self, reason: str, frame: str | bytes) -> None:
        super().__init__(reason)
        self.frame = frame
