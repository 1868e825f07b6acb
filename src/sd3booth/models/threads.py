"""How many CPU threads torch uses on a CPU-only run.

torch's default is one thread per physical core, whether or not other processes are busy on them. On a
shared machine that is a cliff, not a slope: OpenMP threads wait for each other at every operation, and a
thread whose core is taken stalls all of them (a 100-step tiny-model run on 2 cores shared with one busy
process: 0.285 s/step with torch's 2 threads, 0.007 s/step with one). So a CPU run takes the physical
cores this process may use (CPU affinity and a cgroup quota count), less the cores other processes keep
busy (the 1-minute load average at the first call, in proportion when this process may use only some of the
machine's CPUs), at most ``MAX_DEFAULT_THREADS``, at least one.
The choice is made once per process, so runs started in one process (tests) all use the same count.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

MAX_DEFAULT_THREADS = 8


def pick_threads(
    usable_cpus: int, logical_cpus: int, physical_cores: int | None, busy: float, cap: int = MAX_DEFAULT_THREADS
) -> int:
    """The default thread count: physical cores this process may use, less the busy ones, capped, at least 1.

    usable_cpus: logical CPUs this process may run on; logical_cpus and physical_cores: of the whole machine
    (physical None: unknown); busy: cores other processes keep busy (a load average).
    """
    logical_cpus = max(logical_cpus, usable_cpus, 1)
    cores = usable_cpus
    if physical_cores:  # hyper-threads share a core's arithmetic units: count cores, not logical CPUs
        cores = max(1, math.floor(usable_cpus * physical_cores / max(logical_cpus, physical_cores)))
    # the load average counts the whole machine (a container sees its host's): our share of it
    busy_here = math.floor(busy * usable_cpus / logical_cpus + 0.5)
    free_cores = math.floor((usable_cpus - busy_here) * cores / usable_cpus)
    return max(1, min(cores, free_cores, cap))


def _cgroup_cpus() -> float | None:
    """The cgroup v2 CPU quota in CPUs (None if unlimited or unknown)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Logical CPUs this process may use: its affinity mask, limited by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


@lru_cache(maxsize=1)
def default_threads() -> int:
    """pick_threads for this machine, measured once per process."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil is optional; without it logical CPUs are counted
        physical = None
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return pick_threads(usable_cpus(), os.cpu_count() or 1, physical, busy)


def configure_threads(requested: int | None, cpu_run: bool) -> int | None:
    """Sets torch's thread count: ``requested`` if given, else the default on a CPU run; returns what was set.

    A GPU run without ``requested`` keeps torch's own default (its CPU work is small, or T5 on the CPU,
    which wants every core).
    """
    if requested is None and not cpu_run:
        return None
    n = requested or default_threads()
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
