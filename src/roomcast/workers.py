"""What uvicorn's worker processes import when ``roomcast serve --workers N`` runs several.

A worker process gets its configuration from the ``ROOMCAST_*`` environment, which the CLI fills
from its flags before it starts the workers; uvicorn imports the app and these protocol classes
by name in each worker.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from roomcast.metrics import prepare_multiprocess_dir
from roomcast.settings import Settings
from roomcast.transport import protocol_class
from roomcast.transport.http import http_protocol_class

__all__ = ["HttpProtocol", "WebSocketProtocol", "export_settings"]

_settings = Settings()

#: roomcast's WebSocket protocol with the close timeout of the environment's settings.
WebSocketProtocol = protocol_class(close_timeout=_settings.close_timeout)
#: uvicorn's HTTP protocol with the environment's request-head deadline.
HttpProtocol = http_protocol_class(_settings.handshake_timeout)


def export_settings(settings: Settings, generated_user: str) -> str | None:
    """Put ``settings`` into ``os.environ`` for the worker processes.

    With metrics on, this also sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory
    (removed at exit) unless the environment already sets one.
    With no tokens configured one is generated here, once, so every worker accepts the same
    token; it is returned so the caller can print it.
    """
    generated: str | None = None
    if settings.metrics and settings.workers > 1:
        # Every worker writes its metrics there and /metrics, on any worker, adds them up.
        prepare_multiprocess_dir()
    values: dict[str, Any] = settings.model_dump()
    # Guest sign-in is decided once, here, as one process would (the generated token below
    # must not turn it off), and every worker signs guest tokens with the same key.
    values["guest_channels"] = settings.guests
    if settings.guests and not settings.jwt_secret and not settings.guest_secret:
        values["guest_secret"] = secrets.token_urlsafe(32)
    if not settings.tokens:
        generated = secrets.token_urlsafe(24)
        values["tokens"] = {generated: generated_user}
    for name in ("api_key", "jwt_secret", "guest_secret"):
        secret = getattr(settings, name)
        if secret is not None:
            values[name] = secret.get_secret_value()
    for name, value in values.items():
        key = f"ROOMCAST_{name.upper()}"
        if value is None:
            os.environ.pop(key, None)
        elif isinstance(value, dict | list):
            os.environ[key] = json.dumps(value)
        elif isinstance(value, bool):
            os.environ[key] = "true" if value else "false"
        else:
            os.environ[key] = str(value)
    return generated
