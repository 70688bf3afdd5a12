"""`visalign score` on one process against two (``accelerate launch --num_processes 2``), side by side.

Writes a gallery of ``--files`` PNG images of ``--size`` px, then scores it ``--repeats`` times in
each way, interleaved (one process, two processes, one, two...), with one torch thread a process and
``--workers 0`` (decoding in the scoring process), and checks that both give the same rows (same
files, same order, scores within 1e-6).  Wall time includes each command's start-up (Python,
torch, the reward), which is what a user waits for.  Usage::

    python bench/sharded_scoring.py --files 200 --size 256 --rewards artifact,jpeg_compressibility
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_gallery(root: Path, files: int, size: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(files):
        base = np.stack([np.sin(6.28 * (xx * rng.random() * 4 + yy * rng.random() * 4)) for _ in range(3)], -1)
        noise = rng.normal(0, rng.random() * 0.3, base.shape)
        arr = ((base * 0.5 + 0.5 + noise).clip(0, 1) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:04d}.png")


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rewards", default="artifact,jpeg_compressibility")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from visalign.gallery.writers import read_results

    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="visalign-sharded-"))
    try:
        gallery = tmp / "gallery"
        make_gallery(gallery, args.files, args.size)
        common = ["score", str(gallery), "--rewards", args.rewards, "--batch-size", str(args.batch_size),
                  "--workers", "0", "--no-progress", "--overwrite"]
        one = [sys.executable, "-m", "visalign", *common, "--out", str(tmp / "one.jsonl")]
        two = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "visalign", *common,
               "--out", str(tmp / "two.jsonl")]
        times: dict[str, list[float]] = {"1 process": [], "2 processes": []}
        for _ in range(args.repeats):
            times["1 process"].append(run(one, env))
            times["2 processes"].append(run(two, env))
        a, b = read_results(tmp / "one.jsonl"), read_results(tmp / "two.jsonl")
        assert sorted(r["path"] for r in a) == [r["path"] for r in b], "different files or order"
        by_path = {r["path"]: r for r in a}
        for row in b:
            for k, v in row.items():
                if isinstance(v, float):
                    assert abs(v - by_path[row["path"]][k]) <= 1e-6, (row["path"], k)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"{args.files} files of {args.size} px, rewards {args.rewards}, batch {args.batch_size}")
        print("| processes | wall s (median of %d) | files/s | speed-up |" % args.repeats)
        print("|---|---|---|---|")
        base = statistics.median(times["1 process"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.1f} | {args.files / med:.1f} | {base / med:.2f} |")
        print("rows: identical files, order and scores (1e-6)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
