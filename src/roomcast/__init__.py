"""roomcast: a real-time WebSocket server and library for Python, on FastAPI and uvicorn."""

from __future__ import annotations

from roomcast.client import connect
from roomcast.closecodes import CloseCode
from roomcast.core.hub import Hub
from roomcast.core.node import Node
from roomcast.errors import (
    ClientError,
    ConfigurationError,
    InvalidPayload,
    MessageTooBig,
    PolicyViolation,
    RoomcastError,
    UnsupportedData,
)
from roomcast.factory import create_app
from roomcast.settings import Settings
from roomcast.version import __version__

__all__ = [
    "ClientError",
    "CloseCode",
    "ConfigurationError",
    "Hub",
    "InvalidPayload",
    "MessageTooBig",
    "Node",
    "PolicyViolation",
    "RoomcastError",
    "Settings",
    "UnsupportedData",
    "__version__",
    "connect",
    "create_app",
]
