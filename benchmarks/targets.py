"""The targets roomcast's figures must meet, and the verdict on each from a run's samples.

A verdict may only say "met" or "correct" about what was measured: a count no run
recorded reads "not measured", and a crashed run makes the verdict "failed".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from samples import MetricSpec, Results, fmt, fmt_ratio, mem_key, ratio
from scale_report import BAR_BROKERS, BAR_DPS, BAR_P99, scale_bars
from specs import CHANNEL_BAR, MATCHED_WHY

#: Load generator CPU (% of its core) from which a figure may be limited by the client side.
BUSY_LOADGEN_PCT = 90.0


@dataclass
class Target:
    """One target with what was measured and whether it was met (None = not measured).

    ``limited`` names the runs behind the figures whose load generator was at or above
    BUSY_LOADGEN_PCT of its core: those figures may be limited by the client side.
    ``crashed`` names the runs behind it that failed: the verdict is then "failed".
    """

    text: str
    measured: str
    met: bool | None
    limited: str = ""
    #: The runs behind the figures that crashed: their figures are missing, so the verdict
    #: is "failed" whatever the surviving runs say.
    crashed: str = ""


def judge_targets(
    results: Results, spec_list: Sequence[MetricSpec], idle_counts: Sequence[int]
) -> list[Target]:
    """Judge the targets from the measured figures (never from constants)."""
    specs = {s.key: s for s in spec_list}

    def val(role: str, key: str) -> float | None:
        spec = specs.get(key)
        return None if spec is None else results.value(role, spec)

    def rat(key: str, num: str = "roomcast", den: str = "baseline") -> float | None:
        return ratio(specs[key], val(num, key), val(den, key))

    def busy(key: str, roles: Sequence[str], what: str = "") -> str:
        """Name the runs of ``roles`` whose load generator CPU (figure ``key``) was high."""
        hot = []
        for role in roles:
            cpu = results.key_value(role, key)
            if cpu is not None and cpu >= BUSY_LOADGEN_PCT:
                hot.append(f"{role}{what} {cpu:.0f} %")
        return ", ".join(hot)

    def both(a: float | None, b: float | None) -> tuple[float, float] | None:
        return None if a is None or b is None else (a, b)

    def failed(roles: Sequence[str], *prefixes: str) -> str:
        """Name the runs of ``roles`` behind figures ``prefixes`` that crashed."""
        return "; ".join(results.crashed(roles, *prefixes))

    targets = []
    # The first issue's targets, for roomcast and for its plain-ASGI fallback.
    for role, who in (("roomcast", "roomcast"), ("roomcast-asgi", "roomcast-asgi (fallback)")):
        r1, rn = rat("echo1.rtps", role), rat("echoN.rtps", role)
        e1, en = val(role, "echo1.errors"), val(role, "echoN.errors")
        met: bool | None = None
        if None not in (r1, rn, e1, en):
            met = r1 >= 1.0 and rn >= 1.0 and e1 == 0 and en == 0  # type: ignore[operator]
        targets.append(
            Target(
                f"{who}: echo round trips/s ≥ 1.0× baseline (1 and N connections), every "
                "reply correct",
                f"1 conn {fmt_ratio(r1)}, N conns {fmt_ratio(rn)}; wrong replies "
                f"{fmt(e1)} / {fmt(en)}",
                met,
                busy("echoN.loadgen", ("baseline", role)),
                failed(("baseline", role), "echo1", "echoN"),
            )
        )
        rc, lost = rat("chat.dps", role), val(role, "chat.lost")
        pair = both(rc, lost)
        targets.append(
            Target(
                f"{who}: chat fan-out deliveries/s ≥ 1.0× baseline with 0 lost",
                f"{fmt_ratio(rc)}, lost {fmt(lost)}",
                None if pair is None else pair[0] >= 1.0 and pair[1] == 0,
                busy("chat.loadgen", ("baseline", role)),
                failed(("baseline", role), "chat"),
            )
        )
    rel, slost = val("roomcast", "stall.rel"), val("roomcast", "stall.lost")
    base_rel = val("baseline", "stall.rel")
    pair = both(rel, slost)
    targets.append(
        Target(
            "roomcast: one stalled member, the other members get ≥ 0.9× its own unstalled "
            "rate, 0 lost",
            f"roomcast {fmt_ratio(rel)} (baseline {fmt_ratio(base_rel)}), lost {fmt(slost)}",
            None if pair is None else pair[0] >= 0.9 and pair[1] == 0,
            ", ".join(
                x
                for x in (
                    busy("chat.loadgen", ("roomcast",), " chat"),
                    busy("stall.loadgen", ("roomcast",), " chat + stalled"),
                )
                if x
            ),
            failed(("roomcast",), "stall"),
        )
    )
    top = max(idle_counts) if idle_counts else 0
    mc, me = rat(mem_key("chat", top)), rat(mem_key("echo", top))
    pair = both(mc, me)
    targets.append(
        Target(
            f"roomcast: memory per idle connection ≤ 1.15× baseline ({top:,} connections, "
            "/ws/chat and /ws/echo)",
            f"chat {fmt_ratio(mc)}, echo {fmt_ratio(me)}",
            None if pair is None else pair[0] <= 1.15 and pair[1] <= 1.15,
            crashed=failed(("roomcast", "baseline"), "mem"),
        )
    )
    # This targets.
    vs_node, vs_base = rat("chat.dps", "roomcast", "node"), rat("chat.dps")
    p99 = {r: val(r, "chat.p99_ms") for r in ("roomcast", "node", "baseline")}
    lost = val("roomcast", "chat.lost")
    met = None
    if None not in (vs_node, vs_base, lost, *p99.values()):
        met = (
            vs_node >= 1.3  # type: ignore[operator]
            and vs_base >= 2.0  # type: ignore[operator]
            and p99["roomcast"] < p99["node"]  # type: ignore[operator]
            and p99["roomcast"] < p99["baseline"]  # type: ignore[operator]
            and lost == 0
        )
    targets.append(
        Target(
            "roomcast: chat fan-out, deliveries/s ≥ 1.3× node and ≥ 2× baseline, lower p99 "
            "than both, 0 lost",
            f"{fmt_ratio(vs_node)} node, {fmt_ratio(vs_base)} baseline; p99 "
            f"{fmt(p99['roomcast'], 1)} ms vs node {fmt(p99['node'], 1)} / baseline "
            f"{fmt(p99['baseline'], 1)} ms; lost {fmt(lost)}",
            met,
            busy("chat.loadgen", ("roomcast", "node", "baseline")),
            failed(("roomcast", "node", "baseline"), "chat"),
        )
    )
    rn = rat("echoN.rtps")
    targets.append(
        Target(
            "roomcast: echo with many connections, round trips/s ≥ 1.1× baseline",
            fmt_ratio(rn),
            None if rn is None else rn >= 1.1,
            busy("echoN.loadgen", ("roomcast", "baseline")),
            failed(("roomcast", "baseline"), "echoN"),
        )
    )
    kc, ke = val("roomcast", mem_key("chat", top)), val("roomcast", mem_key("echo", top))
    pair = both(kc, ke)
    targets.append(
        Target(
            f"roomcast: memory per idle connection at {top:,} connections ≤ 20 KiB "
            "(/ws/chat and /ws/echo)",
            f"chat {fmt(kc, 1)} KiB, echo {fmt(ke, 1)} KiB (baseline "
            f"{fmt(val('baseline', mem_key('chat', top)), 1)} / "
            f"{fmt(val('baseline', mem_key('echo', top)), 1)})",
            None if pair is None else pair[0] <= 20.0 and pair[1] <= 20.0,
            crashed=failed(("roomcast",), "mem"),
        )
    )
    rcps = rat("connect.cps")
    errors = val("roomcast", "connect.errors")
    pair = both(rcps, errors)
    targets.append(
        Target(
            "roomcast: new connections per second ≥ 1.5× baseline (no failed cycle)",
            f"{fmt_ratio(rcps)}; failed cycles {fmt(errors)}",
            None if pair is None else pair[0] >= 1.5 and pair[1] == 0,
            busy("connect.loadgen", ("roomcast", "baseline")),
            failed(("roomcast", "baseline"), "connect"),
        )
    )
    # The /ws channel protocol's targets (roomcast only: the other servers have no /ws).
    rel, relm = val("roomcast", "channel.rel"), val("roomcast", "channel.rel_matched")
    clost, cerr = val("roomcast", "channel.lost"), val("roomcast", "channel.errors")
    met = None
    if rel is not None and clost is not None and cerr is not None:
        met = rel >= CHANNEL_BAR and clost == 0 and cerr == 0
    targets.append(
        Target(
            f"roomcast: /ws channel fan-out deliveries/s ≥ {CHANNEL_BAR:.2f}× its own /ws/chat "
            "fan-out (paired runs), 0 lost, offsets strictly increasing",
            f"{fmt_ratio(rel)} ({fmt(val('roomcast', 'channel.dps'))}/s vs "
            f"{fmt(val('roomcast', 'channel.chat_dps'))}/s); lost {fmt(clost)}, errors "
            f"{fmt(cerr)}; with chat lines as long as /ws frames {fmt_ratio(relm)} "
            f"({fmt(val('roomcast', 'channel.chatm_dps'))}/s: {MATCHED_WHY})",
            met,
            ", ".join(
                x
                for x in (
                    busy("channel.loadgen", ("roomcast",), " /ws"),
                    busy("channel.chat_loadgen", ("roomcast",), " chat"),
                    busy("channel.chatm_loadgen", ("roomcast",), " matched chat"),
                )
                if x
            ),
            failed(("roomcast",), "channel"),
        )
    )
    counts = {
        k: val("roomcast", f"recovery.{k}") for k in ("unrecovered", "lost", "duplicates", "errors")
    }
    total = val("roomcast", "recovery.total_ms")
    met = None
    if None not in counts.values():
        met = total is not None and all(v == 0 for v in counts.values())
    targets.append(
        Target(
            "roomcast: /ws recovery, every client reconnecting at once gets every missed "
            "publication: all replies recovered: true, 0 lost, 0 duplicates",
            f"all recovered in {fmt(total)} ms; recovered: false {fmt(counts['unrecovered'])}, "
            f"lost {fmt(counts['lost'])}, duplicates {fmt(counts['duplicates'])}, errors "
            f"{fmt(counts['errors'])}",
            met,
            crashed=failed(("roomcast",), "recovery"),
        )
    )
    # Issue 16's: a node on Redis (one Redis, a Redis Cluster) at memory speed.
    bars = scale_bars(results)
    for broker, url in BAR_BROKERS.items():
        mine = [b for b in bars if b.broker == broker]
        verdicts = [b.met for b in mine]
        met = None
        if False in verdicts:
            met = False
        elif verdicts and all(verdicts):
            met = True
        loads = [
            f"{'chat' if b.endpoint == 'chat' else '/ws'} {b.shape} {fmt_ratio(b.dps)} "
            f"(p99 {fmt_ratio(b.p99)}, lost {fmt(b.lost)})"
            for b in mine
        ]
        targets.append(
            Target(
                f"roomcast on {url}: deliveries/s ≥ {BAR_DPS:.2f}× and p99 ≤ {BAR_P99:.2f}× "
                "the same node on memory://, 0 lost, chat and /ws, max rate and paced",
                "; ".join(loads) if any(b.dps is not None for b in mine) else "not run",
                met,
                ", ".join(
                    x
                    for b in mine
                    if (
                        x := busy(
                            f"scale.{b.endpoint}.{b.shape}.loadgen",
                            ("memory", broker),
                            f" {b.endpoint} {b.shape}",
                        )
                    )
                ),
                "; ".join(c for b in mine for c in b.crashed),
            )
        )
    return targets


def verdict(target: Target) -> str:
    """Render a target verdict, with the load generator caveat when it applies."""
    if target.crashed:
        return f"failed (crashed: {target.crashed})"
    text = {True: "met", False: "NOT met", None: "not measured"}[target.met]
    if target.limited and target.met is not None:
        text += f" (limited by the load generator: {target.limited})"
    return text
