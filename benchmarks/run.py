"""Benchmark roomcast against the guide's servers and Node's ws: ``python benchmarks/run.py``.

Runs every scenario on every server in one invocation, interleaved (the servers take turns, and
the order flips on every repeat), prints tables and writes docs/benchmarks.md.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from benchconfig import CLUSTER_KINDS, SCALE_CONFIGS, SCALE_PEERS, SCENARIOS, WS_ROLES, Config
from channel import ChannelConfig, ChannelResult, matched_chat_size, run_channel
from chat import PREFIX, ChatConfig, ChatResult, run_chat, run_cut_check
from clients import EchoResult, run_echo, run_idle
from cluster import ClusterConfig, ClusterResult, run_cluster
from connect import ConnectResult, run_connect
from cpu import Usage, background_load
from deflate import run_deflate
from describe import (
    cluster_section_text,
    deflate_text,
    how_it_was_run,
    scale_section_text,
    scenario_text,
    ws_section_text,
)
from recovery import RecoveryConfig, RecoveryResult, run_recovery
from report import print_console, render_markdown
from roomcast.tools.loadgen import raise_file_limit
from samples import ROLES, Results, RunRecord, fmt, mem_key
from scale import ScaleScenario
from servers import (
    HOST,
    REPO_DIR,
    ServerProcess,
    cluster_node_spec,
    ensure_node_server,
    log_dir,
    pin_current_process_to_loadgen_core,
    redis_binary,
    redis_command,
    redis_spec,
    roomcast_importable,
    running_server,
    running_servers,
    scan_logs,
    server_spec,
)
from specs import metric_specs

QUIET_LOAD = 0.15  # cores used by others below which the machine counts as quiet
QUIET_WAIT_BUDGET_S = 120.0  # the most a whole invocation waits for quiet
NOISY_OTHER = 0.25  # cores used by others during a run above which the run is called noisy
BUSY_LOADGEN = 0.9  # load generator CPU share above which it may have been the bottleneck
DEFAULT_OUTPUT = REPO_DIR / "docs" / "benchmarks.md"
#: Every server --servers may name: the compared ones, and socketify (scale scenario only).
SERVERS = (*ROLES, "socketify")
MAX_MISSED = 256  # ROOMCAST_HISTORY_SIZE's default: recovery beyond it cannot be complete


def _ints(text: str) -> tuple[int, ...]:
    """Parse "2000,5000" into (2000, 5000)."""
    return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))


def parse_args(argv: Sequence[str]) -> Config:
    """Parse the command line into a Config (``--quick`` shrinks every size)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller, shorter runs (about two minutes) to check that all works",
    )
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma-separated scenarios among: "
        + ", ".join(SCENARIOS)
        + " (chat runs the plain fan-out and the one with a stalled member; channel and "
        "recovery use /ws and run on the roomcast servers only; cluster runs roomcast nodes on "
        "a private redis-server; scale runs roomcast on each broker, and the peers, at max "
        "rate and paced)",
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated servers among: "
        + ", ".join(SERVERS)
        + " (socketify is in the scale scenario's chat rows only)",
    )
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (median kept)")
    p.add_argument("--duration", type=float, help="echo: measured seconds per run (3)")
    p.add_argument(
        "--echo-rounds",
        type=int,
        help="echo: interleaved rounds per repeat, the median is kept (3)",
    )
    p.add_argument("--warmup", type=float, help="echo, connect: unmeasured seconds first (0.5)")
    p.add_argument("--echo-conns", type=int, default=64, help="echo: the many-connection case")
    p.add_argument(
        "--members", type=int, help="chat: members, channel: subscribers, recovery: clients (1000)"
    )
    p.add_argument("--messages", type=int, help="chat, channel: measured 64-byte messages (200)")
    p.add_argument(
        "--publish-window",
        type=int,
        default=256,
        help="channel: most publish requests left unanswered by the publisher (256)",
    )
    p.add_argument(
        "--channel-pairs",
        type=int,
        help="channel: sets of a chat, a /ws and a size-matched chat fan-out per server and "
        "repeat, the medians kept (5)",
    )
    p.add_argument(
        "--cluster-nodes",
        type=int,
        default=3,
        help="cluster: roomcast nodes sharing the channel through Redis (3)",
    )
    p.add_argument(
        "--cluster-subscribers",
        type=int,
        help="cluster: subscribers per node (300); the single node gets them all",
    )
    p.add_argument(
        "--cluster-rounds",
        type=int,
        help="cluster: rounds per repeat of the 3 configurations taking turns, medians kept (3)",
    )
    p.add_argument(
        "--scale-paced",
        type=int,
        help="scale: messages of the paced load (2000; --quick: 500)",
    )
    p.add_argument(
        "--scale-interval",
        type=float,
        default=1.0,
        help="scale: milliseconds between two messages of the paced load (1)",
    )
    p.add_argument(
        "--scale-rounds",
        type=int,
        default=3,
        help="scale: rounds per repeat of every configuration taking turns, medians kept (3)",
    )
    p.add_argument(
        "--cluster-replicas",
        type=int,
        default=1,
        help="scale: replicas per master of the Redis Cluster (3 masters) (1)",
    )
    p.add_argument(
        "--missed",
        type=int,
        default=100,
        help="recovery: publications made while the clients are away (100, at most 256: the "
        "server's default history size)",
    )
    p.add_argument(
        "--fill-messages",
        type=int,
        default=300,
        help="stall: 1 KiB messages sent first to fill the stalled member's buffers",
    )
    p.add_argument(
        "--idle-conns",
        type=_ints,
        help="memory: idle connection counts, RSS read at each (2000,5000)",
    )
    p.add_argument("--connect-clients", type=int, default=32, help="connect: client loops (32)")
    p.add_argument("--connect-duration", type=float, help="connect: measured seconds (3)")
    p.add_argument(
        "--connect-limit",
        type=int,
        help="connect: most connections opened per run, warm-up included (20000)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="chat: max seconds to wait for all deliveries",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=5.0,
        help="chat: a phase with no delivery for this long counts as stalled",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report path")
    p.add_argument("--no-write", action="store_true", help="print only, write no report")
    p.add_argument(
        "--no-wait-quiet",
        action="store_true",
        help="do not wait (up to 2 min in all) for other processes to go quiet",
    )
    p.add_argument(
        "--roomcast-as-baseline",
        action="store_true",
        help="harness self-test: run the baseline in the roomcast roles too",
    )
    a = p.parse_args(argv)
    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    wanted = {s.strip() for s in a.servers.split(",") if s.strip()}
    if wanted - set(SERVERS):
        p.error(f"unknown server(s): {', '.join(sorted(wanted - set(SERVERS)))}")
    if not wanted:
        p.error("--servers names no server")
    if not 1 <= a.missed <= MAX_MISSED:
        p.error(f"--missed must be 1 to {MAX_MISSED} (the server's default history size)")
    if a.publish_window < 1:
        p.error("--publish-window must be at least 1")
    if a.cluster_nodes < 2:
        p.error("--cluster-nodes must be at least 2")
    if a.scale_interval <= 0:
        p.error("--scale-interval must be above 0")
    if a.cluster_replicas < 0:
        p.error("--cluster-replicas must be 0 or more")
    quick = a.quick
    idle_counts = a.idle_conns or ((500, 1000) if quick else (2000, 5000))
    if not idle_counts or min(idle_counts) <= 0:
        p.error("--idle-conns needs positive counts")
    cfg = Config(
        only=only,
        servers=tuple(r for r in SERVERS if r in wanted),
        repeats=max(1, a.repeats),
        duration=a.duration or (1.5 if quick else 3.0),
        echo_rounds=max(1, a.echo_rounds or (1 if quick else 3)),
        warmup=a.warmup if a.warmup is not None else (0.3 if quick else 0.5),
        echo_conns=a.echo_conns,
        members=a.members or (200 if quick else 1000),
        messages=a.messages or (100 if quick else 200),
        fill_messages=a.fill_messages,
        idle_counts=idle_counts,
        connect_clients=max(1, a.connect_clients),
        connect_duration=a.connect_duration or (1.0 if quick else 3.0),
        connect_limit=a.connect_limit or (8000 if quick else 20000),
        settle=1.0 if quick else 2.0,
        drain_timeout=a.drain_timeout,
        idle_timeout=min(a.idle_timeout, 2.0) if quick else a.idle_timeout,
        roomcast_as_baseline=a.roomcast_as_baseline,
        output=None if a.no_write else a.output,
        wait_quiet=not a.no_wait_quiet,
        quick=quick,
        publish_window=a.publish_window,
        missed=a.missed,
        channel_pairs=max(1, a.channel_pairs or (1 if quick else 5)),
        cluster_nodes=a.cluster_nodes,
        cluster_subscribers=max(1, a.cluster_subscribers or (100 if quick else 300)),
        cluster_rounds=max(1, a.cluster_rounds or (1 if quick else 3)),
        scale_paced_messages=max(1, a.scale_paced or (500 if quick else 2000)),
        scale_interval_ms=a.scale_interval,
        scale_rounds=max(1, a.scale_rounds),
        cluster_replicas=a.cluster_replicas,
    )
    return cfg


def per_delivery_us(usage: Usage, delivered: int) -> tuple[float | None, float | None]:
    """Return the server's and the load generator's CPU per delivery, in µs."""
    if not delivered:
        return None, None
    return (
        usage.server * usage.wall_s / delivered * 1e6,
        usage.loadgen_cpu_s / delivered * 1e6,
    )


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit (inherited by the servers); return the new limit."""
    limit = raise_file_limit(needed)
    if limit < needed:
        print(
            f"warning: only {limit} file descriptors allowed, {needed} wanted; raise the hard "
            "limit (ulimit -Hn) or use smaller --idle-conns / --members",
            file=sys.stderr,
        )
    return limit


class Bench:
    """Runs the scenarios and records their figures into ``results``."""

    def __init__(self, cfg: Config) -> None:
        """Prepare an empty Results."""
        self.cfg = cfg
        self.results = Results()
        self.quiet_budget = QUIET_WAIT_BUDGET_S if cfg.wait_quiet else 0.0
        #: The chat runs paired with /ws fan-out runs, by (role, label): what they are
        #: compared with.
        self.chat_refs: dict[tuple[str, str], ChatResult] = {}
        #: The size-matched chat runs (lines as long as /ws frames) of the same sets, likewise.
        self.chatm_refs: dict[tuple[str, str], ChatResult] = {}
        #: The /ws fan-out runs and their per-run records, by (role, label).
        self.ws_refs: dict[tuple[str, str], tuple[ChannelResult, RunRecord]] = {}
        #: The cluster scenario's runs and their per-run records, by (configuration, label).
        self.cluster_refs: dict[tuple[str, str], tuple[ClusterResult, RunRecord]] = {}

    async def wait_for_quiet(self) -> None:
        """Wait (within the run's budget) until other work on the machine has calmed down."""
        load = await background_load()
        if load < QUIET_LOAD or self.quiet_budget <= 0:
            return
        print(f" (machine busy: {load:.2f} cores used by others; waiting)", end="", flush=True)
        start = time.perf_counter()
        while load >= QUIET_LOAD and time.perf_counter() - start < self.quiet_budget:
            load = await background_load(1.0)
        self.quiet_budget -= time.perf_counter() - start
        if load >= QUIET_LOAD:
            self.results.notes.append(
                f"other processes kept using {load:.2f} cores; the harness stopped waiting for "
                "quiet after its 2-minute budget, so the later figures are noisy."
            )

    async def guarded(
        self, scenario: str, role: str, run: str, body: Callable[[], Awaitable[None]]
    ) -> None:
        """Run one measurement; a failure is recorded (and printed), not fatal to the rest."""
        print(f"  {scenario:<24} {role:<13} ...", end="", flush=True)
        try:
            await self.wait_for_quiet()
            t0 = time.perf_counter()
            await body()
        except Exception as exc:  # one server failing a scenario must not stop the others
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.results.runs.append(RunRecord(scenario, role, run, "FAILED", None, None, msg))
            self.results.notes.append(f"{scenario} on {role} (run {run}) failed: {msg}")
            print(f" FAILED ({msg})")
            return
        print(f" {time.perf_counter() - t0:5.1f} s  {self.results.runs[-1].summary}")

    async def echo(self, repeat: int, order: Sequence[str]) -> None:
        """Echo with 1 and N connections: all servers up at once, ``echo_rounds`` rounds of
        runs taking turns (the order flips every round). A server that does not start is
        recorded as failed and left out."""
        cfg = self.cfg
        async with contextlib.AsyncExitStack() as stack:
            servers = {}
            for role in order:
                spec = server_spec(role, "echo", roomcast_as_baseline=cfg.roomcast_as_baseline)
                try:
                    servers[role] = (spec, await stack.enter_async_context(running_server(spec)))
                except Exception as exc:  # the other servers still get measured
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    self.results.runs.append(
                        RunRecord("echo", role, str(repeat + 1), "FAILED", None, None, msg)
                    )
                    self.results.notes.append(f"echo server {role} did not start: {msg}")
                    print(f"  echo: {role} did not start ({msg})")
            for rnd in range(cfg.echo_rounds):
                turn = [r for r in (order if rnd % 2 == 0 else order[::-1]) if r in servers]
                label = f"{repeat + 1}.{rnd + 1}"
                for conns, key in ((1, "echo1"), (cfg.echo_conns, "echoN")):
                    for role in turn:
                        spec, server = servers[role]
                        await self.guarded(
                            f"echo {conns} conn",
                            role,
                            label,
                            functools.partial(
                                self.echo_run,
                                role,
                                key,
                                label,
                                conns,
                                spec.url("/ws/echo"),
                                server.cpu_seconds,
                            ),
                        )

    async def echo_run(
        self, role: str, key: str, label: str, conns: int, url: str, cpu: Callable[[], float]
    ) -> None:
        """One echo measurement, recorded under ``key``."""
        res = await run_echo(url, conns, self.cfg.warmup, self.cfg.duration, cpu)
        self.record_echo(role, key, label, res)

    def record_echo(self, role: str, key: str, label: str, res: EchoResult) -> None:
        """Store one echo run's figures."""
        r = self.results
        r.add(role, f"{key}.rtps", res.rtps)
        r.add(role, f"{key}.p50_us", res.p50_us)
        r.add(role, f"{key}.p99_us", res.p99_us)
        r.add(role, f"{key}.errors", res.errors)
        r.add(role, f"{key}.loadgen", res.usage.loadgen * 100)
        r.runs.append(
            RunRecord(
                f"echo, {res.connections} conn",
                role,
                label,
                f"{res.rtps:,.0f} rt/s, p50 {fmt(res.p50_us)} µs, p99 {fmt(res.p99_us)} µs",
                res.usage.server,
                res.usage.loadgen,
                f"{res.round_trips:,} round trips in {res.window_s:.1f} s, "
                f"{res.errors} wrong/missing replies",
                res.usage.other,
            )
        )

    async def chat(
        self,
        repeat: int,
        role: str,
        with_staller: bool,
        pair_label: str = "",
        matched: bool = False,
    ) -> None:
        """One chat fan-out on a fresh server (a stalled member too if ``with_staller``).

        With ``pair_label`` it is a chat run of a /ws-versus-chat set: recorded apart from
        the chat scenario's figures, for the /ws fan-out run of the same label. With
        ``matched`` too, its message is padded so that its line is as long as a /ws
        publication frame of that run (:func:`channel.matched_chat_size`).
        """
        cfg = self.cfg
        size = matched_chat_size(self.channel_config()) if matched else ChatConfig.size
        ccfg = ChatConfig(
            members=cfg.members,
            messages=cfg.messages,
            size=size,
            with_staller=with_staller,
            fill_messages=cfg.fill_messages,
            drain_timeout_s=cfg.drain_timeout,
            idle_timeout_s=cfg.idle_timeout,
        )
        spec = server_spec(role, "chat", roomcast_as_baseline=cfg.roomcast_as_baseline)
        async with running_server(spec) as server:
            res = await run_chat(
                HOST, spec.port, "/ws/chat", ccfg, server.cpu_seconds_precise, server.stop
            )
        if pair_label:
            refs, key = (self.chatm_refs, "chat_wsm") if matched else (self.chat_refs, "chat_ws")
            refs[(role, pair_label)] = res
            self.record_chat(role, repeat, res, key, pair_label, len(PREFIX) + size)
        else:
            self.record_chat(role, repeat, res)

    def record_chat(
        self,
        role: str,
        repeat: int,
        res: ChatResult,
        key: str = "",
        label: str = "",
        line_bytes: int | None = None,
    ) -> None:
        """Store one chat run's figures (and the stalled/unstalled ratio when both exist).

        ``line_bytes`` (the length of a measured chat line) goes into the notes if given.
        """
        r = self.results
        key = key or ("stall" if res.with_staller else "chat")
        per_delivery = res.usage.loadgen_cpu_s / res.delivered if res.delivered else None
        server_per = res.usage.server * res.usage.wall_s / res.delivered if res.delivered else None
        r.add(role, f"{key}.loadgen", res.usage.loadgen * 100)
        r.add(role, f"{key}.srv_us", None if server_per is None else server_per * 1e6)
        r.add(role, f"{key}.lg_us", None if per_delivery is None else per_delivery * 1e6)
        r.add(role, f"{key}.dps", res.dps)
        r.add(role, f"{key}.p50_ms", res.p50_ms)
        r.add(role, f"{key}.p99_ms", res.p99_ms)
        r.add(role, f"{key}.lost", res.lost)
        if res.with_staller:
            plain = r.samples.get((role, "chat.dps"), [])
            if len(plain) > repeat and plain[repeat]:
                r.add(role, "stall.rel", res.dps / float(plain[repeat] or 1))
            room = (
                "all delivered"
                if not res.stalled
                else f"STALLED: {res.delivered:,} of {res.expected:,} delivered"
            )
            r.add_text(role, "stall.outcome", room)
            r.add_text(role, "stall.staller", res.staller)
        notes = [f"{res.delivered:,}/{res.expected:,} delivered"]
        if res.stalled:
            why = (
                f"no delivery for {self.cfg.idle_timeout:g} s"
                if res.outcome == "idle"
                else f"not all in {self.cfg.drain_timeout:g} s"
            )
            notes.append(f"STALLED ({why})")
        if per_delivery:
            notes.append(
                f"loadgen {per_delivery * 1e6:.2f} µs CPU per delivery (at this batching it "
                f"would saturate near {1 / per_delivery:,.0f}/s)"
            )
        if res.with_staller:
            notes.append(f"fill {res.fill_delivered:,}/{res.fill_expected:,} ({res.fill_outcome})")
            notes.append(f"stalled member: {res.staller_detail}")
            notes.append(f"'A client left' notices: {res.left_notices:,}")
        if res.mismatched or res.unexpected:
            notes.append(f"{res.mismatched} wrong payloads, {res.unexpected} unexpected messages")
        if line_bytes is not None:
            notes.append(f"{line_bytes} bytes per chat line")
        notes.append(f"connect {res.connect_s:.1f} s")
        summary = (
            f"{res.dps:,.0f} deliveries/s, p50 {fmt(res.p50_ms, 1)} ms, "
            f"p99 {fmt(res.p99_ms, 1)} ms, lost {res.lost:,}"
        )
        scenario = f"chat, {res.members:,} members" + (" + 1 stalled" if res.with_staller else "")
        if key == "chat_each":
            scenario += ", one write per message"
        elif key == "chat_ws":
            scenario += " (paired with /ws)"
        elif key == "chat_wsm":
            scenario += " (lines as long as /ws frames, paired with /ws)"
        r.runs.append(
            RunRecord(
                scenario,
                role,
                label or str(repeat + 1),
                summary,
                res.usage.server,
                res.usage.loadgen,
                "; ".join(notes),
                res.usage.other,
            )
        )

    def channel_config(self) -> ChannelConfig:
        """Return the /ws fan-out's configuration (its frames set the matched chat's size)."""
        cfg = self.cfg
        return ChannelConfig(
            members=cfg.members,
            messages=cfg.messages,
            window=cfg.publish_window,
            drain_timeout_s=cfg.drain_timeout,
            idle_timeout_s=cfg.idle_timeout,
        )

    async def channel(self, repeat: int, role: str, label: str) -> None:
        """The /ws fan-out on a fresh server (compared with the chat runs of the same label)."""
        ccfg = self.channel_config()
        spec = server_spec(role, "ws")
        async with running_server(spec) as server:
            res = await run_channel(HOST, spec.port, ccfg, server.cpu_seconds_precise, server.stop)
        self.record_channel(role, label, res)

    def record_channel(self, role: str, label: str, res: ChannelResult) -> None:
        """Store one /ws fan-out run's figures (its ratio comes with :meth:`record_pair`)."""
        r = self.results
        srv_us, lg_us = per_delivery_us(res.usage, res.delivered)
        r.add(role, "channel.dps", res.dps)
        r.add(role, "channel.p50_ms", res.p50_ms)
        r.add(role, "channel.p99_ms", res.p99_ms)
        r.add(role, "channel.lost", res.lost)
        r.add(role, "channel.errors", res.errors)
        r.add(role, "channel.server", res.usage.server * 100)
        r.add(role, "channel.loadgen", res.usage.loadgen * 100)
        r.add(role, "channel.srv_us", srv_us)
        r.add(role, "channel.lg_us", lg_us)
        notes = [f"{res.delivered:,}/{res.expected:,} delivered"]
        if res.outcome != "done":
            notes.append(f"STOPPED ({res.outcome})")
        notes.append(
            f"{res.frame_bytes} bytes per publication frame (mean); publish window {res.window}"
        )
        if srv_us is not None and lg_us is not None:
            notes.append(f"CPU per delivery: server {srv_us:.2f} µs, loadgen {lg_us:.2f} µs")
        if res.errors:
            notes.append(
                f"errors: {res.order_errors} offsets not increasing, {res.wrong_channel} wrong "
                f"channel, {res.mismatched} wrong publications, {res.unexpected} unexpected "
                f"frames, {res.subscribe_errors} failed subscribes, {res.publish_errors} failed "
                "publishes"
            )
        if res.slow_hits:
            notes.append(f"{res.slow_hits:,} deliveries took the slow path")
        notes.append(f"connect + subscribe {res.connect_s:.1f} s")
        record = RunRecord(
            f"/ws fan-out, {res.members:,} subscribers",
            role,
            label,
            f"{res.dps:,.0f} deliveries/s, p50 {fmt(res.p50_ms, 1)} ms, "
            f"p99 {fmt(res.p99_ms, 1)} ms, lost {res.lost:,}, errors {res.errors:,}",
            res.usage.server,
            res.usage.loadgen,
            "; ".join(notes),
            res.usage.other,
        )
        r.runs.append(record)
        self.ws_refs[(role, label)] = (res, record)

    def record_pair(self, role: str, label: str) -> None:
        """Store the /ws ÷ chat ratios of one set, and the chat runs' figures beside them.

        Two chat runs per set: ``channel.chat_*`` (the chat scenario's 64-byte messages) and
        ``channel.chatm_*`` (lines as long as the /ws frames).
        """
        pair = self.ws_refs.get((role, label))
        if pair is None:
            return
        ws, record = pair
        r = self.results
        for prefix, refs, what in (
            ("chat", self.chat_refs, "chat run"),
            ("chatm", self.chatm_refs, "size-matched chat run"),
        ):
            chat = refs.get((role, label))
            if chat is None:
                continue
            rel = ws.dps / chat.dps if chat.dps and ws.dps else None
            srv_us, lg_us = per_delivery_us(chat.usage, chat.delivered)
            r.add(role, f"channel.{prefix}_dps", chat.dps)
            r.add(role, f"channel.{prefix}_p50_ms", chat.p50_ms)
            r.add(role, f"channel.{prefix}_p99_ms", chat.p99_ms)
            r.add(role, f"channel.{prefix}_lost", chat.lost)
            r.add(role, f"channel.{prefix}_server", chat.usage.server * 100)
            r.add(role, f"channel.{prefix}_loadgen", chat.usage.loadgen * 100)
            r.add(role, f"channel.{prefix}_srv_us", srv_us)
            r.add(role, f"channel.{prefix}_lg_us", lg_us)
            if rel is not None:
                record.notes += f"; ÷ the {what} {label} ({chat.dps:,.0f}/s): {rel:.2f}×"

    def record_channel_ratios(self) -> None:
        """Store each /ws server's median /ws fan-out ÷ its median paired chat fan-out, and
        ÷ its median size-matched chat fan-out (``channel.rel_matched``)."""
        r = self.results
        for role in WS_ROLES:
            ws, chat = r.key_value(role, "channel.dps"), r.key_value(role, "channel.chat_dps")
            if ws and chat:
                r.add(role, "channel.rel", ws / chat)
                r.add(role, "channel.pairs", len(r.samples[(role, "channel.chat_dps")]))
            chatm = r.key_value(role, "channel.chatm_dps")
            if ws and chatm:
                r.add(role, "channel.rel_matched", ws / chatm)

    async def recovery(self, repeat: int, role: str) -> None:
        """Subscribe, leave, miss publications, reconnect all at once and recover (/ws)."""
        cfg = self.cfg
        rcfg = RecoveryConfig(
            clients=cfg.members,
            missed=cfg.missed,
            window=cfg.publish_window,
            timeout_s=max(60.0, cfg.drain_timeout),
            idle_timeout_s=cfg.idle_timeout,
        )
        spec = server_spec(role, "ws")
        async with running_server(spec) as server:
            res = await run_recovery(HOST, spec.port, rcfg, server.cpu_seconds_precise, server.stop)
        self.record_recovery(role, repeat, res)

    def record_recovery(self, role: str, repeat: int, res: RecoveryResult) -> None:
        """Store one recovery run's figures."""
        r = self.results
        r.add(role, "recovery.total_ms", None if res.total_s is None else res.total_s * 1e3)
        r.add(role, "recovery.connect_ms", None if res.connect_s is None else res.connect_s * 1e3)
        r.add(role, "recovery.p50_ms", res.p50_ms)
        r.add(role, "recovery.p99_ms", res.p99_ms)
        r.add(role, "recovery.unrecovered", res.recovered_false + (res.clients - res.replies))
        r.add(role, "recovery.lost", res.lost)
        r.add(role, "recovery.duplicates", res.duplicates)
        r.add(role, "recovery.errors", res.errors + res.replayed_wrong + res.before_reply)
        r.add(role, "recovery.server", res.usage.server * 100)
        r.add(role, "recovery.loadgen", res.usage.loadgen * 100)
        notes = [
            f"{res.completed:,}/{res.clients:,} clients recovered everything",
            f"replies {res.replies:,} ({res.recovered_false} recovered:false, "
            f"{res.replayed_wrong} with a wrong 'replayed')",
        ]
        if res.outcome != "done":
            notes.append(f"STOPPED ({res.outcome})")
        if res.before_reply:
            notes.append(f"{res.before_reply} publications ahead of their subscribe reply")
        if res.errors:
            notes.append(f"{res.errors} errors, first: {res.first_error}")
        if res.slow_hits:
            notes.append(f"{res.slow_hits:,} replays missed the exact-bytes fast path")
        notes.append(f"every first connection gone {res.gone_s * 1e3:.0f} ms after closing")
        total = "—" if res.total_s is None else f"{res.total_s * 1e3:,.0f} ms"
        r.runs.append(
            RunRecord(
                f"/ws recovery, {res.clients:,} clients × {res.missed} missed",
                role,
                str(repeat + 1),
                f"all recovered in {total} (handshakes done at "
                f"{fmt(None if res.connect_s is None else res.connect_s * 1e3)} ms), "
                f"recovered:false {res.recovered_false}, lost {res.lost:,}, "
                f"duplicates {res.duplicates:,}",
                res.usage.server,
                res.usage.loadgen,
                "; ".join(notes),
                res.usage.other,
            )
        )

    def cluster_skip_reason(self) -> str | None:
        """Return why the cluster scenario cannot run in this invocation, or None."""
        cfg = self.cfg
        if cfg.roomcast_as_baseline:
            return "the roomcast roles run the baseline (--roomcast-as-baseline)"
        if "roomcast" not in cfg.servers:
            return "the roomcast server was not selected (--servers)"
        if redis_binary() is None:
            return "redis-server is not on PATH"
        return None

    async def cluster(self, repeat: int) -> None:
        """The cluster scenario: on one private redis-server, ``cluster_rounds`` rounds of the
        three configurations (N nodes on Redis, 1 node on memory://, 1 node on Redis) taking
        turns, the order flipped every round; a fresh set of roomcast processes every run."""
        cfg = self.cfg
        why = self.cluster_skip_reason()
        if why is not None:
            if repeat == 0:
                self.results.notes.append(f"cluster not run: {why}.")
                print(f"  cluster: skipped ({why})")
            return
        try:
            async with running_server(redis_spec()) as redis:
                for i in range(cfg.cluster_rounds):
                    label = f"{repeat + 1}.{i + 1}"
                    turn = (repeat * cfg.cluster_rounds + i) % 2
                    kinds = CLUSTER_KINDS if turn == 0 else CLUSTER_KINDS[::-1]
                    for kind in kinds:
                        await self.guarded(
                            "/ws cluster fan-out",
                            kind,
                            label,
                            functools.partial(self.cluster_run, kind, label, redis),
                        )
                    self.record_cluster_round(label)
        except Exception as exc:  # redis-server did not start: the other scenarios go on
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.results.notes.append(f"cluster: redis-server did not start: {msg}")
            print(f"  cluster: redis-server did not start ({msg})")

    async def cluster_run(self, kind: str, label: str, redis: ServerProcess) -> None:
        """One run of configuration ``kind`` on fresh roomcast processes (Redis emptied)."""
        cfg = self.cfg
        if await redis_command(redis.spec.port, "FLUSHALL") != b"+OK":
            raise RuntimeError("redis-server did not answer FLUSHALL")
        on_redis = kind != "single-memory"
        broker = f"redis://{HOST}:{redis.spec.port}" if on_redis else "memory://"
        nodes = cfg.cluster_nodes if kind == "cluster" else 1
        specs = [cluster_node_spec(broker, f"{kind}-n{n + 1}") for n in range(nodes)]
        ccfg = ClusterConfig(
            per_node=cfg.cluster_subscribers,
            messages=cfg.messages,
            window=cfg.publish_window,
            drain_timeout_s=cfg.drain_timeout,
            idle_timeout_s=cfg.idle_timeout,
        )
        async with running_servers(specs) as servers:
            urls = [spec.url("/ws") for spec in specs]
            # The single node takes every slot: the same subscribers and publisher connections.
            slots = urls if len(urls) == cfg.cluster_nodes else urls[:1] * cfg.cluster_nodes
            broker_cpu = redis.cpu_seconds_precise if on_redis else None

            def server_cpu() -> float:
                total = sum(server.cpu_seconds_precise() for server in servers)
                return total + (broker_cpu() if broker_cpu else 0.0)

            warnings: list[str] = []

            async def stop_servers() -> None:
                # Broker warnings logged up to now (not those of the shutdown that follows:
                # closing hundreds of connections at once can log some).
                for server in servers:
                    lines = server.log_path.read_text(errors="replace").splitlines()
                    warnings.extend(ln.strip() for ln in lines if "broker" in ln)
                await asyncio.gather(*(server.stop() for server in servers))

            res = await run_cluster(slots, ccfg, server_cpu, broker_cpu, stop_servers)
        self.record_cluster(kind, label, res, warnings)

    def record_cluster(
        self, kind: str, label: str, res: ClusterResult, warnings: Sequence[str] = ()
    ) -> None:
        """Store one cluster-scenario run's figures (``warnings``: the nodes' broker warnings
        logged during the run)."""
        r = self.results
        srv_us, lg_us = per_delivery_us(res.usage, res.delivered)
        r.add(kind, "cluster.dps", res.dps)
        r.add(kind, "cluster.p50_ms", res.p50_ms)
        r.add(kind, "cluster.p99_ms", res.p99_ms)
        r.add(kind, "cluster.d50_ms", res.d50_ms)
        r.add(kind, "cluster.d99_ms", res.d99_ms)
        r.add(kind, "cluster.lost", res.lost)
        r.add(kind, "cluster.duplicates", res.duplicates)
        r.add(kind, "cluster.out_of_order", res.out_of_order)
        r.add(kind, "cluster.errors", res.errors)
        r.add(kind, "cluster.server", res.usage.server * 100)
        r.add(kind, "cluster.broker", res.broker * 100 if kind != "single-memory" else None)
        r.add(kind, "cluster.srv_us", srv_us)
        r.add(kind, "cluster.loadgen", res.usage.loadgen * 100)
        r.add(kind, "cluster.lg_us", lg_us)
        r.add(kind, "cluster.runs", 1)
        r.add(kind, "cluster.nodes", res.nodes)
        notes = [f"{res.delivered:,}/{res.expected:,} delivered"]
        if res.outcome != "done":
            notes.append(f"STOPPED ({res.outcome})")
        where = f"{res.nodes} nodes" if res.nodes > 1 else "1 node"
        notes.append(
            f"{res.slots} × {res.per_node:,} subscribers and {res.slots} publisher connections "
            f"on {where}; shares {'+'.join(map(str, res.shares))} publications, window "
            f"{res.window} each"
        )
        if res.broker:
            notes.append(f"redis-server {res.broker * 100:.0f} % of core 0")
        if srv_us is not None and lg_us is not None:
            notes.append(f"CPU per delivery: server side {srv_us:.2f} µs, loadgen {lg_us:.2f} µs")
        if res.errors:
            notes.append(
                f"errors: {res.offset_errors} offsets not as acknowledged, {res.wrong_channel} "
                f"wrong channel, {res.mismatched} wrong publications, {res.unexpected} "
                f"unexpected frames, {res.subscribe_errors} failed subscribes, "
                f"{res.publish_errors} failed publishes, connections closed: "
                f"{res.close_codes or 'none'}"
            )
        if res.slow_hits:
            notes.append(f"{res.slow_hits:,} deliveries took the slow path")
        if warnings:
            notes.append(f"{len(warnings)} broker warning(s) in the nodes' logs: {warnings[0]}")
            r.notes.append(
                f"cluster run {label} on {kind}: the nodes logged {len(warnings)} broker "
                f"warning(s) before they were stopped; first: {warnings[0][:200]}"
            )
        notes.append(f"connect + subscribe {res.connect_s:.1f} s")
        record = RunRecord(
            f"/ws cluster fan-out, {res.subscribers:,} subscribers",
            kind,
            label,
            f"{res.dps:,.0f} deliveries/s, p50 {fmt(res.p50_ms, 1)} ms, "
            f"p99 {fmt(res.p99_ms, 1)} ms, lost {res.lost:,}, duplicates {res.duplicates:,}, "
            f"out of order {res.out_of_order:,}, errors {res.errors:,}",
            res.usage.server,
            res.usage.loadgen,
            "; ".join(notes),
            res.usage.other,
        )
        r.runs.append(record)
        self.cluster_refs[(kind, label)] = (res, record)

    def record_cluster_round(self, label: str) -> None:
        """Note in the cluster run's record its ratio to the single node runs of its round."""
        ref = self.cluster_refs.get(("cluster", label))
        if ref is None or not ref[0].dps:
            return
        res, record = ref
        for kind, what in (("single-memory", "memory://"), ("single-redis", "redis://")):
            single = self.cluster_refs.get((kind, label))
            if single is not None and single[0].dps:
                record.notes += f"; ÷ 1 node on {what} ({single[0].dps:,.0f}/s): "
                record.notes += f"{res.dps / single[0].dps:.2f}×"

    async def cut(self, repeat: int, role: str) -> None:
        """A sender and one stalled member: does the room cut the member or stall?"""
        spec = server_spec(role, "chat", roomcast_as_baseline=self.cfg.roomcast_as_baseline)
        async with running_server(spec) as server:
            res = await run_cut_check(HOST, spec.port, "/ws/chat", server.stop)
        self.results.add_text(role, "cut.outcome", res.summary)
        self.results.runs.append(
            RunRecord(
                "chat, 1 sender + 1 stalled member",
                role,
                str(repeat + 1),
                res.summary,
                None,
                None,
                f"{res.sent:,} messages of 1 KiB sent; stalled member: {res.staller_detail}",
            )
        )

    async def memory(self, repeat: int, role: str, app: str) -> None:
        """Server RSS growth for idle connections to /ws/``app`` on a fresh server, read at
        every checkpoint of ``idle_counts``."""
        cfg = self.cfg
        spec = server_spec(role, app, roomcast_as_baseline=cfg.roomcast_as_baseline)
        reply = b"Client says: warm" if app == "chat" else b"Echo: warm"
        async with running_server(spec) as server:
            res = await run_idle(
                spec.url(f"/ws/{app}"),
                cfg.idle_counts,
                reply,
                cfg.settle,
                server.rss_bytes,
                server.stop,
            )
        r = self.results
        for point in res.points:
            r.add(role, mem_key(app, point.connections), res.kib_per_conn(point))
            r.add(role, mem_key(app, point.connections, "mib"), point.rss / 2**20)
        r.runs.append(
            RunRecord(
                f"memory, idle /ws/{app}",
                role,
                str(repeat + 1),
                ", ".join(
                    f"{p.connections:,}: {res.kib_per_conn(p):.1f} KiB/conn" for p in res.points
                ),
                None,
                None,
                f"RSS {res.rss_before / 2**20:.1f} MiB before, then "
                + ", ".join(
                    f"{p.rss / 2**20:.1f} MiB at {p.connections:,} (connected in "
                    f"{p.connect_s:.1f} s)"
                    for p in res.points
                ),
            )
        )

    async def connect(self, repeat: int, role: str) -> None:
        """New connections per second to /ws/echo on a fresh server."""
        spec = server_spec(role, "echo", roomcast_as_baseline=self.cfg.roomcast_as_baseline)
        async with running_server(spec) as server:
            res = await self.connect_run(spec.port, server.cpu_seconds)
        self.record_connect(role, str(repeat + 1), res)

    async def connect_run(self, port: int, cpu: Callable[[], float]) -> ConnectResult:
        """One connect measurement against the server on ``port``."""
        cfg = self.cfg
        return await run_connect(
            HOST,
            port,
            "/ws/echo",
            cfg.connect_clients,
            cfg.warmup,
            cfg.connect_duration,
            cfg.connect_limit,
            cpu,
        )

    def record_connect(self, role: str, label: str, res: ConnectResult) -> None:
        """Store one connect run's figures."""
        r = self.results
        r.add(role, "connect.cps", res.cps)
        r.add(role, "connect.p50_ms", res.handshake_p50_ms)
        r.add(role, "connect.p99_ms", res.handshake_p99_ms)
        r.add(role, "connect.errors", res.errors + res.wrong)
        r.add(role, "connect.loadgen", res.usage.loadgen * 100)
        per = res.usage.loadgen_cpu_s / res.completed if res.completed else None
        r.add(role, "connect.lg_us", None if per is None else per * 1e6)
        notes = [
            f"{res.completed:,} cycles in {res.window_s:.1f} s ({res.started:,} started in all)",
            f"cycle p50 {fmt(res.cycle_p50_ms, 2)} ms",
        ]
        if per is not None:
            notes.append(f"loadgen {per * 1e6:.0f} µs CPU per connection")
        if res.budget_spent:
            notes.append("connection budget spent: the window ended early")
        if res.errors or res.wrong:
            notes.append(
                f"{res.errors} failed, {res.wrong} wrong replies; first: {res.first_error}"
            )
        r.runs.append(
            RunRecord(
                f"new connections, {res.clients} clients",
                role,
                label,
                f"{res.cps:,.0f} conn/s, connect+upgrade p50 {fmt(res.handshake_p50_ms, 2)} ms, "
                f"p99 {fmt(res.handshake_p99_ms, 2)} ms, errors {res.errors + res.wrong}",
                res.usage.server,
                res.usage.loadgen,
                "; ".join(notes),
                res.usage.other,
            )
        )

    async def ceiling(self) -> None:
        """Echo, chat and connect against the minimal reference server: the load generator's
        ceiling."""
        cfg = self.cfg
        spec = server_spec("reference", "echo")
        async with running_server(spec) as server:
            for conns, key in ((1, "echo1"), (cfg.echo_conns, "echoN")):
                await self.guarded(
                    f"ceiling: echo {conns} conn",
                    "reference",
                    "1",
                    functools.partial(
                        self.echo_run,
                        "reference",
                        key,
                        "1",
                        conns,
                        spec.url("/ws/echo"),
                        server.cpu_seconds,
                    ),
                )

            async def chat_body(path: str, key: str) -> None:
                ccfg = ChatConfig(
                    members=cfg.members,
                    messages=cfg.messages,
                    drain_timeout_s=cfg.drain_timeout,
                    idle_timeout_s=cfg.idle_timeout,
                )
                res = await run_chat(HOST, spec.port, path, ccfg, server.cpu_seconds, server.stop)
                self.record_chat("reference", 0, res, key)

            if "chat" in cfg.only:
                await self.guarded(
                    "ceiling: chat, batched",
                    "reference",
                    "1",
                    functools.partial(chat_body, "/ws/chat", "chat"),
                )
        if "chat" in cfg.only:
            # A fresh server: the first chat run stopped its server before disconnecting.
            spec = server_spec("reference", "chat")
            async with running_server(spec) as server:
                await self.guarded(
                    "ceiling: chat, unbatched",
                    "reference",
                    "1",
                    functools.partial(chat_body, "/ws/chat-each", "chat_each"),
                )
        if "connect" in cfg.only:
            spec = server_spec("reference", "echo")
            async with running_server(spec) as server:

                async def connect_body() -> None:
                    res = await self.connect_run(spec.port, server.cpu_seconds)
                    self.record_connect("reference", "1", res)

                await self.guarded("ceiling: connect", "reference", "1", connect_body)

    async def ws_scenarios(self, repeat: int, order: Sequence[str]) -> None:
        """The /ws channel fan-out and recovery, on the roomcast servers only."""
        cfg = self.cfg
        wanted = [s for s in ("channel", "recovery") if s in cfg.only]
        if not wanted:
            return
        roles = [role for role in order if role in WS_ROLES]
        if cfg.roomcast_as_baseline or not roles:
            if repeat == 0:
                why = (
                    "the roomcast roles run the baseline (--roomcast-as-baseline)"
                    if cfg.roomcast_as_baseline
                    else "no roomcast server was selected"
                )
                self.results.notes.append(
                    f"{' and '.join(wanted)} not run: only roomcast has /ws, and {why}."
                )
                print(f"  {', '.join(wanted)}: skipped ({why})")
            return
        for role in roles:
            if "channel" not in wanted:
                break
            # Sets of a chat, a /ws and a size-matched chat fan-out (lines as long as the /ws
            # frames), each on a fresh server, back to back, the order reversed every other set
            # (ABC CBA): a single fan-out burst varies by tens of percent from run to run, so
            # the ratios are taken between medians.
            for i in range(cfg.channel_pairs):
                label = f"{repeat + 1}.{i + 1}"
                kinds = ("chat", "ws", "chatm")
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    if kind != "ws":
                        matched = kind == "chatm"
                        await self.guarded(
                            "chat (matched to /ws)" if matched else "chat (paired with /ws)",
                            role,
                            label,
                            functools.partial(
                                self.chat, repeat, role, False, label, matched=matched
                            ),
                        )
                    else:
                        await self.guarded(
                            "/ws channel fan-out",
                            role,
                            label,
                            functools.partial(self.channel, repeat, role, label),
                        )
                self.record_pair(role, label)
        for role in roles:
            if "recovery" in wanted:
                await self.guarded(
                    "/ws recovery",
                    role,
                    str(repeat + 1),
                    functools.partial(self.recovery, repeat, role),
                )

    async def deflate(self) -> None:
        """The permessage-deflate micro-benchmark (no server involved)."""
        print("  permessage-deflate micro-benchmark ...", end="", flush=True)
        await self.wait_for_quiet()
        t0 = time.perf_counter()
        self.results.deflate = run_deflate(0.02 if self.cfg.quick else 0.05)
        print(f" {time.perf_counter() - t0:5.1f} s")

    async def run_all(self) -> Results:
        """Run every selected scenario for every server, ``repeats`` times, interleaved."""
        cfg = self.cfg
        roles = tuple(r for r in cfg.servers if r in ROLES)
        scale = ScaleScenario(cfg, self.results, self.guarded)
        if "ceiling" in cfg.only:
            print("load generator ceiling (minimal picows server)")
            await self.ceiling()
        for repeat in range(cfg.repeats):
            order = roles if repeat % 2 == 0 else roles[::-1]
            print(f"repeat {repeat + 1}/{cfg.repeats} (order: {' then '.join(order)})")
            if "echo" in cfg.only:
                await self.echo(repeat, order)
            for with_staller in (False, True):
                if "chat" in cfg.only:
                    for role in order:
                        await self.guarded(
                            "chat" + (" + stalled member" if with_staller else ""),
                            role,
                            str(repeat + 1),
                            functools.partial(self.chat, repeat, role, with_staller),
                        )
                if not with_staller:  # /ws right after the chat runs it is compared with
                    await self.ws_scenarios(repeat, order)
            if "cluster" in cfg.only:
                await self.cluster(repeat)
            if "scale" in cfg.only:
                await scale.run(repeat)
            if "chat" in cfg.only:
                for role in order:
                    await self.guarded(
                        "chat: cut or stall?",
                        role,
                        str(repeat + 1),
                        functools.partial(self.cut, repeat, role),
                    )
            if "connect" in cfg.only:
                for role in order:
                    await self.guarded(
                        "new connections",
                        role,
                        str(repeat + 1),
                        functools.partial(self.connect, repeat, role),
                    )
            if "memory" in cfg.only:
                for app in ("chat", "echo"):
                    for role in order:
                        await self.guarded(
                            f"memory /ws/{app}",
                            role,
                            str(repeat + 1),
                            functools.partial(self.memory, repeat, role, app),
                        )
        if "deflate" in cfg.only:
            await self.deflate()
        self.record_channel_ratios()
        return self.results


def auto_notes(cfg: Config, results: Results) -> None:
    """Add notes that follow from the numbers (saturated load generator, self-test)."""
    if cfg.roomcast_as_baseline:
        results.notes.insert(0, "SELF-TEST: the roomcast column ran the baseline too.")
    for r in results.runs:
        if r.other_cpu is not None and r.other_cpu >= NOISY_OTHER:
            results.notes.append(
                f"other processes used {r.other_cpu * 100:.0f} % of a core during "
                f"'{r.scenario}' on {r.role}: that figure is noisy."
            )
        busy_role = r.role in (*ROLES, *CLUSTER_KINDS, *SCALE_CONFIGS, *SCALE_PEERS)
        if busy_role and r.loadgen_cpu is not None and r.loadgen_cpu >= BUSY_LOADGEN:
            results.notes.append(
                f"load generator at {r.loadgen_cpu * 100:.0f} % of its core in "
                f"'{r.scenario}' on {r.role}: that figure may be limited by the client side."
            )
    wall = results.key_value("reference", "chat_each.dps")
    for role in ("roomcast", "roomcast-asgi", "node"):
        dps = results.key_value(role, "chat.dps")
        if wall and dps and dps >= 0.9 * wall:
            results.notes.append(
                f"{role}'s chat fan-out ({dps:,.0f} deliveries/s) is within 10 % of (or above) "
                f"the minimal server that writes every message with one system call per member "
                f"({wall:,.0f}/s, load generator ceiling): on this machine that is about the "
                "limit for unbatched writes, whatever the server's own code costs."
            )
    if not cfg.roomcast_as_baseline:  # (in the self-test those logs are the baseline's)
        for role, path, summary in scan_logs(("roomcast", "roomcast-asgi")):
            results.notes.append(f"{role} server log {path}: {summary}")
    if cfg.repeats == 1:
        results.notes.append(
            "One repeat (echo: medians of its interleaved rounds): figures within ~10 % of each "
            "other are within run-to-run noise here; --repeats 3 gives medians for everything."
        )


def prepare_node(cfg: Config, notes: list[str]) -> tuple[Config, str]:
    """Install benchmarks/node's dependencies if needed; drop the node column if that fails.

    Returns the (possibly reduced) config and the Node.js version (or the reason it is absent).
    """
    if "node" not in cfg.servers:
        return cfg, "not run"
    try:
        return cfg, ensure_node_server()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"node column dropped: {exc}", file=sys.stderr)
        notes.append(f"the node column was not run: {str(exc).splitlines()[0]}")
        servers = tuple(r for r in cfg.servers if r != "node")
        return dataclasses.replace(cfg, servers=servers), f"unavailable ({exc})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(args)
    try:
        import uvloop
    except ImportError:
        print("uvloop is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if not cfg.roomcast_as_baseline and {"roomcast", "roomcast-asgi"} & set(cfg.servers):
        ok, err = roomcast_importable()
        if not ok:
            print(
                f"roomcast is not importable ({err}).\nInstall it: pip install -e '.[bench]'"
                " (or try the harness with --roomcast-as-baseline)",
                file=sys.stderr,
            )
            return 2
    early_notes: list[str] = []
    cfg, node_version = prepare_node(cfg, early_notes)
    biggest = max(*cfg.idle_counts, cfg.cluster_nodes * cfg.cluster_subscribers)
    fd_limit = raise_fd_limit(biggest + cfg.members + cfg.connect_clients + 512)
    pinned = pin_current_process_to_loadgen_core()
    print(
        f"roomcast benchmark: {', '.join(cfg.only)} on {', '.join(cfg.servers)}; "
        f"pinned: {pinned}; server logs in {log_dir()}"
    )
    bench = Bench(cfg)
    bench.results.notes.extend(early_notes)
    start = time.perf_counter()
    try:
        results = uvloop.run(bench.run_all())
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, no report written", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    auto_notes(cfg, results)
    specs = metric_specs(
        cfg.echo_conns,
        cfg.members,
        cfg.idle_counts,
        cfg.connect_clients,
        cfg.messages,
        cfg.missed,
        cfg.cluster_nodes,
        cfg.cluster_subscribers,
        cfg.scale_paced_messages,
        cfg.scale_interval_ms,
    )
    print_console(results, specs, cfg.idle_counts)
    print(f"took {wall:.0f} s; server logs in {log_dir()}")
    if cfg.output is not None:
        text = render_markdown(
            results,
            specs,
            cfg.idle_counts,
            how_it_was_run(cfg, args, pinned, wall, fd_limit, node_version),
            scenario_text(cfg),
            deflate_text(),
            ws_section_text(cfg),
            cluster_section_text(cfg, pinned),
            scale_section_text(cfg, pinned),
        )
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        text += kept_soak_section(cfg.output)
        cfg.output.write_text(text)
        print(f"wrote {cfg.output}")
    return 0


def kept_soak_section(output: Path) -> str:
    """The soak section of ``output`` (written by benchmarks/soak.py), kept across runs."""
    if not output.exists():
        return ""
    text = output.read_text()
    start, end = text.find("<!-- soak:start -->"), text.find("<!-- soak:end -->")
    if start < 0 or end < start:
        return ""
    return "\n" + text[start : end + len("<!-- soak:end -->")] + "\n"


if __name__ == "__main__":
    sys.exit(main())
