"""Start, probe, measure and stop the servers under test.

Roles: "baseline" (the guide's code), "node" (Node's ws library, benchmarks/node/), "roomcast"
(its own WebSocket transport, ``ROOMCAST_WS=roomcast``), "roomcast-asgi" (the same app on
uvicorn's websockets-sansio protocol: the plain-ASGI fallback), "socketify" (the guide's chat on
uWebSockets' Python binding, benchmarks/socketify_server.py: chat only) and "reference" (a
minimal picows server that measures the load generator only).

Every server runs in its own subprocess, pinned to core 0 when the machine has two or more
cores (the load generator takes core 1), listens on a free loopback port, and is always killed
when its ``running_server`` context exits, including on Ctrl-C.

The cluster scenario adds "redis" (a private ``redis-server`` without persistence) and roomcast
nodes on a given broker (``cluster_node_spec``): all of them on core 0 too, so several nodes and
Redis share one core. Processes started otherwise (a Redis Cluster's nodes) are pinned to core 0
and measured the same way (``pin_to_server_core``, ``threads_cpu_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BASELINE_DIR = BENCH_DIR / "baseline"
NODE_DIR = BENCH_DIR / "node"
SOCKETIFY_SERVER = BENCH_DIR / "socketify_server.py"
BASELINE_MODULES = {"echo": "echo_server", "chat": "chat_server"}
ROOMCAST_ENV = {
    "ROOMCAST_LOG_LEVEL": "warning",
    "ROOMCAST_ACCESS_LOG": "false",
    "ROOMCAST_TOKENS": '{"secret-token":"authenticated_user"}',
    # Load generators are anonymous /ws clients on one address that send as fast as they
    # can: the benchmarks measure throughput, so the per-connection rate limit is off and
    # the bench channels are open to anonymous clients.
    "ROOMCAST_RATE_LIMIT": "0",
    "ROOMCAST_ANONYMOUS_SUBSCRIBE": '["bench:*"]',
    "ROOMCAST_ANONYMOUS_PUBLISH": '["bench:*"]',
}
#: The WebSocket implementation each roomcast role runs (the ROOMCAST_WS setting).
ROOMCAST_WS = {"roomcast": "roomcast", "roomcast-asgi": "websockets-sansio"}
NPM_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
SERVER_CORE = 0
LOADGEN_CORE = 1
_PR_SET_PDEATHSIG = 1


def _cores_at_start() -> set[int]:
    """Return the cores this process may use, read once before any pinning."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


_START_CORES = _cores_at_start()
#: Whether the kernel keeps per-thread run times in nanoseconds (/proc/PID/schedstat).
_SCHEDSTAT = os.path.exists(f"/proc/{os.getpid()}/schedstat")


def can_pin() -> bool:
    """Tell whether server and load generator can each get a core of their own."""
    return {SERVER_CORE, LOADGEN_CORE} <= _START_CORES and hasattr(os, "sched_setaffinity")


def pin_current_process_to_loadgen_core() -> bool:
    """Pin this (load generator) process to core 1; return whether pinning happened."""
    if not can_pin():
        return False
    os.sched_setaffinity(0, {LOADGEN_CORE})
    return True


def free_port() -> int:
    """Return a TCP port on the loopback address that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one server: the role it plays, its argv, working directory and env."""

    role: str
    app: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    health_path: str
    need_ok: bool = field(default=False)
    #: How readiness is probed: "http" (GET ``health_path``) or "redis" (PING).
    probe: str = field(default="http")

    def url(self, path: str) -> str:
        """Return the ws:// URL of ``path`` on this server."""
        return f"ws://{HOST}:{self.port}{path}"


def server_spec(role: str, app: str, *, roomcast_as_baseline: bool = False) -> ServerSpec:
    """Build the launch spec of ``role`` for guide app ``app`` (see the module docstring).

    ``roomcast_as_baseline`` makes the roomcast roles run the baseline too: it is a self-test of
    the harness only (their columns should then come out like the baseline's).
    """
    port = free_port()
    env = dict(os.environ)
    if role == "baseline" or (roomcast_as_baseline and role in ROOMCAST_WS):
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            f"{BASELINE_MODULES[app]}:app",
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        return ServerSpec(role, app, _pinned(argv), BASELINE_DIR, env, port, "/health")
    if role == "reference":
        argv = [sys.executable, str(BENCH_DIR / "reference_server.py"), "--port", str(port)]
        return ServerSpec(role, app, _pinned(argv), BENCH_DIR, env, port, "/health", need_ok=True)
    if role == "node":
        argv = [node_binary(), str(NODE_DIR / "server.js"), "--port", str(port)]
        return ServerSpec(role, app, _pinned(argv), NODE_DIR, env, port, "/health", need_ok=True)
    if role == "socketify":
        if app != "chat":
            raise ValueError("the socketify server has /ws/chat only")
        argv = [sys.executable, str(SOCKETIFY_SERVER), "--port", str(port)]
        return ServerSpec(role, app, _pinned(argv), BENCH_DIR, env, port, "/health", need_ok=True)
    if role not in ROOMCAST_WS:
        raise ValueError(f"unknown server role {role!r}")
    env.update(ROOMCAST_ENV)
    env["ROOMCAST_WS"] = ROOMCAST_WS[role]
    src = str(REPO_DIR / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "roomcast", "serve", "--host", HOST, "--port", str(port)]
    return ServerSpec(role, app, _pinned(argv), REPO_DIR, env, port, "/health", need_ok=True)


def cluster_node_spec(broker_url: str, name: str) -> ServerSpec:
    """Build the launch spec of one roomcast node on ``broker_url`` (cluster scenario).

    The node runs roomcast's default WebSocket transport (``ROOMCAST_WS`` unset, even if the
    harness's own environment sets it); ``name`` goes into its log file's name.
    """
    spec = server_spec("roomcast", name)
    env = dict(spec.env)
    env.pop("ROOMCAST_WS", None)
    env["ROOMCAST_BROKER_URL"] = broker_url
    return dataclasses.replace(spec, env=env)


def redis_binary() -> str | None:
    """Return the path of ``redis-server``, or None when it is not on PATH."""
    return shutil.which("redis-server")


def redis_argv(port: int | str, folder: str | None = None) -> list[str]:
    """Return the (unpinned) command line of the harness's private ``redis-server``; its
    working folder is the log folder unless ``folder`` is given (for the report's text)."""
    return [
        redis_binary() or "redis-server",
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--dir", folder or str(_LOG_DIR),
    ]  # fmt: skip


def redis_spec() -> ServerSpec:
    """Build the launch spec of a private ``redis-server``: no persistence, loopback only."""
    port = free_port()
    argv = _pinned(redis_argv(port))
    return ServerSpec("redis", "broker", argv, _LOG_DIR, dict(os.environ), port, "", probe="redis")


def redis_version() -> str:
    """Return ``redis-server``'s version ("7.0.15"), or why it is unknown."""
    binary = redis_binary()
    if binary is None:
        return "not on PATH"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
    return "unknown version"


def _pinned(argv: list[str]) -> list[str]:
    """Prefix ``argv`` with ``taskset -c 0`` when pinning is possible."""
    taskset = shutil.which("taskset")
    if can_pin() and taskset:
        return [taskset, "-c", str(SERVER_CORE), *argv]
    return argv


def node_binary() -> str:
    """Return the path of ``node`` (or plain "node" if it is not on PATH)."""
    return shutil.which("node") or "node"


def ensure_node_server() -> str:
    """Make benchmarks/node runnable: install its locked dependencies if node_modules is missing.

    Runs ``npm ci`` (``npm install`` when there is no lock file), bounded by NPM_TIMEOUT_S.
    Returns the Node.js version; raises RuntimeError with the reason when Node or npm fails.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH (Node.js 18+ is needed for the node column)")
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not on PATH, and benchmarks/node/node_modules is missing")
        locked = (NODE_DIR / "package-lock.json").is_file()
        cmd = [npm, "ci" if locked else "install", "--no-audit", "--no-fund"]
        print(f"installing benchmarks/node dependencies: {' '.join(cmd[1:])}", flush=True)
        try:
            proc = subprocess.run(
                cmd,
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"npm took more than {NPM_TIMEOUT_S:.0f} s; gave up") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{tail}")
    proc = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return proc.stdout.strip() or "unknown version"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it if the harness dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def socketify_importable() -> tuple[bool, str]:
    """Check that socketify imports (its native library loads); return (ok, version or why).

    In a subprocess: the import loads uWebSockets' shared library, which needs libuv and zlib.
    """
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata, socketify; print(importlib.metadata.version('socketify'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def pin_to_server_core(pids: Sequence[int]) -> bool:
    """Pin processes started by others to the servers' core (every thread); return whether
    pinning happened."""
    if not can_pin():
        return False
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, {SERVER_CORE})
    return True


def _threads(pid: int) -> list[int]:
    """Return the thread ids of process ``pid`` (none if it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return []


def threads_cpu_seconds(pids: Sequence[int]) -> float:
    """Return the CPU seconds the live threads of ``pids`` have used, to the nanosecond.

    Reads ``/proc/PID/task/TID/schedstat`` (psutil's figures move in 10 ms clock ticks,
    coarse for a burst measured over a few hundred ms). A thread that exits between two
    readings takes its time with it, so this is for windows where the threads live on.
    Without schedstat, psutil's figures.
    """
    if not _SCHEDSTAT:
        seconds = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(pid).cpu_times()
                seconds += times.user + times.system
        return seconds
    total = 0
    for pid in pids:
        for tid in _threads(pid):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
    return total / 1e9


def roomcast_importable() -> tuple[bool, str]:
    """Check that ``roomcast.cli`` imports (from src/ first); return (ok, error text)."""
    spec = server_spec("roomcast", "echo")
    proc = subprocess.run(
        [sys.executable, "-c", "import roomcast.cli"],
        cwd=spec.cwd,
        env=spec.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


class ServerProcess:
    """A running server subprocess with its log file."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        """Launch ``spec`` with stdout/stderr going to a log file in ``log_dir``."""
        self.spec = spec
        self.log_path = log_dir / f"{spec.role}-{spec.app}-{spec.port}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.process = psutil.Process(self.popen.pid)

    def log_tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of the server's log."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """Return the server process and all its descendants that are still alive."""
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        """Return the resident set size of the whole process tree, in bytes."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        """Return user+system CPU seconds used so far by the whole process tree."""
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def cpu_seconds_precise(self) -> float:
        """Return the CPU seconds the tree's live threads have used, to the nanosecond.

        Reads ``/proc/PID/task/TID/schedstat`` (psutil's figures move in 10 ms clock ticks,
        coarse for a burst measured over a few hundred ms). A thread that exits between two
        readings takes its time with it, so this is for windows where the server's threads
        live on (the fan-out runs). Falls back to :meth:`cpu_seconds` without schedstat.
        """
        if not _SCHEDSTAT:
            return self.cpu_seconds()
        return threads_cpu_seconds([proc.pid for proc in self.tree()])

    async def wait_ready(self, limit_s: float = READY_TIMEOUT_S) -> None:
        """Poll the port with HTTP GET until the server answers (bounded by ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.role} server exited with {self.popen.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if self.spec.probe == "redis":
                if await redis_command(self.spec.port, "PING") == b"+PONG":
                    return
            else:
                status = await http_status(self.spec.port, self.spec.health_path)
                if status is not None and (status == 200 or not self.spec.need_ok):
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{self.spec.role} server not ready after {limit_s:.0f}s:\n{self.log_tail()}"
        )

    async def stop(self) -> None:
        """SIGTERM the tree, wait up to STOP_GRACE_S, then SIGKILL whatever is left."""
        procs = self.tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        await asyncio.to_thread(psutil.wait_procs, procs, STOP_GRACE_S)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole tree (idempotent) and reap the child."""
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()


async def _ask(port: int, request: bytes, limit_s: float) -> bytes:
    """Send ``request`` to the loopback ``port``; return the first line of the answer.

    Raises OSError or TimeoutError when there is no answer within ``limit_s``.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            return await reader.readline()
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def http_status(port: int, path: str, limit_s: float = 1.0) -> int | None:
    """GET ``path`` on the loopback port; return the HTTP status, or None if no answer."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    try:
        line = await _ask(port, request.encode(), limit_s)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError, ValueError):
        return None


async def redis_command(port: int, *args: str, limit_s: float = 5.0) -> bytes | None:
    """Send one command to the Redis on the loopback ``port``; return its reply's first line.

    Enough for PING and FLUSHALL (simple-string replies); None when there is no answer.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    try:
        return (await _ask(port, b"".join(parts), limit_s)).rstrip(b"\r\n")
    except (OSError, TimeoutError):
        return None


_LOG_DIR = Path(tempfile.mkdtemp(prefix="roomcast-bench-"))


def log_dir() -> Path:
    """Return the folder holding the servers' logs for this run."""
    return _LOG_DIR


@contextlib.asynccontextmanager
async def running_server(spec: ServerSpec) -> AsyncIterator[ServerProcess]:
    """Run ``spec`` until the block exits; the server is killed on every way out."""
    server = ServerProcess(spec, _LOG_DIR)
    try:
        await server.wait_ready()
        yield server
    finally:
        try:
            await asyncio.shield(server.stop())
        finally:
            server.kill()


@contextlib.asynccontextmanager
async def running_servers(specs: Sequence[ServerSpec]) -> AsyncIterator[list[ServerProcess]]:
    """Run every one of ``specs`` (started together, awaited together) until the block exits;
    all of them are killed on every way out."""
    servers: list[ServerProcess] = []
    try:
        for spec in specs:
            servers.append(ServerProcess(spec, _LOG_DIR))
        waits = [asyncio.ensure_future(server.wait_ready()) for server in servers]
        try:
            await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()  # (the others, when one failed)
            await asyncio.gather(*waits, return_exceptions=True)
        yield servers
    finally:
        try:
            await asyncio.shield(
                asyncio.gather(*(server.stop() for server in servers), return_exceptions=True)
            )
        finally:
            for server in servers:
                server.kill()


#: Log lines that show a server misbehaving (uvicorn's and Python's wording).
LOG_PROBLEMS = ("Traceback", "ERROR", "Exception in ASGI", "CRITICAL", "Fatal")


def scan_logs(roles: tuple[str, ...]) -> list[tuple[str, Path, str]]:
    """Look through this run's logs of ``roles`` for errors and tracebacks.

    Returns (role, log path, summary with the first problem line) for every log that has any.
    """
    found = []
    for path in sorted(_LOG_DIR.glob("*.log")):
        role = next(
            (r for r in sorted(roles, key=len, reverse=True) if path.name.startswith(r + "-")), None
        )
        if role is None:
            continue
        lines = path.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if any(word in ln for word in LOG_PROBLEMS)]
        if bad:
            found.append((role, path, f"{len(bad)} error line(s); first: {bad[0].strip()[:200]}"))
    return found
