"""Sampler overhead: an ODE rollout + decode of our Sampler against the diffusers pipeline call.

Same model (SD3-style transformer at SD3-medium width, few layers; tiny text encoders and VAE),
same seed, steps, guidance and 64 px size, timed side by side in one run (interleaved, median of
repeats).  Target ratio (ours / pipeline) <= 1.05.

    python bench/sampler_overhead.py [--steps 8] [--repeats 5] [--layers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from visalign.samplers.families.sd3 import SD3Sampler  # noqa: E402
from visalign.testing import bench_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--guidance", type=float, default=4.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = bench_pipeline("sd3", num_layers=args.layers)
    pipe.set_progress_bar_config(disable=True)
    sampler = SD3Sampler(pipe, name="bench-sd3", max_sequence_length=32)
    pipe.scheduler = sampler.ode_scheduler()
    prompt = ["a photo of a red cube on a wooden table"]
    kw = dict(height=64, width=64)

    def run_pipeline():
        return pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images

    def run_sampler():
        with torch.no_grad():
            traj = sampler.rollout(prompt, num_steps=args.steps, guidance_scale=args.guidance,
                                   generator=torch.Generator().manual_seed(0), record_means=False, **kw)
            return sampler.decode(traj.final)

    a, b = run_pipeline(), run_sampler()  # warm-up, and the two must agree
    diff = (a - b).abs().max().item()
    times = {"pipeline": [], "sampler": []}
    for _ in range(args.repeats):
        for name, fn in (("pipeline", run_pipeline), ("sampler", run_sampler)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["sampler"] / med["pipeline"]
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    print(f"model: SD3-style transformer, {args.layers} layers at width 1536 ({params:.0f}M params), 64 px, "
          f"{args.steps} steps, CFG {args.guidance}, {args.threads} threads, float32, CPU")
    print(f"max abs diff between outputs: {diff:.2e}")
    print("| what | median s | min s |")
    print("|---|---|---|")
    for k in ("pipeline", "sampler"):
        print(f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} |")
    print(f"| ratio sampler / pipeline | {ratio:.3f} | |")


if __name__ == "__main__":
    main()
