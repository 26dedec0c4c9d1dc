"""In-process servers for the endpoint tests, and the ``/ws`` test peer.

:func:`serve` runs ``create_app(settings)`` under ``uvicorn.Server`` inside the running event
loop (the test's), on a free loopback port, the way uvicorn's own tests do (``tests/utils.py``
``run_server``): real sockets, real clients, no subprocess. uvicorn is configured by
``roomcast serve``'s own ``uvicorn_config`` (roomcast's HTTP protocol and, for
``ws="roomcast"``, its WebSocket transport), so the only thing missing is the process.

An in-process server serves only while its event loop runs. A test that uses a module-scoped
one runs in the module's loop (``pytestmark = pytest.mark.asyncio(loop_scope="module")``), and
blocking client code (raw sockets, a subprocess) goes through ``asyncio.to_thread``; calling a
server from a loop that is not running fails at once instead of hanging (see
:meth:`AppServer.url`).

Its log is what its loggers write while it runs (``roomcast.*``, ``uvicorn.*``, and anything
else that reaches the root logger: an asyncio "exception was never retrieved" counts),
formatted as the CLI would (JSON lines with ``log_format="json"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn
from uvicorn.config import LOG_LEVELS
from websockets.asyncio.client import ClientConnection

from helpers import (
    GOOD_TOKEN,
    HOST,
    TIMEOUT,
    USER,
    Addressed,
    await_stats,
    recv,
    ws_connect,
)
from roomcast import Settings, create_app
from roomcast.cli import uvicorn_config
from roomcast.logs import JsonFormatter

#: The WebSocket implementations every endpoint test runs on: pytest id -> ``Settings.ws``.
#: roomcast's own transport (pre-framed fan-out) and uvicorn's, where roomcast falls back to
#: plain ASGI sends.
TRANSPORTS: dict[str, str] = {"roomcast": "roomcast", "sansio": "websockets-sansio"}

#: What every test server starts from (``helpers.base_env`` gives subprocess servers the same):
#: the suite's token, and anonymous clients may use every channel without a rate limit (most
#: suites test the channel protocol, not access control; test_security.py sets its own).
SUITE_SETTINGS: dict[str, Any] = {
    "tokens": {GOOD_TOKEN: USER},
    "anonymous_subscribe": ["*"],
    "anonymous_publish": ["*"],
    "rate_limit": 0,
}

#: For a coroutine test that uses a module-scoped in-process server, in a module that also has
#: plain tests (pytest-asyncio refuses a module-wide ``pytestmark`` on a plain function).
in_server_loop = pytest.mark.asyncio(loop_scope="module")

#: The loggers whose levels, handlers and propagation a server changes while it runs.
_LOGGERS = ("roomcast", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
_TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class GivenSettings(Settings):
    """:class:`Settings` from the arguments alone: no ``ROOMCAST_*`` variable of the test
    process leaks into a server (``helpers.base_env`` strips them from subprocess servers)."""

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls: type[Any], init_settings: Any, **others: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)


def make_settings(ws: str = "roomcast", *, suite: bool = True, **overrides: Any) -> Settings:
    """Settings for an in-process server on ``ws``: the suite's (:data:`SUITE_SETTINGS`), or
    with ``suite=False`` roomcast's defaults (nothing configured), then ``overrides``."""
    values = {"host": HOST, "port": 0, **(SUITE_SETTINGS if suite else {}), "ws": ws}
    return GivenSettings.model_validate({**values, **overrides})


class _LogCapture(logging.Handler):
    """Keeps every record as the line the CLI's formatter would write."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted must not kill the server
            self.handleError(record)


@contextlib.contextmanager
def _loggers_restored() -> Iterator[None]:
    """Put the loggers a server (and uvicorn.Config) changes back as they were."""
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers[:] = handlers


class AppServer:
    """A roomcast app served by uvicorn in this process's event loop (see :func:`serve`).

    Addresses, log and ``/stats`` as :class:`helpers.RoomcastServer` has them; no process.
    """

    #: Servers running now (the suite checks their logs after every test).
    live: ClassVar[list[AppServer]] = []

    def __init__(self, settings: Settings, server: uvicorn.Server, capture: _LogCapture) -> None:
        self.settings = settings
        self.uvicorn = server
        self.loop = asyncio.get_running_loop()
        self.port = 0
        self._capture = capture
        self._http: httpx.AsyncClient | None = None

    # -- addresses ---------------------------------------------------------------------------

    def _check_loop(self) -> None:
        # A server in a loop that does not run answers nothing: the client would wait for its
        # whole timeout and fail with a misleading error. Say what is wrong instead.
        if self.loop.is_closed() or not self.loop.is_running():
            raise RuntimeError(
                "this in-process server's event loop is not running: use it from a coroutine "
                "test in the same loop (a module-scoped server needs "
                'pytestmark = pytest.mark.asyncio(loop_scope="module")), and blocking '
                "clients through asyncio.to_thread"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread (asyncio.to_thread) while the server's loop runs
        if running is not self.loop:
            raise RuntimeError("this in-process server runs in another event loop")

    @property
    def http_url(self) -> str:
        self._check_loop()
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        self._check_loop()
        return f"ws://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.ws_url}{path}"

    # -- log ---------------------------------------------------------------------------------

    def log(self) -> str:
        return "".join(f"{line}\n" for line in self._capture.lines)

    def log_offset(self) -> int:
        """A position in the log, for :meth:`log_since` (a line count)."""
        return len(self._capture.lines)

    def log_since(self, offset: int) -> str:
        return "".join(f"{line}\n" for line in self._capture.lines[offset:])

    def assert_no_traceback(self) -> None:
        text = self.log()
        assert "Traceback" not in text, f"server log contains a traceback:\n{text[-8000:]}"

    # -- stats -------------------------------------------------------------------------------

    async def astats(self) -> dict[str, int]:
        if self._http is None:
            # No keep-alive: a poll leaves no idle HTTP connection behind in the server.
            self._http = httpx.AsyncClient(
                timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)
            )
        resp = await self._http.get(f"{self.http_url}/stats")
        resp.raise_for_status()
        data: dict[str, int] = resp.json()
        return data

    async def await_stats(
        self, predicate: Callable[[dict[str, int]], bool], within: float = TIMEOUT, what: str = ""
    ) -> dict[str, int]:
        return await await_stats(self, predicate, within, what)

    async def _close_client(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


async def _run(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn exits the process when the lifespan startup or the bind fails; here that
        # is a failed start, not the end of the test session.
        raise RuntimeError(f"uvicorn gave up (exit code {exc.code})") from None


@asynccontextmanager
async def serve(
    ws: str = "roomcast",
    *,
    settings: Settings | None = None,
    port: int = 0,
    check_log: bool = True,
    **overrides: Any,
) -> AsyncIterator[AppServer]:
    """A roomcast server in this event loop: ``make_settings(ws, **overrides)``, or ``settings``.

    ``port`` 0 takes a free one (read back from the bound socket). On exit the server shuts
    down as uvicorn does on SIGTERM (connections closed, the lifespan's shutdown awaited), and
    its log must hold no traceback unless ``check_log`` is false.
    """
    if settings is None:
        settings = make_settings(ws, port=port, **overrides)
    elif overrides:
        raise TypeError("give either settings or overrides, not both")
    capture = _LogCapture(json_lines=settings.log_format == "json")
    root = logging.getLogger()
    with _loggers_restored():
        root.addHandler(capture)
        try:
            logging.getLogger("roomcast").setLevel(LOG_LEVELS[settings.log_level])
            # roomcast serve's configuration, with logging left to the test process (the
            # capture above) and no announcement of the address (port 0 is no address).
            config = uvicorn_config(
                settings, app=create_app(settings), port=port, log_config=None, lifespan="on"
            )
            # uvicorn.Config set its loggers' levels (kept while this server runs) and, with
            # access_log off, cut uvicorn.access off from the root for good: undo that part,
            # this server writes no access lines anyway and the others still must.
            access = logging.getLogger("uvicorn.access")
            access.handlers.clear()
            access.propagate = True
            server = uvicorn.Server(config)
            srv = AppServer(settings, server, capture)
            async with _running(srv, server):
                AppServer.live.append(srv)
                try:
                    yield srv
                finally:
                    AppServer.live.remove(srv)
        finally:
            root.removeHandler(capture)
    if check_log:
        srv.assert_no_traceback()


@asynccontextmanager
async def _running(srv: AppServer, server: uvicorn.Server) -> AsyncIterator[None]:
    task = asyncio.create_task(_run(server), name=f"uvicorn {srv.settings.ws}")
    try:
        async with asyncio.timeout(4 * TIMEOUT):
            while not server.started:
                await asyncio.wait({task}, timeout=0.01)
                if task.done():
                    task.result()  # raises why it stopped
                    raise RuntimeError(f"the server stopped before it started:\n{srv.log()}")
        srv.port = server.servers[0].sockets[0].getsockname()[1]
        yield
    finally:
        try:
            await srv._close_client()
            if server.started and not task.done():
                # What uvicorn's own tests do: shut down (connections, then the lifespan),
                # then stop the main loop, which only waits for should_exit.
                await server.shutdown()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the /ws test peer -------------------------------------------------------------------------

Frame = dict[str, Any]


def dumps(value: Any) -> str:
    """JSON as the tests send it: compact, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def channel(prefix: str = "t") -> str:
    """A channel name no other test uses."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def publication(ch: str, offset: int, data: Any, info: Frame) -> Frame:
    """The ``publication`` push docs/protocol.md describes."""
    return {"type": "publication", "channel": ch, "offset": offset, "data": data, "info": info}


def error_code(reply: Frame, rid: Any) -> str:
    """The code of an error reply to ``rid``, after checking the reply's exact shape."""
    assert set(reply) == {"id", "ok", "error"}, reply
    assert reply["id"] == rid, reply
    assert type(reply["id"]) is type(rid), reply
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert set(error) == {"code", "message"}, reply
    assert isinstance(error["message"], str), reply
    assert error["message"], reply
    return str(error["code"])


class Peer:
    """One `/ws` connection: requests get fresh ids; pushes met on the way are kept in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: Frame = {}
        self.pushes: deque[Frame] = deque()
        self._ids = itertools.count(1)

    @property
    def client(self) -> str:
        return str(self.hello["client"])

    @property
    def info(self) -> Frame:
        return {"client": self.hello["client"], "user": self.hello["user"]}

    async def frame(self, within: float = TIMEOUT) -> Frame:
        raw = await recv(self.ws, within)
        assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
        frame = json.loads(raw)
        assert isinstance(frame, dict), raw
        return frame

    async def send(self, value: Any) -> None:
        await self.ws.send(value if isinstance(value, str | bytes) else dumps(value))

    async def reply(self, rid: Any) -> Frame:
        """Read up to the reply to ``rid``; pushes before it are kept, other replies fail."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                frame = await self.frame()
                if "id" not in frame:
                    assert "type" in frame, frame
                    self.pushes.append(frame)
                    continue
                assert frame["id"] == rid, f"expected the reply to {rid!r}, got {frame}"
                return frame

    async def request(self, op: str, **fields: Any) -> Frame:
        rid = next(self._ids)
        await self.send({"id": rid, "op": op, **fields})
        return await self.reply(rid)

    async def ok(self, op: str, **fields: Any) -> Frame:
        reply = await self.request(op, **fields)
        assert reply.get("ok") is True, reply
        assert set(reply) == {"id", "ok", "result"}, reply
        assert isinstance(reply["result"], dict), reply
        return dict(reply["result"])

    async def fail(self, op: str, **fields: Any) -> str:
        """The error code of a request that must fail (its reply carries the request's id)."""
        reply = await self.request(op, **fields)
        return error_code(reply, reply["id"])

    async def push(self, within: float = TIMEOUT) -> Frame:
        if self.pushes:
            return self.pushes.popleft()
        frame = await self.frame(within)
        assert "id" not in frame, f"expected a push, got {frame}"
        assert "type" in frame, frame
        return frame

    async def publications(self, n: int) -> list[Frame]:
        got = []
        for _ in range(n):
            frame = await self.push()
            assert frame["type"] == "publication", frame
            got.append(frame)
        return got

    async def still_works(self) -> None:
        """A ping round trip on this connection, with nothing else in between."""
        assert not self.pushes, self.pushes
        await self.send({"id": "still-works", "op": "ping"})
        assert await self.frame() == {"id": "still-works", "ok": True, "result": {}}

    async def ping(self) -> None:
        """A ``ping`` request that must succeed (pushes met on the way are kept)."""
        assert await self.ok("ping") == {}

    async def quiet(self, seconds: float) -> None:
        """Nothing arrives for ``seconds`` (and the connection stays open)."""
        try:
            frame = await self.frame(within=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")


@asynccontextmanager
async def peer(server: Addressed, path: str = "/ws", **kwargs: Any) -> AsyncIterator[Peer]:
    """A :class:`Peer` on ``path``, past its ``connected`` push (kept as ``hello``)."""
    async with ws_connect(server, path, **kwargs) as ws:
        p = Peer(ws)
        p.hello = await p.frame()
        assert p.hello.get("type") == "connected", p.hello
        yield p


#: ``await start(**settings)``: an in-process server on the test's transport (conftest).
ServerStarter = Callable[..., Awaitable[AppServer]]
