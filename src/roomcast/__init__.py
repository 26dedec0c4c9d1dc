"""roomcast: a real-time WebSocket server and library for Python, on FastAPI and uvicorn."""

from __future__ import annotations

__version__ = "0.2.0"

from roomcast.client import connect
from roomcast.closecodes import CloseCode
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
from roomcast.hub import Hub
from roomcast.settings import Settings

__all__ = [
    "ClientError",
    "CloseCode",
    "ConfigurationError",
    "Hub",
    "InvalidPayload",
    "MessageTooBig",
    "PolicyViolation",
    "RoomcastError",
    "Settings",
    "UnsupportedData",
    "__version__",
    "connect",
    "create_app",
]
