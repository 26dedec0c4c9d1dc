"""The prose of docs/benchmarks.md that describes the run: machine, versions, scenarios."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psutil

from benchconfig import Config
from channel import FANOUT_CHANNEL, ChannelConfig, matched_chat_size, mean_frame_bytes
from chat import PREFIX, TAG_MEASURED, make_payload
from cluster import CLUSTER_CHANNEL, describe_frame
from deflate import MEM_LEVEL, MEMBERS
from fanout import split
from recovery import RECOVERY_CHANNEL
from scale import PACED_DRAIN_S
from servers import NODE_DIR, REPO_DIR, ROOMCAST_ENV, ROOMCAST_WS, redis_argv, redis_version

VERSIONED = (
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "uvloop",
    "httptools",
    "picows",
    "psutil",
    "redis",
    "socketify",
    "roomcast",
)


def _version(dist: str) -> str:
    """Return an installed distribution's version, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    """Describe the checkout: short commit (+ "with local changes"), or "no commit yet"."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain"))
    if not rev:
        return "no commit yet (working tree)"
    return rev + (" with local changes" if dirty else "")


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _ws_version() -> str:
    """Return the installed version of Node's ws library in benchmarks/node, or "?"."""
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads((NODE_DIR / "node_modules/ws/package.json").read_text())["version"])
    return "?"


def how_it_was_run(
    cfg: Config,
    argv: Sequence[str],
    pinned: bool,
    wall_s: float,
    fd_limit: int,
    node_version: str,
) -> list[str]:
    """Return the "How it was run" bullet list."""
    cmd = " ".join(["python", "benchmarks/run.py", *(shlex.quote(a) for a in argv)])
    versions = ", ".join(f"{d} {_version(d)}" for d in VERSIONED)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ROOMCAST_ENV.items())
    if cfg.roomcast_as_baseline:
        roomcast_lines = [
            "- roomcast, roomcast-asgi: the baseline again (--roomcast-as-baseline, harness "
            "self-test)"
        ]
    else:
        roomcast_lines = [
            f"- {role}: `ROOMCAST_WS={ws} {env} python -m roomcast serve --host 127.0.0.1 "
            "--port PORT` (one process serving every endpoint; src/ first on PYTHONPATH)"
            for role, ws in ROOMCAST_WS.items()
            if role in cfg.servers
        ]
    return [
        f"- Command: `{cmd}` (repeats: {cfg.repeats}; took {wall_s:.0f} s)",
        f"- Servers: {', '.join(cfg.servers)}",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"code: {_git_revision()}",
        f"- Machine: {os.cpu_count()} cores ({_cpu_model()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}",
        f"- Packages: {versions}",
        "- Pinning: "
        + (
            "each server on core 0 (`taskset -c 0`), the load generator on core 1 "
            "(`sched_setaffinity`)"
            + (
                f"; in the cluster scenario the {cfg.cluster_nodes} roomcast nodes and "
                "redis-server all share core 0"
                if "cluster" in cfg.only
                else ""
            )
            if pinned
            else "none (fewer than 2 cores)"
        ),
        "- Load generator: one process, picows (Cython WebSocket client) on uvloop, "
        f"callbacks in Python; file descriptor limit raised to {fd_limit:,}",
        "- Baseline: `uvicorn echo_server:app --host 127.0.0.1 --port PORT` (resp. "
        "`chat_server:app`), run from `benchmarks/baseline/`, plain uvicorn defaults "
        "(INFO logging, access log on)",
        f"- node: `node server.js --port PORT` in `benchmarks/node/` (Node.js {node_version}, "
        f"ws {_ws_version()} from package-lock.json, perMessageDeflate off, no optional native "
        "add-ons)",
        *roomcast_lines,
        *(
            [
                "- socketify: `python benchmarks/socketify_server.py --port PORT` (socketify "
                f"{_version('socketify')}: the guide's `/ws/chat` on uWebSockets' pub/sub, "
                "compression off; scale scenario only)"
            ]
            if "scale" in cfg.only and "socketify" in cfg.servers
            else []
        ),
        *(cluster_lines(cfg, pinned) if "cluster" in cfg.only else []),
        "- A fresh server process for every chat, /ws channel, /ws recovery, cluster, connect "
        "and memory run; the echo runs share one process per server. Every server runs on "
        "loopback only.",
    ]


def cluster_lines(cfg: Config, pinned: bool) -> list[str]:
    """Return the "How it was run" bullets of the cluster scenario's processes."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ROOMCAST_ENV.items())
    argv = ["redis-server", *redis_argv("PORT", "LOGDIR")[1:]]
    redis = " ".join(a if a in ("PORT", "LOGDIR") else shlex.quote(a) for a in argv)
    where = "all of them on core 0 (`taskset -c 0`)" if pinned else "unpinned"
    return [
        f"- cluster: `{redis}` (Redis {redis_version()}, started once per repeat, emptied "
        f"with FLUSHALL before every run), and per run {cfg.cluster_nodes} (or 1) × "
        f"`ROOMCAST_BROKER_URL=redis://127.0.0.1:PORT {env} python -m roomcast serve --host "
        "127.0.0.1 --port PORT` (`memory://` for the single-node comparison; `ROOMCAST_WS` "
        f"unset: the default transport, roomcast's own); {where}"
    ]


def scenario_text(cfg: Config) -> list[str]:
    """Return the "Scenarios" bullet list, with this run's sizes."""
    counts = " and ".join(f"{n:,}" for n in cfg.idle_counts)
    return [
        f"- **echo**: 1 and {cfg.echo_conns} connections to `/ws/echo`, each in a closed loop "
        "(send, await the reply, check it is exactly `Echo: ` + what was sent, send the next); "
        f"{cfg.warmup:g} s unmeasured, then {cfg.duration:g} s measured; all servers stay up "
        f"and take turns for {cfg.echo_rounds} round(s) (order flipped every round), medians "
        "kept. Round trips/s counts replies in the window; latency is send → reply per round "
        "trip.",
        f"- **chat**: {cfg.members:,} members on `/ws/chat`, connected 50 at a time; a "
        "warm-up message must reach all of them (so every member is registered) before "
        f"member #1 sends {cfg.messages} messages of 64 bytes back to back (each carries its "
        "sequence number; every receipt is checked against the exact expected text). "
        "Deliveries/s = deliveries ÷ (last receipt − first send); latency = time the last "
        "member got message i − send time of i; lost = expected − received after waiting up "
        f"to {cfg.drain_timeout:g} s (or {cfg.idle_timeout:g} s without any delivery). The "
        "load generator's per-delivery work is one dict lookup of the received bytes (which "
        "identifies and verifies the message at once), a time stamp and a count.",
        "- **chat + 1 stalled member**: the same plus one member that connects over a raw "
        "socket with SO_RCVBUF = 4096 and TCP_MAXSEG = 1024 set before connecting, does the "
        "upgrade by hand and never reads again (on loopback, Linux would otherwise give the "
        "server a send buffer of megabytes for it, which no short run fills). Before the "
        f"measured burst, {cfg.fill_messages} messages of 1 KiB fill its buffers (not measured; "
        f"waited for until all healthy members have them, or {cfg.idle_timeout:g} s without "
        "progress). Lost counts the healthy members only; a room that stops delivering is "
        'reported as STALLED. "÷ own unstalled" divides this run\'s deliveries/s by the same '
        "server's plain chat figure. The stalled member's connection is drained (3 s at most) "
        "after the measurement, to see whether the server had closed it; a server that cuts a "
        "slow member only once a queue of many messages overflows may leave it open here, "
        "which the next scenario settles. Node's `ws` buffers without limit in user space, so "
        "it neither stalls nor cuts.",
        "- **chat, 1 sender + 1 stalled member**: a room of two on a fresh server; the "
        "sender sends 1 KiB messages in batches of 100 (3,000 at most) until either it gets "
        "`A client left the chat` (the server cut the stalled member) or its own messages stop "
        "coming back for 2 s (the room stalled).",
        f"- **new connections**: {cfg.connect_clients} client loops on a fresh server, each: "
        "open a TCP connection to `/ws/echo`, upgrade (status 101 and the "
        "`Sec-WebSocket-Accept` value checked), send `hello`, await exactly `Echo: hello`, send "
        "a close frame, await the server's close frame and the end of the connection; then "
        f"again. {cfg.warmup:g} s unmeasured, then {cfg.connect_duration:g} s measured, at most "
        f"{cfg.connect_limit:,} connections per run in all (loopback ports and TIME_WAIT "
        "entries are finite; the window ends early if the budget runs out, which the per-run "
        "notes say). Connections/s counts complete cycles in the window; the latency is TCP "
        "connect + upgrade. The client is a plain asyncio protocol with pre-built bytes "
        "(picows's `ws_connect` costs about 200 µs of client CPU per connection, which would "
        "have capped the fastest servers). The guide's echo endpoint does not catch "
        "`WebSocketDisconnect`, so uvicorn logs a traceback for every closed connection: that "
        "is part of the baseline's cost here.",
        f"- **memory**: {counts} connections to `/ws/chat` (members that send nothing) and, on "
        "another fresh server, to `/ws/echo`; server RSS (psutil, whole process tree) after one "
        f"warm-up round trip and {cfg.settle:g} s, then {cfg.settle:g} s after the last "
        "connection of each count opened (the connections of the smaller count stay open); per "
        "connection = growth since the first reading ÷ connections.",
        *(
            [
                "- **/ws channel fan-out** and **/ws recovery**: described in their own sections "
                "above; only the roomcast servers have `/ws`, so only they run them."
            ]
            if {"channel", "recovery"} & set(cfg.only)
            else []
        ),
        *(
            [
                "- **scale-out**: roomcast on memory://, redis://, redis+cluster:// and "
                f"{cfg.cluster_nodes} nodes on redis://, with the peers in the chat rows, at max "
                "rate and paced; described in its own section above."
            ]
            if "scale" in cfg.only
            else []
        ),
        *(
            [
                f"- **/ws fan-out across a cluster**: {cfg.cluster_nodes} roomcast nodes on a "
                "private redis-server against one node (memory:// and redis://) under the same "
                "load; described in its own section above."
            ]
            if "cluster" in cfg.only
            else []
        ),
        "- **load generator ceiling**: echo, chat (batched and one write per message) and new "
        "connections against `benchmarks/reference_server.py` (see above), once per invocation.",
        "- Before each measurement the harness waits (2 minutes at most per invocation) until "
        "other processes use less than 0.15 of a core.",
    ]


def deflate_text() -> list[str]:
    """Return the prose above the permessage-deflate table."""
    return [
        "roomcast's transport writes one pre-built frame to every member of a room. Such a "
        "frame can be compressed only once if no member's compressor carries context from "
        "earlier messages (`server_no_context_takeover`): a fresh raw deflate stream per "
        f"publication (zlib, raw, memLevel {MEM_LEVEL}, Z_SYNC_FLUSH, the trailing "
        "`00 00 ff ff` removed). `benchmarks/deflate.py` times that with `time.perf_counter` "
        "over many iterations (median of 5 batches, 16 different messages taken in turn: a "
        "64-byte chat line and a 4 KiB JSON list of chat events, both after `Client says: `). "
        f'"… per delivery" spreads the one compression over {MEMBERS:,} members; "compress '
        'per member instead" is what per-connection compression with context takeover costs '
        "(each member's own stream, so no frame can be shared); every receiver then inflates; "
        "and zlib's own formulas give the state a connection keeps when contexts are kept "
        "(deflate: 2^(wbits+2) + 2^(memLevel+9) bytes; inflate: 2^wbits + about 7 KiB), next "
        "to the 20 KiB per idle connection roomcast aims at.",
    ]


def ws_section_text(cfg: Config) -> dict[str, list[str]]:
    """Return the method paragraph of each /ws section (channel fan-out, recovery)."""
    ccfg = ChannelConfig(messages=cfg.messages)
    text = make_payload(TAG_MEASURED, 0, ccfg.size)
    frame = mean_frame_bytes(ccfg.channel, ccfg.messages, ccfg.size)
    chat_line = len(PREFIX) + len(text)
    matched_size = matched_chat_size(ccfg)
    channel = (
        "Only the roomcast servers have `/ws` (the guide's and node's servers have no channel "
        "protocol), so this scenario runs on `roomcast` and `roomcast-asgi` alone, and each is "
        "compared with its own chat fan-out. A single fan-out burst varies by tens of percent "
        f"from run to run here, so each server gets {cfg.channel_pairs} set(s) of three runs per "
        "repeat: a chat fan-out (exactly the **chat** scenario's), a `/ws` fan-out and a "
        f"matched chat fan-out whose messages are padded to {matched_size} bytes, so that its "
        f"lines ({len(PREFIX) + matched_size} bytes) are as long as the `/ws` publication "
        "frames, each on a fresh server, back to back, in that order and then in reverse every "
        "other set. The headline ratio is the median `/ws` figure ÷ the median chat figure; "
        "the second one, `/ws` ÷ matched chat, is the same comparison with chat lines as long "
        "as `/ws` frames: isolates the per-frame machinery from the bytes (each set's own "
        "ratios are in the per-run table); the other figures are medians of the runs. "
        f"{cfg.members:,} clients connect to `/ws`, 50 at a time, each sending `subscribe` to "
        f"`{FANOUT_CHANNEL}` as soon as its handshake is done; once every reply is in, another "
        "`/ws` client (the publisher, not subscribed) publishes warm-up messages until one has "
        f"reached every subscriber, then {cfg.messages} publications whose `data` is the chat "
        "scenario's 64-byte message as a JSON string (it carries the sequence number), as "
        f"`publish` requests pipelined with at most {cfg.publish_window} unanswered"
        + (
            " (the whole burst at once, as the chat member sends its messages back to back)"
            if cfg.publish_window >= cfg.messages
            else ""
        )
        + f". A publication frame is {frame:.0f} bytes on average (its offset's digits vary) "
        f"where a chat line of the chat scenario is {chat_line}: it also carries the channel, "
        "the offset and the publisher's `info`; the headline ratio includes what those bytes "
        "cost both sides, the matched one does not. "
        "Deliveries/s = deliveries ÷ (last receipt − first send); latency = time the last "
        "subscriber got publication i − send time of request i; lost = expected − received "
        f"after waiting up to {cfg.drain_timeout:g} s (or {cfg.idle_timeout:g} s without any "
        "delivery). Every subscriber checks what it gets: once the warm-up has given the "
        "channel's offset and the publisher's client id, the exact frame of every measured "
        "publication is built, and the received bytes are compared with the frame of the "
        "publication the subscriber is due next, which verifies its channel, offset, data and "
        "`info`, and the order, at once (then a time stamp and a count: no more Python per "
        "delivery than the chat member's dict lookup). Any other frame is "
        "parsed as JSON: an offset not above the subscriber's last one, a wrong channel or a "
        "wrong publication counts as an error, and so does anything unexpected (the subscribe "
        "reply and the warm-up are expected). The CPU rows are each side's share "
        "of a core over the measured window, and that CPU ÷ deliveries; ↑ and ↓ mark "
        "which direction is better."
    )
    recovery = (
        "Only the roomcast servers have `/ws`, so only they run this scenario. "
        f"{cfg.members:,} clients connect to `/ws`, subscribe to `{RECOVERY_CHANNEL}` and "
        "keep the epoch of the reply and the offset of the last publication they got (a "
        "warm-up publication that must reach every one of them). All of them then close (close "
        "frame 1000, the close handshake awaited), and the harness asks for the channel's "
        "`presence` until it is empty, so the server has let every one of them go. Another "
        f"`/ws` client publishes {cfg.missed} publications (pipelined; their replies must give "
        f"consecutive offsets), and all {cfg.members:,} clients reconnect at once (no limit on "
        "concurrent handshakes), each sending `subscribe` with `recover: {offset, epoch}` as "
        "soon as its handshake is done. The time until all is from the start of the reconnects "
        "to the moment the last client had both its reply and every missed publication; p50 "
        "and p99 are the same per client. Every client checks the reply (`recovered: true`, "
        f"`replayed: {cfg.missed}`, the epoch it knew), every replayed frame against the exact "
        "bytes expected (one dict lookup), and that offsets grow strictly (a frame not newer "
        "than the last counts as a duplicate); lost = missed publications that never came "
        f"within {max(60.0, cfg.drain_timeout):g} s (or {cfg.idle_timeout:g} s without "
        "progress). The time includes the "
        f"{cfg.members:,} WebSocket handshakes, which cost both sides most of it (picows's "
        "`ws_connect` alone takes about 200 µs of client CPU per connection). The server runs "
        "with its default history of 256 publications per channel (`ROOMCAST_HISTORY_SIZE`)."
    )
    return {"channel": [channel], "recovery": [recovery]}


def cluster_section_text(cfg: Config, pinned: bool) -> list[str]:
    """Return the method paragraph of the cluster section."""
    nodes, per_node = cfg.cluster_nodes, cfg.cluster_subscribers
    shares = split(cfg.messages, nodes)
    same = len(set(shares)) == 1
    share_text = f"{shares[0]} each" if same else " + ".join(map(str, shares))
    cores = os.cpu_count() or 1
    if pinned:
        where = (
            f"The machine has {cores} cores: the {nodes} nodes and redis-server all run on core "
            "0 (`taskset -c 0`, as every server here), the load generator on core 1, so the "
            f"{nodes} nodes together have no more CPU than the single node. The cluster figure "
            "therefore measures that the cluster delivers everything, once and in order, and "
            "what crossing Redis costs, not a scale-out speedup (that needs a core, or a "
            "machine, per node)."
        )
    else:
        where = (
            "Nothing is pinned on this machine (fewer than 2 cores): the nodes, redis-server and "
            "the load generator share the CPU, so the cluster figure measures correctness and "
            "overhead, not a scale-out speedup."
        )
    return [
        "roomcast nodes share channels through Redis ([scaling.md](scaling.md)). The harness "
        "starts its own `redis-server` on a free loopback port (`--save '' --appendonly no`: "
        "no persistence) once per repeat and empties it (FLUSHALL) before every run; every "
        "run gets fresh roomcast processes (`python -m roomcast serve`, default transport, "
        "`ROOMCAST_BROKER_URL` set). Three configurations take the same load: "
        f"**{nodes} nodes on redis://**, **1 node on memory://** (the single-process broker) "
        "and **1 node on redis://** (one process, every publication through Redis's Lua script "
        f"and pub/sub all the same). {nodes} × {per_node:,} clients connect to `/ws` (node 1, "
        "2, 3… in turn; the single node takes all of them), 50 at a time, each sending "
        f"`subscribe` to `{CLUSTER_CHANNEL}` as soon as its handshake is done, then one "
        f"publisher connection per node ({nodes} connections to the single node), not "
        "subscribed. Once every reply is in, each publisher in turn publishes warm-up messages "
        "until one has reached every subscriber; then all publishers send their shares of "
        f"{cfg.messages} publications ({share_text}) back to back, as `publish` requests "
        f"pipelined with at most {cfg.publish_window} unanswered per connection; `data` is the "
        "chat scenario's 64-byte message as a JSON string, its sequence number unique across "
        f"publishers (a frame is about {len(describe_frame())} bytes). The broker gives the "
        "offsets (on Redis one sequence per channel, whichever node published), so how the "
        "publishers' streams interleave is not known in advance, only that the burst's offsets "
        "follow the warm-up's. The first subscriber to get an offset recognises the publication "
        "by what follows the offset in the frame (`data` and `info`: which publication, from "
        "which publisher, looked up in a table built once the publishers' client ids are "
        "known) and checks the offset; that frame becomes the one of that offset, and every "
        "other subscriber compares the received bytes with the frame of the offset it is due "
        "next (channel, offset, data, `info` and order at once: about as little Python per "
        "delivery as in the /ws fan-out), plus a check that it did not have that publication "
        "yet. Checks: a subscriber's offsets must grow strictly (an offset not above its "
        "previous one counts as out of order), a publication it already had counts as a "
        "duplicate, a publication must have one offset and an offset one publication, and "
        "that offset must be the one the publish reply acknowledged, the acknowledged offsets "
        f"being exactly the {cfg.messages} after the warm-up; lost = expected − received after "
        f"waiting up to {cfg.drain_timeout:g} s (or {cfg.idle_timeout:g} s without any "
        "delivery); anything else unexpected, a failed request or a connection the server "
        "closed is an error. Deliveries/s = all receipts ÷ (last receipt − first send); "
        "latency per publication = time the last subscriber got it − its send time (as in the "
        "/ws fan-out), and per delivery = receipt − send time over every delivery. Server side "
        "CPU is everything the run had on core 0 (the roomcast processes and, on Redis, "
        "redis-server, whose share has a row of its own), and that CPU ÷ deliveries. "
        f"{cfg.cluster_rounds} round(s) per repeat, the three configurations taking turns, the "
        "order flipped every round; rates and latencies are medians, failure counts the worst "
        "run. " + where
    ]


def scale_section_text(cfg: Config, pinned: bool) -> list[str]:
    """Return the method paragraph of the scale section."""
    nodes, masters, replicas = cfg.cluster_nodes, cfg.cluster_masters, cfg.cluster_replicas
    every = "ms" if cfg.scale_interval_ms == 1 else f"{cfg.scale_interval_ms:g} ms"
    where = (
        "Everything server side runs on core 0 (`taskset -c 0`; the cluster's redis-servers "
        "are pinned once started), the load generator on core 1"
        if pinned
        else "Nothing is pinned (fewer than 2 cores)"
    )
    return [
        "One roomcast node on each broker, under the same loads: **memory://** (the "
        "single-process broker), **redis://** (a private `redis-server`, as in the cluster "
        f"scenario), **redis+cluster://** (a private Redis Cluster of {masters} masters with "
        f"{replicas} replica(s) each, started by `tests/redis_cluster.py`'s `LocalCluster`, "
        "Redis " + redis_version() + "), and "
        f"**{nodes} nodes on redis://** (the receivers shared out over the nodes, the sender on "
        "the first). The chat rows add the peers: the guide's code, Node's `ws` and socketify "
        "(`benchmarks/socketify_server.py`: every member subscribes to one uWebSockets topic, "
        "each message is published to it, so the fan-out is uWebSockets' C++). Two loads: "
        f"**chat**, {cfg.members:,} members of one room on `/ws/chat` and one sender (the chat "
        f"scenario's), and **/ws**, {cfg.members:,} subscribers of one channel on `/ws` and "
        "one publisher connection (the /ws channel fan-out's, its frames checked the same "
        f"way); each at two shapes: **max rate** ({cfg.messages} messages back to back; "
        f"`/ws` publishes pipelined, at most {cfg.publish_window} unanswered) and **paced** "
        f"({cfg.scale_paced_messages:,} messages, one every {every}: the sender waits on the "
        "event loop's timer and sends whatever is due, so a late wake-up sends a few at once; "
        "`/ws` publishes go out on time whatever is unanswered). Latency runs from when a "
        "message really left. Deliveries/s = deliveries ÷ (last receipt − first send); p50/p99 "
        "= time the last receiver got message i − send time of i; server CPU per delivery = "
        "the CPU of every server-side process of the run (roomcast nodes, redis-server(s), or "
        "the peer) over the measured window ÷ deliveries; lost = expected − received after "
        f"waiting up to {cfg.drain_timeout:g} s past the last send at max rate, "
        f"{max(cfg.drain_timeout, PACED_DRAIN_S):g} s paced (or {cfg.idle_timeout:g} s "
        "without any delivery): a server that falls further behind than that loses the rest "
        "here. Redis and the cluster are started once per repeat and emptied "
        "(FLUSHALL) before every run; every run gets fresh roomcast (or peer) processes. "
        f"{cfg.scale_rounds} round(s) per repeat, the configurations taking turns within each "
        "endpoint and shape, the order flipped every round; rates and latencies are medians, "
        f"lost the worst run. {where}: a configuration's nodes and Redis share one core, so "
        f"{nodes} nodes have no more CPU than one. The bar compares each Redis configuration "
        "with memory:// of the same run."
    ]
