"""Fixtures for the real-server tests: a shared default server and a factory for special ones."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from helpers import RoomcastServer, ServerFactory

# The guide's client scripts are run as subprocesses, never imported.
collect_ignore = ["guide_clients"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    """A roomcast server with default settings, shared by the tests of one module."""
    srv = RoomcastServer(tmp_path_factory.mktemp("server"))
    with srv:
        yield srv
    srv.assert_no_traceback()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with special settings: ``server_factory(env={...}, **kwargs)``."""
    servers: list[RoomcastServer] = []

    def make(env: Mapping[str, str | None] | None = None, **kwargs: Any) -> RoomcastServer:
        srv = RoomcastServer(tmp_path / f"server{len(servers)}", env=env, **kwargs)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in reversed(servers):
        srv.stop()
    for srv in servers:
        srv.assert_no_traceback()


@pytest.fixture(autouse=True)
def _no_traceback_in_live_servers() -> Iterator[None]:
    """No test may leave a traceback in the log of any server still running."""
    yield
    for srv in list(RoomcastServer.live):
        srv.assert_no_traceback()
