"""Peak memory of reward back-propagation against K, with and without gradient checkpointing.

An SD3-shaped transformer at SD3-medium's width (24 heads x 64 = 1536, ``joint_attention_dim``
4096; ``visalign.testing.bench_pipeline``) with 2 layers, float32 on the CPU, LoRA r = 32 on the
attention projections (the recipes' setting); one DRaFT-K step: an ODE rollout of ``--steps``
steps at CFG 4.5 with gradients through the last K (``Sampler.rollout(grad_steps=K,
checkpoint=...)``), decode, ``loss = -mean(pixels)``, backward.  Each (K, checkpointing) runs in
its own process; the peak is the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` after loading and one gradient-free warm-up rollout) minus its resident
memory at that point, so the weights and the loaded libraries are not counted.

    python bench/backprop_memory.py [--steps 8] [--ks 1 2 4 8] [--size 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status() -> tuple[int, int]:
    text = open("/proc/self/status").read()
    kib = lambda key: int(re.search(rf"{key}:\s+(\d+)", text).group(1))  # noqa: E731
    return kib("VmHWM"), kib("VmRSS")


def one(k: int, checkpoint: bool, steps: int, size: int, batch: int) -> dict:
    import gc

    import torch

    from visalign.samplers.families.sd3 import SD3Sampler
    from visalign.samplers.lora import add_lora
    from visalign.testing import bench_pipeline

    torch.set_num_threads(1)
    pipe = bench_pipeline("sd3", num_layers=2)
    sampler = SD3Sampler(pipe, name="bench-sd3", max_sequence_length=32)
    torch.manual_seed(0)
    params = add_lora(sampler, rank=32, alpha=64)
    with torch.no_grad():
        cond = sampler.encode(["a photo of a red cube on a wooden table"] * batch)
        sampler.rollout(cond, num_steps=steps, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                        height=size, width=size, record_means=False)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    _, rss0 = _status()
    t0 = time.perf_counter()
    traj = sampler.rollout(cond, num_steps=steps, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                           height=size, width=size, record_means=False, grad_steps=k, checkpoint=checkpoint)
    if checkpoint:
        from torch.utils.checkpoint import checkpoint as ckpt

        images = ckpt(sampler.decode, traj.final, use_reentrant=False)
    else:
        images = sampler.decode(traj.final)
    (-images.mean()).backward()
    seconds = time.perf_counter() - t0
    hwm, _ = _status()
    grad_norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
    return {"k": k, "checkpoint": checkpoint, "peak_mib": (hwm - rss0) / 1024, "seconds": seconds,
            "grad_norm": grad_norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("K", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "1", args.steps, args.size, args.batch)))
        return
    rows = []
    for k in args.ks:
        for ck in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--one", str(k), str(ck), "--steps", str(args.steps),
                                  "--size", str(args.size), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    by = {(r["k"], r["checkpoint"]): r for r in rows}
    print(f"\n{args.steps} steps, {args.size} px, batch {args.batch} (x2 for CFG), LoRA r 32, float32, 1 thread\n")
    print("| K | peak without checkpointing (MiB) | peak with checkpointing (MiB) | time without / with (s) |")
    print("|---|---|---|---|")
    for k in args.ks:
        a, b = by[(k, False)], by[(k, True)]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1e-12, a["grad_norm"]), (a, b)
        print(f"| {k} | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} | {a['seconds']:.1f} / {b['seconds']:.1f} |")


if __name__ == "__main__":
    main()
