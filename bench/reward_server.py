"""The reward server under load: throughput against in-process batched scoring (target ratio >= 0.8).

In one run, for one reward:

- ``in-process``: the reward's batched forward (``--max-batch`` items a call, ``torch.no_grad``) on
  float tensors already in memory: the ceiling, no transport at all;
- ``server``: ``visalign rewards serve`` started as its own process on a free loopback port, and
  ``--clients`` threads, each a ``remote`` reward, sending ``--requests`` requests of
  ``--items`` images each, all at once (dynamic batching joins them into reward calls).  Every
  answer is checked against the in-process scores of its own images (1e-5): an item lost,
  duplicated or returned out of order fails the run, and the server's counters must show every
  item scored once.

The bench is bounded: it sends exactly clients x requests x items images, then stops the server
(SIGTERM) and checks it exited cleanly.  Usage::

    python bench/reward_server.py --reward shapes-proxy --size 32 --clients 8 --requests 16 --items 8
    python bench/reward_server.py --reward artifact --size 256 --clients 8 --requests 4 --items 8

Run it with one torch thread (``--threads 1``, the default) on a shared machine: two torch threads
on a busy 2-core machine run slower than one.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch


def make_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures plus grain on the uint8 grid (PNG carries them exactly).  (n, 3, size, size)"""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + (torch.rand(n, 3, size, size, generator=g) - 0.5) * 0.05
    return (x.clamp(0, 1) * 255).round() / 255


def prompts_for(n: int) -> list[str]:
    from visalign.toy.prompts import split

    pool = [m["prompt"] for m in split("train")]
    return [pool[(7 * i) % len(pool)] for i in range(n)]


def in_process(reward, x: torch.Tensor, prompts: list[str] | None, batch: int) -> tuple[float, torch.Tensor]:
    """(seconds, scores) of batched scoring of ``x`` in ``batch``-item calls."""
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            out.append(reward(x[i:i + batch], prompts[i:i + batch] if prompts else None).scores)
    return time.perf_counter() - t0, torch.cat(out)


def start_server(spec: str, args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([sys.executable, "-m", "visalign", "rewards", "serve", spec, "--port", "0",
                             "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                             "--max-wait-ms", str(args.max_wait_ms)],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].split()[0]
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def run_clients(url: str, name: str, x: torch.Tensor, prompts: list[str] | None, want: torch.Tensor,
                args) -> tuple[float, list[float], int]:
    """(seconds, request latencies, items checked) of clients x requests x items, all at once."""
    from visalign import rewards as R

    k = args.items
    latencies: list[float] = []
    checked = [0]
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)

    def client(c: int) -> None:
        reward = R.load(f"remote:url={url},name={name},batch={k},retries=2,encoding={args.encoding}")
        start.wait()
        for r in range(args.requests):
            lo = (c * args.requests + r) * k
            t0 = time.perf_counter()
            got = reward(x[lo:lo + k], prompts[lo:lo + k] if prompts else None).scores
            dt = time.perf_counter() - t0
            ok = got.shape == want[lo:lo + k].shape and torch.allclose(got, want[lo:lo + k], atol=1e-5, rtol=0,
                                                                       equal_nan=True)
            with lock:
                latencies.append(dt)
                checked[0] += got.shape[0]
                if not ok:
                    failures.append(f"client {c} request {r}: scores differ from the in-process ones")
        reward.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if failures:
        raise SystemExit("; ".join(failures[:5]))
    return seconds, latencies, checked[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", default="shapes-proxy", help="a registered reward spec served and scored in-process")
    p.add_argument("--size", type=int, default=32, help="image side in px")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (threads, each a remote reward)")
    p.add_argument("--requests", type=int, default=16, help="requests per client")
    p.add_argument("--items", type=int, default=8, help="images per request")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch and the in-process batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's --max-wait-ms")
    p.add_argument("--encoding", default="png", choices=["png", "raw"], help="the clients' image encoding")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and on the server (default 1)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from visalign import rewards as R

    name = R.parse_spec(args.reward)[0]
    reward = R.load(args.reward)
    n = args.clients * args.requests * args.items
    x = make_images(n, args.size)
    prompts = prompts_for(n) if "prompts" in reward.info.inputs else None
    in_process(reward, x[: args.max_batch], prompts, args.max_batch)  # warm-up
    proc, url = start_server(args.reward, args)
    try:
        local_s, served_s, lat, busy = [], [], [], []
        for _ in range(args.repeats):
            seconds, want = in_process(reward, x, prompts, args.max_batch)
            local_s.append(seconds)
            before = R.load(f"remote:url={url},name={name}").health()["stats"]
            seconds, latencies, checked = run_clients(url, name, x, prompts, want, args)
            after = R.load(f"remote:url={url},name={name}").health()["stats"]
            served_s.append(seconds)
            lat += latencies
            scored = after["items"] - before["items"]
            if checked != n or scored != n or after["requests"] - before["requests"] != args.clients * args.requests:
                raise SystemExit(f"lost or duplicated items: sent {n}, checked {checked}, the server scored {scored}")
            calls = after["reward_calls"] - before["reward_calls"]
            busy.append((after["reward_seconds"] - before["reward_seconds"]) / seconds)
        stats = after
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    local, served = statistics.median(local_s), statistics.median(served_s)
    lat_ms = np.array(lat) * 1000
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} torch thread(s); server exit code {rc}")
    print(f"# {args.reward}, {n} images of {args.size} px per repeat, {args.clients} clients x {args.requests} "
          f"requests x {args.items} images ({args.encoding}); server --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; "
          f"median of {args.repeats}")
    print("| path | items/s | p50 ms / request | p99 ms / request | reward calls | lost / duplicated |")
    print("|---|---|---|---|---|---|")
    print(f"| in-process, batches of {args.max_batch} | {n / local:.1f} | | | {-(-n // args.max_batch)} | |")
    print(f"| server, {args.clients} clients | {n / served:.1f} | {np.percentile(lat_ms, 50):.1f} | "
          f"{np.percentile(lat_ms, 99):.1f} | {calls} (largest batch {stats['largest_batch']}) | 0 / 0 |")
    print(f"| **ratio** | **{local / served:.2f}** | | | | |")
    print(f"# the server spent {statistics.median(busy):.0%} of the wall time inside reward calls")


if __name__ == "__main__":
    main()
