"""Torch CPU threads for a toy rollout: 1 vs all cores, alone and beside another busy process.

Measures one collect step of the shipped toy-shapes model (32 samples x 10 ODE steps, CFG 3, the
main job's rollout shape) with ``torch.set_num_threads(n)`` for n = 1 and n = all cores, first
on an otherwise idle machine, then while a second process keeps one or two cores busy with its
own matrix products (what a second experiment, a test run or a browser does to a
laptop).  Prints a markdown table; results are in docs/benchmarks.md.  This is why ``threads``
("auto": 1 below 4 cores) exists: ``run.threads`` / ``--threads``.

    python bench/cpu_threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

BUSY = "import sys, torch, time\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(512, 512)\nt = time.time()\nwhile time.time() - t < 600:\n    a = (a @ a).tanh()\n"


def rollout_seconds(sampler, threads: int, repeats: int) -> float:
    from visalign.samplers import collect

    torch.set_num_threads(threads)
    prompts = ["a red circle left of a blue square"] * 32
    collect(sampler, prompts[:4], num_steps=2, guidance_scale=3.0, seeds=list(range(4)))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        collect(sampler, prompts, num_steps=10, guidance_scale=3.0, seeds=list(range(32)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import visalign.samplers as vs

    sampler = vs.load("toy-shapes")
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    rows = []
    for label, busy in (("idle", 0), ("beside a 1-thread busy process", 1), ("beside a 2-thread busy process", 2)):
        proc = subprocess.Popen([sys.executable, "-c", BUSY, str(busy)]) if busy else None
        try:
            if proc is not None:
                time.sleep(2)
            rows.append((label, {n: rollout_seconds(sampler, n, args.repeats) for n in counts}))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    print(f"toy-shapes, 32 samples x 10 ODE steps (CFG 3), {cores} cores, median of {args.repeats}")
    print("| machine | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} (s)" for n in counts) + " | slowdown of all cores vs 1 |")
    print("|---|" + "---|" * len(counts) + "---|")
    for label, t in rows:
        print(f"| {label} | " + " | ".join(f"{t[n]:.2f}" for n in counts) + f" | {t[counts[-1]] / t[1]:.2f}x |")


if __name__ == "__main__":
    main()
