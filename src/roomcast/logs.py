"""Logging helpers: secrets never reach a log line; only the CLI configures handlers."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = [
    "JsonFormatter",
    "RedactSecrets",
    "announce_generated_token",
    "install_redaction",
    "log_safe",
    "logging_config",
]

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


#: ``conn=<id>``: how every log line about a connection names it.
_CONN = re.compile(r"\bconn=([0-9a-zA-Z]+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, and ``conn`` (the
    connection id) when the line is about a connection; ``exc`` holds a traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        conn = _CONN.search(message)
        if conn is not None:
            entry["conn"] = conn.group(1)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def announce_generated_token(token: str, log_format: str) -> None:
    """Show the token made up at start, once, on the console: never as a log record.

    Logs are shipped and kept; a console banner is for the person who started the server.
    With JSON logs (a deployment, not a person) the token is not shown at all.
    """
    if log_format == "json":
        logging.getLogger("roomcast.app").warning(
            "no ROOMCAST_TOKENS configured: one was generated for /ws and /ws/secure and is "
            "shown only with --log-format text; set ROOMCAST_TOKENS to choose your own"
        )
        return
    sys.stderr.write(
        "roomcast: no ROOMCAST_TOKENS configured; "
        f"generated token for /ws and /ws/secure: {token}\n"
    )
    sys.stderr.flush()


def logging_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """uvicorn's logging config with roomcast's loggers added at ``level``; ``log_format``
    ``json`` writes JSON lines (:class:`JsonFormatter`) instead of uvicorn's text."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = {
        key: (dict(value) if isinstance(value, dict) else value)
        for key, value in LOGGING_CONFIG.items()
    }
    loggers = dict(config.get("loggers", {}))
    loggers["roomcast"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"] = loggers
    if log_format == "json":
        json_formatter = {"()": "roomcast.logs.JsonFormatter"}
        config["formatters"] = {"default": json_formatter, "access": json_formatter}
    return config
