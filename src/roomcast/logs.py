"""Logging helpers: secrets never reach a log line; only the CLI configures handlers."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["RedactSecrets", "install_redaction", "log_safe", "logging_config"]

_SECRET_PARAM = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|jwt)=)[^&\s\"']*")
_REDACTED = r"\1[redacted]"
#: uvicorn's loggers that print request lines, query string included.
_REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")


#: Control characters, which a percent-encoded path can smuggle into log lines (CWE-117).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def log_safe(text: str) -> str:
    """``text`` with control characters percent-encoded, so it cannot forge log lines."""
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", text)


def redact(text: str) -> str:
    """``text`` with the values of token-like query parameters replaced by ``[redacted]``."""
    if "=" not in text:
        return text
    return _SECRET_PARAM.sub(_REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and arguments so no token survives into a handler.

    uvicorn logs every HTTP request and WebSocket handshake with its full query string, which
    is where the guide (and browsers) put tokens.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_redaction() -> None:
    """Attach :class:`RedactSecrets` to uvicorn's request loggers, once."""
    for name in _REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config with roomcast's loggers added at ``level``."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = {
        key: (dict(value) if isinstance(value, dict) else value)
        for key, value in LOGGING_CONFIG.items()
    }
    loggers = dict(config.get("loggers", {}))
    loggers["roomcast"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"] = loggers
    return config
