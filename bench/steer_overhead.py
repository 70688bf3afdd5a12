"""FK steering's wall time against the same work without steering (docs/benchmarks.md).

Side by side in one process, interleaved (A B A B ...), medians reported:

- **FK**: ``fk_steer`` with ``k`` particles per prompt, scoring the x0-predictions at its resampling
  steps, resampling, the final weight and the selection;
- **baseline**: ``k`` independent rollouts of the same shape (the same kernel, seeds and batch,
  through the same collect step) plus exactly the same reward calls (a hook that decodes and scores
  the x0-predictions at the same steps, and the final scoring), without weights or resampling.

The ratio is what FK's bookkeeping (potentials, ESS, resampling, reordering the recorded history)
costs on top of the denoiser and reward calls it cannot avoid.  Target: <= 1.10.

    python bench/steer_overhead.py            # toy-shapes + shapes-proxy
    python bench/steer_overhead.py --prompts 8 --particles 4 --steps 10 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class ScoreAtSteps:
    """The baseline's hook: the same decode + reward calls as FK at the same steps, no resampling."""

    def __init__(self, sampler, reward, steps, prompts):
        self.sampler, self.reward, self.steps, self.prompts = sampler, reward, set(steps), prompts

    def after_step(self, state):
        if state.i in self.steps:
            images = self.sampler.decode(state.step.x0).float()
            self.reward(images, list(state.prompts))
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-shapes")
    p.add_argument("--reward", default="shapes-proxy")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.steering import FKConfig, fk_steer
    from visalign.toy.prompts import split

    torch.set_num_threads(args.threads)
    sampler = vs.load(args.model)
    reward = vr.load(args.reward)
    prompts = [m["prompt"] for m in split("eval")[:: max(1, 243 // args.prompts)]][: args.prompts]
    k, steps = args.particles, args.steps
    cfg = FKConfig(lam=10.0, resample_every=2, resample_start=2, resample_end=steps - 2)
    resample_at = cfg.resample_steps(steps)
    rows = [p for p in prompts for _ in range(k)]
    seeds = list(range(len(rows)))

    def fk() -> float:
        t = time.perf_counter()
        fk_steer(sampler, prompts, reward, cfg, particles=k, num_steps=steps, seed=0)
        return time.perf_counter() - t

    def baseline() -> float:
        t = time.perf_counter()
        vs.collect(sampler, rows, {"reward": reward}, num_steps=steps, kernel="flow_sde", seeds=seeds,
                   batch_size=len(rows), hooks=[ScoreAtSteps(sampler, reward, resample_at, rows)], keep_images=False)
        return time.perf_counter() - t

    fk(), baseline()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(fk())
        b.append(baseline())
    fa, fb = statistics.median(a), statistics.median(b)
    print(f"{args.model}, {args.prompts} prompts x {k} particles, {steps} steps, reward {args.reward}, "
          f"resampling after steps {resample_at}, {torch.get_num_threads()} thread(s), {args.repeats} repeats")
    print("| run | median s | all s |\n|---|---|---|")
    print(f"| FK steering | {fa:.2f} | {', '.join(f'{x:.2f}' for x in a)} |")
    print(f"| k independent rollouts + the same reward calls | {fb:.2f} | {', '.join(f'{x:.2f}' for x in b)} |")
    print(f"ratio FK / baseline: {fa / fb:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
