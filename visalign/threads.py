"""How many CPU threads torch uses.

torch starts one intra-op thread per core.  On a small machine that another busy process shares
that is the worst choice: the threads wait on each other.  Measured on 2 cores
(``bench/cpu_threads.py``, docs/benchmarks.md), a toy rollout of 32 samples x 10 steps took 4.2 s
with 2 threads and 6.3 s with 1 on an idle machine, but 12.9 s with 2 threads and 6.7 s with 1
beside one busy single-threaded process.

``threads=None`` ("auto") therefore looks before it leaps: it measures how many cores other
processes keep busy over a quarter of a second and uses the cores left (at least 1); where that
cannot be read, or ``OMP_NUM_THREADS`` is set, it keeps torch's setting.  An explicit number
always wins.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["configure_threads", "auto_threads", "busy_cores"]


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 0.25) -> float | None:
    """How many cores are busy (by any process) over ``window`` seconds; None if unknown."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(window)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """The "auto" choice: the cores other processes leave free (at least 1); torch's setting when
    ``OMP_NUM_THREADS`` is set (the user chose) or the machine's load cannot be read."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        return torch.get_num_threads()
    return max(1, min(cores, round(cores - busy)))


def configure_threads(threads: int | None, device=None) -> int:
    """Set torch's intra-op threads for a CPU run and return the number in use.

    Args:
        threads (`int`, *optional*): the number of threads; ``None`` is :func:`auto_threads`.
        device (*optional*): the run's device; on an accelerator ``None`` leaves torch as it is.
    """
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 (or null for auto), got {threads}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    if threads is None and not on_cpu:
        return torch.get_num_threads()
    n = auto_threads() if threads is None else int(threads)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
