"""roomcast's own WebSocket transport for uvicorn: sans-I/O framing and handshake, and the
asyncio protocol that joins them to ASGI (with the ``roomcast.frames`` extension)."""

from roomcast.transport.protocol import (
    FRAMES_EXTENSION,
    RoomcastWebSocketProtocol,
    protocol_class,
)

__all__ = ["FRAMES_EXTENSION", "RoomcastWebSocketProtocol", "protocol_class"]
