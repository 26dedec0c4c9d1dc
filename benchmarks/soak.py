"""Soak test: churn, slow readers and Redis restarts against two roomcast nodes sharing Redis.

Not part of ``run.py``'s report nor of CI. ``python benchmarks/soak.py --duration 600`` runs
ten minutes; ``--duration 60`` is the quick check. It starts its own ``redis-server`` (a free
loopback port, ``--save '' --appendonly no``: a restart comes back empty) and two
``roomcast serve --broker redis://...`` nodes on free loopback ports, then, until the duration
is over:

- subscribers connect to ``/ws`` on either node, subscribe to two channels (with ``recover``
  from the second connection on), read for a few seconds, close (or drop the TCP connection)
  and come back;
- slow readers, on sockets with small buffers, subscribed to every channel and to
  ``soak:bulk`` (large publications, so that their buffers fill within seconds), read for a
  while and then stop reading until the server cuts them (4008), then read what came before the
  close, reconnect and recover;
- publishers publish at a steady rate through ``/ws`` ``publish`` (both nodes) and
  ``POST /api/publish`` (both nodes), so publications cross nodes through Redis;
- chat members talk on ``/ws/chat/{room}`` and come and go;
- every ``--restart-every`` seconds redis-server is killed (SIGKILL) and started again on the
  same port, losing every channel's history.

Correctness, per subscriber and channel: the subscriber's epoch is the one of its latest
subscribe reply, and the offsets it receives must follow each other one by one from the point
that reply gives (``offset`` for a plain subscribe, the recovered offset for
``recovered: true``, the oldest offset the history must still hold for ``recovered: false``).
A skipped offset is a publication lost while the history still held it; so is, at the end
(publishers stopped, the stream quiet), any offset between a subscriber's last one and the
channel's offset in Redis. Every received publication is also checked against its publish
reply (same channel, epoch and offset), which catches a publication of a new stream delivered
to a subscriber that was never told of the reset. A reset is legitimate only when the
subscriber was told: a close (1012, 4008, ...) followed by a subscribe reply with
``recovered: false``.

Every ~10 s: each node's RSS (``VmRSS``), ``GET /stats`` (connections, asyncio tasks) and Redis's
``used_memory``. At the end a table is printed and the "Soak" section of docs/benchmarks.md
(between ``<!-- soak:start -->`` and ``<!-- soak:end -->``) is written or replaced. Exit status
1 when anything was lost or another correctness check failed.

``--src DIR`` runs the nodes from another source tree (a candidate fix, an older release).
Loopback only; every loop is bounded by the duration (plus a bounded drain); the servers are
killed on every way out, Ctrl-C included, and (``PR_SET_PDEATHSIG``) if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from rich.console import Console

from servers import (
    HOST,
    REPO_DIR,
    ServerProcess,
    ServerSpec,
    free_port,
    http_status,
    log_dir,
    redis_argv,
)
from soak_clients import ChatMember, Subscriber, WsPublisher, api_publisher, stop_tasks
from soak_report import Report, acknowledged, markdown_section, mib, print_report, write_section
from soak_state import (
    ANOMALIES_KEPT,
    API_CONCURRENCY,
    BULK_CHANNEL,
    BULK_PAD,
    CONVERGE_S,
    HISTORY_SIZE,
    IDLE_WAIT_S,
    NODE_ENV,
    PUBLISHER_DRAIN_S,
    READY_WAIT_S,
    REQUEST_TIMEOUT_S,
    Config,
    Restart,
    Sample,
    Soak,
)


def node_spec(redis_port: int, index: int, src_dir: Path) -> ServerSpec:
    """A roomcast node on the soak's Redis (default transport; ``src_dir`` first on PYTHONPATH)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(NODE_ENV)
    src = str(src_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable, "-m", "roomcast", "serve",
        "--host", HOST, "--port", str(port), "--broker", f"redis://{HOST}:{redis_port}",
    ]  # fmt: skip
    return ServerSpec("roomcast", f"soak-node{index}", argv, REPO_DIR, env, port, "/readyz", True)


class RedisProcess:
    """The soak's redis-server; ``kill`` is SIGKILL, ``start`` comes back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: ServerProcess | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        spec = ServerSpec(
            "redis",
            f"soak{self.starts}",
            redis_argv(self.port),
            log_dir(),
            dict(os.environ),
            self.port,
            "",
            probe="redis",
        )
        self.process = ServerProcess(spec, log_dir())
        await self.process.wait_ready(READY_WAIT_S)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None


async def all_ready(soak: Soak) -> bool:
    statuses = await asyncio.gather(*(http_status(n.spec.port, "/readyz") for n in soak.nodes))
    return all(status == 200 for status in statuses)


async def restarter(soak: Soak, redis: RedisProcess) -> None:
    """Kill redis-server and start it again on the same port, on schedule."""
    for at in soak.cfg.restart_times():
        await asyncio.sleep(max(0.0, at - soak.now()))
        if not soak.loading:
            return
        restart = Restart(soak.now())
        soak.restarts.append(restart)
        redis.kill()
        print(f"t={restart.killed:6.1f} s  redis-server killed (restart #{len(soak.restarts)})")
        await asyncio.sleep(soak.cfg.redis_downtime)
        await redis.start()
        restart.up = soak.now()
        deadline = soak.loop.time() + READY_WAIT_S
        while soak.loop.time() < deadline:
            if await all_ready(soak):
                restart.ready = soak.now()
                break
            await asyncio.sleep(0.1)
        print(
            f"t={soak.now():6.1f} s  redis-server up at {restart.up:.1f} s, nodes ready at "
            + ("never (30 s)" if restart.ready is None else f"{restart.ready:.1f} s")
        )


def vm_rss(pid: int) -> int | None:
    """The process's resident set size in bytes (``VmRSS`` of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def node_stats(soak: Soak, node: int) -> dict[str, int] | None:
    assert soak.http is not None
    try:
        response = await soak.http.get(soak.http_url(node, "/stats"))
        stats: dict[str, int] = response.json()
        return stats
    except (httpx.HTTPError, ValueError):
        return None


async def redis_memory(port: int) -> int | None:
    client = aioredis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        info = await client.info("memory")
        return int(info["used_memory"])
    except (aioredis.RedisError, OSError, KeyError):
        return None
    finally:
        await client.aclose()


async def sample(soak: Soak, redis: RedisProcess, label: str) -> Sample:
    stats = await asyncio.gather(*(node_stats(soak, i) for i in range(len(soak.nodes))))
    taken = Sample(
        soak.now(),
        label,
        [vm_rss(node.popen.pid) for node in soak.nodes],
        list(stats),
        await redis_memory(redis.port),
    )
    soak.samples.append(taken)
    print(progress_line(soak, taken))
    return taken


def progress_line(soak: Soak, s: Sample) -> str:
    c = soak.counts
    parts = [
        f"t={s.t:6.1f} s {s.label:<8}",
        f"connects {c['connects']:,}",
        f"pubs {acknowledged(c):,}",
        f"deliveries {c['deliveries']:,}",
        f"cuts {c['closed by the server 4008']:,}",
        f"restarts {len(soak.restarts)}",
        f"lost {soak.lost}",
    ]
    for i, (rss, stats) in enumerate(zip(s.rss, s.stats, strict=True), 1):
        tasks = "?" if stats is None else stats.get("asyncio_tasks")
        conns = "?" if stats is None else stats.get("connections")
        parts.append(f"node{i} {mib(rss)} MiB {tasks} tasks {conns} conns")
    parts.append(f"redis {mib(s.redis_memory)} MiB")
    return " | ".join(parts)


async def sampler(soak: Soak, redis: RedisProcess) -> None:
    k = 1
    while True:
        at = k * soak.cfg.sample_every
        if at >= soak.cfg.duration:
            return
        await asyncio.sleep(max(0.0, at - soak.now()))
        label = "warm-up" if at < soak.cfg.warmup else "load"
        await sample(soak, redis, label)
        soak.resolve_pending()
        k += 1


async def resolver(soak: Soak) -> None:
    while soak.loading:
        await asyncio.sleep(1.0)
        soak.resolve_pending()


async def redis_positions(soak: Soak, port: int) -> dict[str, tuple[str, int]]:
    """Each channel's epoch and offset in Redis now (the truth at the end)."""
    client = aioredis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)
    positions: dict[str, tuple[str, int]] = {}
    try:
        for channel in soak.cfg.all_channels:
            meta = await client.hgetall(f"roomcast:m:{channel}")
            if meta.get("epoch"):
                positions[channel] = (str(meta["epoch"]), int(meta.get("offset", 0)))
    finally:
        await client.aclose()
    return positions


async def converge(soak: Soak, positions_of: Any) -> tuple[int, int]:
    """Wait (bounded) until every subscriber is subscribed and has its channel's last
    publication.

    Then count what is still missing: lost publications, and subscribers left on an old epoch.
    Returns (subscriptions checked, subscriptions not subscribed at the end).
    """
    deadline = soak.loop.time() + CONVERGE_S
    while True:
        positions = await positions_of()
        behind = [
            (sub, track)
            for sub in soak.subscribers
            for track in sub.tracks.values()
            if not (sub.connected and track.state == "live")
            or (
                track.channel in positions
                and (track.epoch, track.offset) != positions[track.channel]
            )
        ]
        if not behind or soak.loop.time() >= deadline:
            break
        await asyncio.sleep(0.25)
    checked = unsubscribed = 0
    for sub in soak.subscribers:
        for track in sub.tracks.values():
            if not (sub.connected and track.state == "live"):
                unsubscribed += 1
                continue
            checked += 1
            if track.channel not in positions:
                continue
            epoch, top = positions[track.channel]
            where = f"{sub.name} on node {sub.node + 1}, {track.channel}"
            if track.epoch == epoch and track.offset < top:
                missing = top - track.offset
                soak.lose(track.channel, epoch, track.offset + 1, top)
                soak.anomaly(
                    "lost (history held them)",
                    where,
                    f"epoch {epoch}: offsets {track.offset + 1}..{top} ({missing}) never came "
                    f"({CONVERGE_S:.0f} s after the last publication)",
                    f"at the end, after {track.context}; last close: {sub.last_close}",
                    group=f"{track.channel}, epoch {epoch}, at the end (offset {top})",
                    node=sub.node,
                )
            elif track.epoch != epoch:
                missing = min(top, HISTORY_SIZE)
                if missing:
                    soak.lose(track.channel, epoch, top - missing + 1, top)
                soak.anomaly(
                    "still on an old epoch at the end (reset not told)",
                    where,
                    f"epoch {track.epoch} offset {track.offset}; Redis has epoch {epoch} offset "
                    f"{top} ({missing} of it held and not received)",
                    f"after {track.context}; last close: {sub.last_close}",
                    group=f"{track.channel}, epoch {track.epoch} (Redis: {epoch})",
                    node=sub.node,
                )
    return checked, unsubscribed


async def wait_idle(soak: Soak) -> None:
    """Wait (bounded) until no node holds a connection any more."""
    deadline = soak.loop.time() + IDLE_WAIT_S
    while soak.loop.time() < deadline:
        stats = await asyncio.gather(*(node_stats(soak, i) for i in range(len(soak.nodes))))
        if all(
            s is not None and s.get("connections") == 0 and s.get("ws_clients") == 0 for s in stats
        ):
            return
        await asyncio.sleep(0.25)


async def soak_run(cfg: Config) -> Report:
    soak = Soak(cfg)
    redis = RedisProcess()
    rng = soak.rng
    tasks: list[asyncio.Task[Any]] = []
    publishers: list[asyncio.Task[Any]] = []
    background: list[asyncio.Task[Any]] = []
    print(f"roomcast soak: {cfg.duration:.0f} s; logs in {log_dir()}")
    try:
        await redis.start()
        soak.nodes = [ServerProcess(node_spec(redis.port, i, cfg.src), log_dir()) for i in (1, 2)]
        await asyncio.gather(*(node.wait_ready() for node in soak.nodes))
        soak.http = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=API_CONCURRENCY + 8),
            trust_env=False,
        )
        await sample(soak, redis, "start")
        soak.t0 = soak.loop.time()
        soak.stop_at = soak.t0 + cfg.duration
        hard_end = soak.stop_at + CONVERGE_S + 60
        names = cfg.channel_names
        for i in range(cfg.subscribers):
            picked = rng.sample(names, min(cfg.per_subscriber, len(names)))
            soak.subscribers.append(Subscriber(soak, i, i % 2, picked, slow=False))
        for i in range(cfg.slow):
            soak.subscribers.append(Subscriber(soak, i, i % 2, cfg.all_channels, slow=True))
        for sub in soak.subscribers:
            tasks.append(asyncio.create_task(sub.run(hard_end)))
        for i in range(cfg.chat):
            member = ChatMember(soak, i, i % 2, f"soak{i % cfg.rooms}")
            tasks.append(asyncio.create_task(member.run(hard_end)))
        ws_rate = cfg.rate * (1 - cfg.api_share) / max(1, cfg.ws_publishers)
        publishers += [
            asyncio.create_task(WsPublisher(soak, f"w{i}", i % 2, ws_rate, names).run())
            for i in range(cfg.ws_publishers)
        ]
        if cfg.bulk_rate > 0:
            bulk = WsPublisher(soak, "b", 1, cfg.bulk_rate, [BULK_CHANNEL], BULK_PAD)
            publishers.append(asyncio.create_task(bulk.run()))
        if cfg.api_share > 0:
            publishers.append(asyncio.create_task(api_publisher(soak, cfg.rate * cfg.api_share)))
        background += [
            asyncio.create_task(restarter(soak, redis)),
            asyncio.create_task(sampler(soak, redis)),
            asyncio.create_task(resolver(soak)),
        ]
        await asyncio.sleep(max(0.0, soak.stop_at - soak.loop.time()))
        end = await sample(soak, redis, "end")
        # Stop the load: publishers first (bounded), then the restarter (mid-restart at worst).
        await asyncio.wait(publishers, timeout=PUBLISHER_DRAIN_S + REQUEST_TIMEOUT_S + 2)
        await asyncio.wait(background[:1], timeout=READY_WAIT_S + 15)
        await stop_tasks([*publishers, *background])
        if redis.process is None:
            await redis.start()
        checked, unsubscribed = await converge(soak, lambda: redis_positions(soak, redis.port))
        await stop_tasks(tasks)
        tasks.clear()
        await wait_idle(soak)
        idle = await sample(soak, redis, "idle")
        soak.resolve_pending(final=True)
        return Report(soak, end, idle, checked, unsubscribed)
    finally:
        await stop_tasks([*publishers, *background, *tasks])
        if soak.http is not None:
            await soak.http.aclose()
        for node in soak.nodes:
            with contextlib.suppress(Exception):
                await asyncio.shield(node.stop())
            node.kill()
        redis.kill()


def parse_args(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--subscribers", type=int, default=240, help="/ws subscribers (240)")
    parser.add_argument("--channels", type=int, default=8, help="channels (8)")
    parser.add_argument("--per-subscriber", type=int, default=2, help="channels each (2)")
    parser.add_argument("--slow", type=int, default=8, help="slow readers (8)")
    parser.add_argument("--chat", type=int, default=32, help="chat members (32)")
    parser.add_argument("--rooms", type=int, default=4, help="chat rooms (4)")
    parser.add_argument("--rate", type=float, default=100, help="publications/s (100)")
    parser.add_argument(
        "--bulk-rate",
        type=float,
        default=10,
        help=f"publications/s of {BULK_PAD} bytes on {BULK_CHANNEL}, for the slow readers (10)",
    )
    parser.add_argument(
        "--api-share", type=float, default=0.3, help="share through /api/publish (0.3)"
    )
    parser.add_argument("--ws-publishers", type=int, default=4, help="/ws publishers (4)")
    parser.add_argument(
        "--restart-every",
        type=float,
        help="seconds between Redis restarts (60; half the duration below 300 s)",
    )
    parser.add_argument(
        "--redis-downtime", type=float, default=1.0, help="seconds Redis stays down (1)"
    )
    parser.add_argument("--sample-every", type=float, default=10, help="seconds (10)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the reference sample (60; a quarter below)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--src",
        type=Path,
        default=REPO_DIR / "src",
        help="run the nodes from this source tree (default: this checkout's src/)",
    )
    parser.add_argument(
        "--output", type=Path, default=REPO_DIR / "docs" / "benchmarks.md", help="report file"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.duration < 20:
        parser.error("--duration must be at least 20 s")
    if args.subscribers < 1 or args.channels < 1 or args.rate <= 0 or args.rooms < 1:
        parser.error("--subscribers, --channels, --rooms and --rate must be positive")
    if not 0 <= args.api_share <= 1 or (args.ws_publishers < 1 and args.api_share < 1):
        parser.error("--api-share must be in 0..1, and 1 without /ws publishers")
    long_run = args.duration >= 300
    return Config(
        duration=args.duration,
        subscribers=args.subscribers,
        channels=args.channels,
        per_subscriber=args.per_subscriber,
        slow=args.slow,
        chat=args.chat,
        rooms=args.rooms,
        rate=args.rate,
        bulk_rate=args.bulk_rate,
        api_share=args.api_share,
        ws_publishers=args.ws_publishers,
        restart_every=args.restart_every or (60.0 if long_run else args.duration / 2),
        redis_downtime=args.redis_downtime,
        sample_every=args.sample_every,
        warmup=args.warmup
        if args.warmup is not None
        else (60.0 if long_run else args.duration / 4),
        seed=args.seed,
        src=args.src.resolve(),
        output=None if args.no_write else args.output,
        argv=tuple(argv),
    )


async def main_async(cfg: Config) -> int:
    # Ctrl-C and SIGTERM cancel the main task, whose cleanup stops every process (SIGINT is
    # handled here too: a shell starts background jobs with it ignored).
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    started = time.monotonic()
    report = await soak_run(cfg)
    took = time.monotonic() - started
    console = Console()
    print_report(report, console)
    anomalies = log_dir() / "soak-anomalies.txt"
    anomalies.write_text(
        "".join(g.line() + "\n" for g in report.soak.groups.values())
        + f"\nthe first {ANOMALIES_KEPT} one by one:\n"
        + "".join(a.line() + "\n" for a in report.soak.anomalies)
    )
    console.print(f"took {took:.0f} s; logs and every anomaly in {log_dir()}")
    if cfg.output is not None:
        write_section(cfg.output, markdown_section(report, took))
        console.print(f"wrote the soak section of {cfg.output}")
    return 1 if report.soak.lost or report.errors else 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import uvloop
    except ImportError:
        print("uvloop is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    try:
        return uvloop.run(main_async(cfg))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: servers stopped, no report written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
