"""The scale-out table: roomcast on each broker, and the peers, under the same fan-out loads.

Configurations ("rows"): one roomcast node on ``memory://``, on ``redis://`` (a private
redis-server), on ``redis+cluster://`` (a private Redis Cluster, ``tests/redis_cluster.py``'s
``LocalCluster``), and N nodes on ``redis://``; for chat also the peers: the guide's code, Node's
``ws`` and socketify. Loads: the chat fan-out (``chat.py``: members of one room on
``/ws/chat``, one sender) and the ``/ws`` fan-out (``channel.py``: subscribers of one channel,
one publisher), each at two shapes (:class:`Shape`): back to back ("max rate") and paced (one
message every ``interval``). On N nodes the members (subscribers) are shared out over the nodes,
the sender (publisher) on the first.

Redis and the cluster are started once per repeat and emptied (FLUSHALL) before every run; every
run gets fresh roomcast (or peer) processes. Everything server side shares core 0: roomcast
processes, redis-server(s) (the cluster's nodes are pinned once started), peers; their CPU ÷
deliveries is the "server CPU per delivery". A configuration that cannot run here (no
redis-server, no ``redis+cluster://`` broker in this build, no ``LocalCluster``, socketify not
importable) is left out with a note saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchconfig import SCALE_CONFIGS, SCALE_PEERS, Config
from channel import ChannelConfig, ChannelResult, run_channel
from chat import ChatConfig, ChatResult, run_chat
from cpu import CpuProbe
from samples import Results, RunRecord, fmt
from servers import (
    HOST,
    REPO_DIR,
    ServerProcess,
    ServerSpec,
    cluster_node_spec,
    log_dir,
    pin_to_server_core,
    redis_binary,
    redis_command,
    redis_spec,
    running_server,
    running_servers,
    server_spec,
    socketify_importable,
    threads_cpu_seconds,
)
from specs import shape_title

#: Where a Redis Cluster for tests and benchmarks is launched (``LocalCluster``).
CLUSTER_MODULE = REPO_DIR / "tests" / "redis_cluster.py"
CLUSTER_START_TIMEOUT_S = 120.0
#: The cluster's node timeout: Redis's default. The tests' short one (a failover in seconds)
#: could see a node starved on the busy shared core as failing, and fail it over mid-run.
CLUSTER_NODE_TIMEOUT_MS = 15_000
#: The shortest wait for a paced burst's deliveries after its last send: slow servers (the
#: guide's code, Node's ws) fall tens of seconds behind a message a millisecond, and a
#: delivery still queued when the wait ends counts as lost.
PACED_DRAIN_S = 60.0
#: The endpoints of the table: the guide's chat and the /ws protocol.
ENDPOINTS = ("chat", "ws")
#: Runs one measurement and records a failure instead of raising (``run.Bench.guarded``).
Guarded = Callable[[str, str, str, Callable[[], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True)
class Shape:
    """A load shape: ``messages`` measured messages, one every ``interval_s`` (0: back to
    back)."""

    key: str
    messages: int
    interval_s: float

    @property
    def title(self) -> str:
        """Say it in a few words: "max rate, 200 msgs", "paced, 1 msg per ms, 2,000 msgs"."""
        return shape_title(self.messages, self.interval_s * 1e3)


def shapes(cfg: Config) -> tuple[Shape, Shape]:
    """Return the two load shapes of this run."""
    return (
        Shape("max", cfg.messages, 0.0),
        Shape("paced", cfg.scale_paced_messages, cfg.scale_interval_ms / 1e3),
    )


def cluster_broker_support() -> str | None:
    """Return why this build has no ``redis+cluster://`` broker, or None if it has one."""
    brokers = REPO_DIR / "src" / "roomcast" / "brokers"
    if any("redis+cluster" in p.read_text() for p in brokers.glob("*.py")):
        return None
    return "this build of roomcast has no redis+cluster:// broker (src/roomcast/brokers/)"


def load_local_cluster() -> tuple[Any, str]:
    """Return ``tests/redis_cluster.py``'s ``LocalCluster`` class, or None and why not.

    The tests folder goes at the end of ``sys.path``, so that the harness's own modules keep
    their names (both folders have a ``servers.py``).
    """
    if not CLUSTER_MODULE.is_file():
        return None, f"{CLUSTER_MODULE.relative_to(REPO_DIR)} (LocalCluster) is missing"
    folder = str(CLUSTER_MODULE.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        return importlib.import_module(CLUSTER_MODULE.stem).LocalCluster, ""
    except Exception as exc:  # any failure to load it leaves the configuration out
        return None, f"tests/redis_cluster.py does not load: {type(exc).__name__}: {exc}"


async def _call(method: Callable[[], object]) -> None:
    """Call a LocalCluster method, awaiting it if it is a coroutine function, else in a
    thread (it may block for seconds)."""
    if inspect.iscoroutinefunction(method):
        await method()
    else:
        await asyncio.to_thread(method)


def _redis_children() -> set[int]:
    """Return the redis-server processes below this one."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith("redis-server"):
                found.add(proc.pid)
    return found


@dataclass
class Brokers:
    """The brokers of one repeat: a redis-server, and a Redis Cluster when it can run.

    ``cluster_pids``: the cluster's redis-server processes (pinned to core 0, measured);
    ``cluster_ports``: its nodes' ports (the masters are emptied before every run).
    """

    redis: ServerProcess | None = None
    cluster_url: str | None = None
    cluster_ports: list[int] = field(default_factory=list)
    cluster_pids: list[int] = field(default_factory=list)

    def url(self, row: str) -> str:
        """Return the broker URL of configuration ``row``."""
        if row == "memory":
            return "memory://"
        if row == "redis-cluster":
            assert self.cluster_url is not None
            return self.cluster_url
        assert self.redis is not None
        return f"redis://{HOST}:{self.redis.spec.port}"

    def cpu(self, row: str) -> CpuProbe | None:
        """Return the CPU probe of the broker processes configuration ``row`` uses."""
        if row == "redis-cluster":
            return functools.partial(threads_cpu_seconds, list(self.cluster_pids))
        if row in ("redis", "nodes") and self.redis is not None:
            return self.redis.cpu_seconds_precise
        return None

    async def flush(self, row: str) -> None:
        """Empty the broker of ``row`` (on the cluster every node is asked; replicas refuse)."""
        if row in ("redis", "nodes"):
            assert self.redis is not None
            ports = [self.redis.spec.port]
        elif row == "redis-cluster":
            ports = self.cluster_ports
        else:
            return
        for port in ports:
            reply = await redis_command(port, "FLUSHALL")
            if reply is None or (reply != b"+OK" and not reply.startswith(b"-READONLY")):
                raise RuntimeError(f"redis on port {port} did not empty: {reply!r}")


class ScaleScenario:
    """Runs the scale table's configurations taking turns and records their figures."""

    def __init__(self, cfg: Config, results: Results, guarded: Guarded) -> None:
        """Run for ``cfg``, recording into ``results``, every measurement through ``guarded``."""
        self.cfg = cfg
        self.results = results
        self.guarded = guarded
        self.skipped: dict[str, str] = {}  # configuration → why it was left out
        self.peers = [p for p in SCALE_PEERS if p in cfg.servers]

    def skip(self, row: str, why: str) -> None:
        """Leave ``row`` out of this run, with a note saying why (once)."""
        if row not in self.skipped:
            self.skipped[row] = why
            self.results.notes.append(f"scale: {row} not run: {why}.")
            print(f"  scale: {row} skipped ({why})")

    def check(self) -> None:
        """Leave out what cannot run on this machine or in this invocation."""
        cfg = self.cfg
        if cfg.roomcast_as_baseline or "roomcast" not in cfg.servers:
            why = (
                "the roomcast roles run the baseline (--roomcast-as-baseline)"
                if cfg.roomcast_as_baseline
                else "the roomcast server was not selected (--servers)"
            )
            for row in SCALE_CONFIGS:
                self.skip(row, why)
        if redis_binary() is None:
            for row in ("redis", "redis-cluster", "nodes"):
                self.skip(row, "redis-server is not on PATH")
        why = cluster_broker_support()
        if why is not None:
            self.skip("redis-cluster", why)
        if "socketify" in self.peers:
            ok, why = socketify_importable()
            if not ok:
                self.skip("socketify", f"socketify does not import: {why}")

    @contextlib.asynccontextmanager
    async def brokers(self) -> AsyncIterator[Brokers]:
        """Start the repeat's redis-server and Redis Cluster (those some row needs)."""
        brokers = Brokers()
        async with contextlib.AsyncExitStack() as stack:
            if {"redis", "nodes"} - set(self.skipped):
                try:
                    brokers.redis = await stack.enter_async_context(running_server(redis_spec()))
                except Exception as exc:  # the other configurations still run
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    for row in ("redis", "nodes"):
                        self.skip(row, f"redis-server did not start: {msg}")
            if "redis-cluster" not in self.skipped:
                try:
                    await self.start_cluster(stack, brokers)
                except Exception as exc:  # the other configurations still run
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    self.skip("redis-cluster", f"the Redis Cluster did not start: {msg}")
            yield brokers

    async def start_cluster(self, stack: contextlib.AsyncExitStack, brokers: Brokers) -> None:
        """Start a LocalCluster, stopped when ``stack`` closes; pin its nodes to core 0."""
        local_cluster, why = load_local_cluster()
        if local_cluster is None:
            self.skip("redis-cluster", why)
            return
        workdir = log_dir() / "redis-cluster"
        workdir.mkdir(exist_ok=True)
        before = _redis_children()
        cluster = local_cluster(
            workdir,
            masters=self.cfg.cluster_masters,
            replicas=self.cfg.cluster_replicas,
            node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS,
        )
        stack.push_async_callback(_call, cluster.stop)
        async with asyncio.timeout(CLUSTER_START_TIMEOUT_S):
            await _call(cluster.start)
        brokers.cluster_url = str(cluster.url)
        brokers.cluster_ports = list(cluster.ports)
        brokers.cluster_pids = sorted(_redis_children() - before)
        pin_to_server_core(brokers.cluster_pids)

    async def run(self, repeat: int) -> None:
        """One repeat: ``scale_rounds`` rounds of every shape, endpoint and configuration, the
        configurations taking turns (their order flipped every round)."""
        cfg = self.cfg
        if repeat == 0:
            self.check()
        async with self.brokers() as brokers:
            for rnd in range(cfg.scale_rounds):
                label = f"{repeat + 1}.{rnd + 1}"
                flip = (repeat * cfg.scale_rounds + rnd) % 2 == 1
                for shape in shapes(cfg):
                    for endpoint in ENDPOINTS:
                        rows = [*SCALE_CONFIGS, *(self.peers if endpoint == "chat" else ())]
                        rows = [r for r in rows if r not in self.skipped]
                        for row in rows[::-1] if flip else rows:
                            await self.guarded(
                                f"scale: {'chat' if endpoint == 'chat' else '/ws'}, {shape.key}",
                                row,
                                label,
                                functools.partial(
                                    self.run_one, endpoint, shape, row, label, brokers
                                ),
                            )

    def specs(self, row: str, app: str, brokers: Brokers) -> list[ServerSpec]:
        """Return the servers configuration ``row`` runs (the first takes the sender)."""
        if row in self.peers:
            return [server_spec(row, "chat")]
        nodes = self.cfg.cluster_nodes if row == "nodes" else 1
        url = brokers.url(row)
        return [cluster_node_spec(url, f"scale-{row}-{app}-n{n + 1}") for n in range(nodes)]

    async def run_one(
        self, endpoint: str, shape: Shape, row: str, label: str, brokers: Brokers
    ) -> None:
        """One fan-out of ``endpoint`` at ``shape`` on configuration ``row``, fresh servers."""
        cfg = self.cfg
        await brokers.flush(row)
        specs = self.specs(row, endpoint, brokers)
        broker_cpu = brokers.cpu(row)
        drain = max(cfg.drain_timeout, PACED_DRAIN_S if shape.interval_s else 0.0)
        drain += shape.messages * shape.interval_s
        async with running_servers(specs) as servers:

            def server_cpu() -> float:
                total = sum(server.cpu_seconds_precise() for server in servers)
                return total + (broker_cpu() if broker_cpu else 0.0)

            async def stop() -> None:
                await asyncio.gather(*(server.stop() for server in servers))

            first, others = specs[0], specs[1:]
            res: ChatResult | ChannelResult
            if endpoint == "chat":
                ccfg = ChatConfig(
                    members=cfg.members,
                    messages=shape.messages,
                    interval_s=shape.interval_s,
                    drain_timeout_s=drain,
                    idle_timeout_s=cfg.idle_timeout,
                )
                nodes = [s.url("/ws/chat") for s in others]
                res = await run_chat(HOST, first.port, "/ws/chat", ccfg, server_cpu, stop, nodes)
            else:
                wcfg = ChannelConfig(
                    members=cfg.members,
                    messages=shape.messages,
                    interval_s=shape.interval_s,
                    window=cfg.publish_window,
                    drain_timeout_s=drain,
                    idle_timeout_s=cfg.idle_timeout,
                )
                nodes = [s.url("/ws") for s in others]
                res = await run_channel(HOST, first.port, wcfg, server_cpu, stop, nodes)
        self.record(endpoint, shape, row, label, res, len(specs))

    def record(
        self,
        endpoint: str,
        shape: Shape,
        row: str,
        label: str,
        res: ChatResult | ChannelResult,
        nodes: int,
    ) -> None:
        """Store one run's figures under ``scale.<endpoint>.<shape>.*``."""
        r = self.results
        key = f"scale.{endpoint}.{shape.key}"
        usage = res.usage
        srv_us = usage.server * usage.wall_s / res.delivered * 1e6 if res.delivered else None
        lg_us = usage.loadgen_cpu_s / res.delivered * 1e6 if res.delivered else None
        errors = res.errors if isinstance(res, ChannelResult) else res.mismatched + res.unexpected
        r.add(row, f"{key}.dps", res.dps)
        r.add(row, f"{key}.p50_ms", res.p50_ms)
        r.add(row, f"{key}.p99_ms", res.p99_ms)
        r.add(row, f"{key}.srv_us", srv_us)
        r.add(row, f"{key}.lost", res.lost)
        r.add(row, f"{key}.errors", errors)
        r.add(row, f"{key}.loadgen", usage.loadgen * 100)
        r.add(row, f"{key}.runs", 1)
        r.add(row, "scale.nodes", nodes)
        notes = [f"{res.delivered:,}/{res.expected:,} delivered"]
        if res.outcome != "done":
            notes.append(f"STOPPED ({res.outcome})")
        if nodes > 1:
            notes.append(f"{res.expected // res.messages:,} receivers over {nodes} nodes")
        if srv_us is not None and lg_us is not None:
            notes.append(f"CPU per delivery: server side {srv_us:.2f} µs, loadgen {lg_us:.2f} µs")
        if errors:
            notes.append(f"{errors} errors (wrong frames, order, failed requests)")
        notes.append(f"connect {res.connect_s:.1f} s")
        what = "chat" if endpoint == "chat" else "/ws"
        r.runs.append(
            RunRecord(
                f"scale: {what}, {shape.title}",
                row,
                label,
                f"{res.dps:,.0f} deliveries/s, p50 {fmt(res.p50_ms, 1)} ms, "
                f"p99 {fmt(res.p99_ms, 1)} ms, lost {res.lost:,}",
                usage.server,
                usage.loadgen,
                "; ".join(notes),
                usage.other,
            )
        )
