"""A private ``redis-server`` for the scale-out tests, and its fixtures.

Each :class:`RedisServer` runs its own ``redis-server`` on a free loopback port, without
persistence (``--save '' --appendonly no``): a restart comes back empty, like a Redis that lost
its data. Without the binary the tests that need it skip, except under CI (``CI`` set), where
they fail: CI must never silently skip the scale-out tests.

A test module gets the fixtures ``redis_server`` (one per module) and ``fresh_redis`` (one per
test) by importing them: ``from redis_server import redis_server_fixture``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import redis

from helpers import HOST, TIMEOUT, free_port, spawn, terminate

__all__ = [
    "RedisServer",
    "fresh_redis_fixture",
    "redis_server_fixture",
    "require_redis_server",
    "unique_prefix",
]

MISSING = "redis-server not found on PATH: install Redis >= 6 to run the scale-out tests"


def require_redis_server() -> str:
    """The path of ``redis-server``; skips the test without it (fails it under CI)."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs it: {MISSING}", pytrace=False)
        pytest.skip(MISSING)
    return path


def unique_prefix(tag: str = "t") -> str:
    """A key prefix no other test uses (``?prefix=`` of a ``redis://`` URL)."""
    return f"rc-{tag}-{uuid.uuid4().hex[:10]}"


class RedisServer:
    """A ``redis-server`` subprocess on ``127.0.0.1:port`` whose log goes to ``workdir``.

    ``kill()`` (SIGKILL) and ``restart()`` keep the port, so clients configured with
    :attr:`url` find it again; the data does not survive (no persistence).
    """

    live: ClassVar[list[RedisServer]] = []

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = require_redis_server()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def url_for(self, prefix: str) -> str:
        """The broker URL with its own key prefix (tests sharing this server stay apart)."""
        return f"{self.url}?prefix={prefix}"

    def client(self) -> redis.Redis:
        """A synchronous redis-py client, for looking at or meddling with the keys."""
        return redis.Redis(
            host=HOST, port=self.port, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 2 * TIMEOUT) -> RedisServer:
        """Start ``redis-server`` and wait (at most ``timeout`` s) until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--protected-mode", "no",
        ]  # fmt: skip
        self.proc = spawn(argv, self.log_path, self.workdir, append=True)
        self.starts += 1
        if self not in RedisServer.live:
            RedisServer.live.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._forget()
                raise RuntimeError(
                    f"redis-server exited with code {self.proc.returncode} before it answered:\n"
                    f"{self.log()[-4000:]}"
                )
            if self.ping():
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server not answering PING after {timeout:.1f}s:\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def ping(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with redis.Redis(
                host=HOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
            ) as conn:
                return bool(conn.ping())
        except (redis.RedisError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies at once, with everything it held."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=3 * TIMEOUT)
        self._forget()

    def stop(self, timeout: float = 2 * TIMEOUT) -> None:
        """SIGTERM, bounded wait, SIGKILL fallback."""
        if self.proc is None:
            return
        terminate(self.proc, timeout)
        self._forget()

    def restart(self, timeout: float = 2 * TIMEOUT) -> RedisServer:
        """Kill (if running) and start again on the same port, empty."""
        self.kill()
        # The port was ours a moment ago; a client reconnecting at the same instant may hold
        # it briefly, so retry the bind for a while.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=timeout)
            except RuntimeError:
                if time.monotonic() >= deadline or "Address already in use" not in self.log():
                    raise
                time.sleep(0.1)

    def _forget(self) -> None:
        with contextlib.suppress(ValueError):
            RedisServer.live.remove(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="module", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` shared by the tests of a module (each uses its own key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    with server:
        yield server


@pytest.fixture(name="fresh_redis")
def fresh_redis_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of this test alone (for tests that kill or restart it)."""
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()
