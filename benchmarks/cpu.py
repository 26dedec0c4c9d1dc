"""CPU use of the load generator, the server and the rest of the machine, over a window.

A figure is only as good as the load generator's headroom: every run records how much of its
core the load generator used (``Usage.loadgen``), and how busy the machine was with other work
(``Usage.other``, and :func:`background_load` before a run), so that a noisy run shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

#: Reads a process's CPU seconds so far (the server's, a broker's).
CpuProbe = Callable[[], float]


@dataclass
class Usage:
    """CPU use of both sides over a measurement window, as a fraction of one core."""

    loadgen: float
    server: float
    wall_s: float
    other: float

    @property
    def loadgen_cpu_s(self) -> float:
        """Return the load generator's CPU seconds over the window."""
        return self.loadgen * self.wall_s


class UsageMeter:
    """Measure load generator and server CPU over a window of wall-clock time."""

    def __init__(self, server_cpu: CpuProbe) -> None:
        """Take the starting readings."""
        self._server_cpu = server_cpu
        self._wall = time.perf_counter()
        self._proc = time.process_time()
        self._srv = server_cpu()
        self._busy = _machine_busy_seconds()

    def stop(self) -> Usage:
        """Return the CPU fractions since construction.

        ``other`` is the CPU the rest of the machine used meanwhile (other processes and
        hypervisor steal; interrupt time, which the kernel charges to no process, is left out):
        a noise indicator.
        """
        wall = max(time.perf_counter() - self._wall, 1e-9)
        loadgen = (time.process_time() - self._proc) / wall
        server = (self._server_cpu() - self._srv) / wall
        busy = (_machine_busy_seconds() - self._busy) / wall
        return Usage(loadgen, server, wall, max(0.0, busy - loadgen - server))


@contextlib.contextmanager
def measuring(server_cpu: CpuProbe) -> Iterator[UsageMeter]:
    """A measured window: a :class:`UsageMeter` started, and the garbage collector off.

    The collector runs a full pass first and none within the window, so that no collection
    lands at a random point of the load generator's work and gets charged to the figures.
    """
    gc.collect()
    gc.disable()
    try:
        yield UsageMeter(server_cpu)
    finally:
        gc.enable()


async def background_load(window_s: float = 0.5) -> float:
    """Return the CPU (in cores) the machine used over ``window_s``, this process excluded.

    Call it while the servers under test are idle: then it is other people's work.
    """
    busy0, own0, t0 = _machine_busy_seconds(), time.process_time(), time.perf_counter()
    await asyncio.sleep(window_s)
    wall = time.perf_counter() - t0
    own = time.process_time() - own0
    return max(0.0, (_machine_busy_seconds() - busy0 - own) / wall)


def _machine_busy_seconds() -> float:
    """Return the CPU seconds all cores spent running processes (or stolen) since boot."""
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "steal")
    return float(sum(getattr(t, name, 0.0) for name in fields))
