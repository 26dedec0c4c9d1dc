"""Pure pieces: settings, log redaction, the token table, close codes, the public API."""

from __future__ import annotations

import importlib
import logging
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

import roomcast
from roomcast.auth import TokenTable
from roomcast.closecodes import CloseCode
from roomcast.errors import ClientError, InvalidPayload, MessageTooBig, UnsupportedData
from roomcast.logs import RedactSecrets, redact
from roomcast.settings import Settings


def test_public_api() -> None:
    assert set(roomcast.__all__) == {
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
    }
    # Each name is the object its module defines, not merely something that is not None.
    homes = {
        "ClientError": "roomcast.errors",
        "CloseCode": "roomcast.closecodes",
        "ConfigurationError": "roomcast.errors",
        "Hub": "roomcast.core.hub",
        "InvalidPayload": "roomcast.errors",
        "MessageTooBig": "roomcast.errors",
        "Node": "roomcast.core.node",
        "PolicyViolation": "roomcast.errors",
        "RoomcastError": "roomcast.errors",
        "Settings": "roomcast.settings",
        "UnsupportedData": "roomcast.errors",
        "__version__": "roomcast.version",
        "connect": "roomcast.client",
        "create_app": "roomcast.factory",
    }
    assert set(homes) == set(roomcast.__all__)
    for name, module in homes.items():
        assert getattr(roomcast, name) is getattr(importlib.import_module(module), name), name
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        assert roomcast.__version__ == tomllib.load(f)["project"]["version"]


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOMCAST_TOKENS", '{"t1": "ann", "t2": "bob"}')
    monkeypatch.setenv("ROOMCAST_MAX_MESSAGE_SIZE", "4096")
    monkeypatch.setenv("ROOMCAST_PORT", "9001")
    settings = Settings()
    assert settings.tokens == {"t1": "ann", "t2": "bob"}
    assert settings.max_message_size == 4096
    assert settings.port == 9001
    assert Settings(port=9002).port == 9002  # explicit values win over the environment


def test_more_than_one_worker_needs_a_shared_broker() -> None:
    with pytest.raises(roomcast.ConfigurationError, match="ROOMCAST_BROKER_URL"):
        Settings(workers=2)
    assert Settings(workers=1).workers == 1


@pytest.mark.parametrize(
    "bad",
    [{"broker_url": "kafka://x"}, {"max_message_size": 0}, {"tokens": {"": "x"}}, {"port": -1}],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/ws/secure?token=abc", "/ws/secure?token=[redacted]"),
        ("/x?a=1&token=abc&b=2", "/x?a=1&token=[redacted]&b=2"),
        ("/x?ACCESS_TOKEN=abc", "/x?ACCESS_TOKEN=[redacted]"),
        ("/x?tokens=abc", "/x?tokens=abc"),
        ("no query", "no query"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redaction_filter_rewrites_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s"', ("1.2.3.4", "/q?token=s3"), None
    )
    assert RedactSecrets().filter(record)
    assert "s3" not in record.getMessage()


def test_token_table() -> None:
    table = TokenTable({"secret-token": "authenticated_user"})
    assert table.generated is None
    assert table.user("secret-token") == "authenticated_user"
    assert table.user("secret-token ") is None
    assert table.user("") is None
    assert table.user(None) is None


def test_token_table_generates_a_token_when_none_is_configured() -> None:
    first, second = TokenTable({}), TokenTable({})
    assert first.generated
    assert second.generated
    assert first.generated != second.generated
    assert len(first.generated) >= 32
    assert first.user(first.generated) == "authenticated_user"
    assert first.user("secret-token") is None


def test_errors_carry_their_close_codes() -> None:
    assert UnsupportedData("x").close_code == CloseCode.UNSUPPORTED_DATA == 1003
    assert InvalidPayload("x").close_code == 1007
    assert MessageTooBig("x").close_code == 1009
    # a close reason must fit a control frame (RFC 6455 section 5.5: 125 bytes with the code)
    assert len(ClientError("é" * 200).reason.encode()) <= 123


def test_close_payload_cuts_the_reason_on_a_character_boundary() -> None:
    from roomcast.transport.frames import build_close_payload, parse_close_payload

    payload = build_close_payload(1000, "é" * 100)
    assert len(payload) <= 125
    code, reason = parse_close_payload(payload)  # raises if the cut split a character
    assert code == 1000
    assert reason == "é" * 61
