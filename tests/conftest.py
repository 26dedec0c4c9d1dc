"""Fixtures: in-process servers on both WebSocket implementations, and real server processes.

Endpoint tests use the in-process ones (tests/servers.py): ``server`` (default settings, one
per module and transport) and ``start_server`` (special settings, one test). Both follow the
module's ``ws_impl``, so every such test runs on roomcast's transport and on uvicorn's
``websockets-sansio``. Their tests run in the module's event loop
(``pytestmark = pytest.mark.asyncio(loop_scope="module")``). Tests where the process matters
(the CLI, workers, signals, Redis chaos, nginx, the browser) use ``process_server`` and
``server_factory``: ``roomcast serve`` subprocesses (tests/helpers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from helpers import RoomcastServer, ServerFactory
from servers import TRANSPORTS, AppServer, ServerStarter, serve

# The guide's client scripts are run as subprocesses, never imported.
collect_ignore = ["guide_clients"]


@pytest.fixture(scope="module", params=list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def ws_impl(request: pytest.FixtureRequest) -> str:
    """The WebSocket implementation of this module's in-process servers (``Settings.ws``)."""
    return str(request.param)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(ws_impl: str) -> AsyncIterator[AppServer]:
    """An in-process server with the suite's settings, shared by the tests of one module."""
    async with serve(ws_impl) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def start_server(ws_impl: str) -> AsyncIterator[ServerStarter]:
    """Start in-process servers with special settings: ``await start_server(**settings)``."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> AppServer:
            return await stack.enter_async_context(serve(ws_impl, **overrides))

        yield start


@pytest.fixture(scope="module")
def process_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    """A ``roomcast serve`` process with default settings, shared by the tests of one module."""
    srv = RoomcastServer(tmp_path_factory.mktemp("server"))
    with srv:
        yield srv
    srv.assert_no_traceback()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``roomcast serve`` processes with special settings: ``server_factory(env={...})``."""
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
    for app in list(AppServer.live):
        app.assert_no_traceback()
