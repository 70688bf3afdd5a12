"""GRPO overhead: one trainer iteration against the model-only work it contains.

The model-only side replays the same denoiser calls with the same shapes and nothing else:
rollout = ``num_steps`` forward passes on the CFG-doubled batch (no grad); training = for each
trained step and micro-batch, a forward + backward on the CFG-doubled micro-batch plus the
reference forward of the KL term.  Both run side by side in one process on the toy-shapes
architecture (random weights unless --model is given).  Target ratio <= 1.2.

    python bench/grpo_overhead.py [--iterations 3] [--threads 2] [--model toy-shapes]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import visalign.samplers as vs  # noqa: E402
from visalign.prompts import load_prompts  # noqa: E402
from visalign.rewards import load as load_reward  # noqa: E402
from visalign.trainers import GRPOConfig, GRPOTrainer, LoraSettings, RunSettings  # noqa: E402
from visalign.trainers.common.lora import add_lora  # noqa: E402


def model_only(trainer: GRPOTrainer, batch) -> dict[str, float]:
    """The denoiser calls of one iteration, with the iteration's own shapes, timed."""
    s, c = trainer.sampler, trainer.config
    traj = batch.traj
    cond = traj.cond
    both = {k: torch.cat([cond.neg[k], cond.pos[k]]) for k in cond.pos}
    x = traj.latents[:, 0]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(c.num_steps):
            s._model(torch.cat([x, x]), traj.schedule.timesteps[i], both, c.guidance_scale)
    t1 = time.perf_counter()
    steps = trainer._trained_steps(traj, torch.Generator().manual_seed(0))
    kept = int(batch.keep.sum())
    for m0 in range(0, kept, c.train_batch_size):
        b = min(c.train_batch_size, kept - m0)
        xb = traj.latents[:b, 0]
        sub = {k: torch.cat([cond.neg[k][:b], cond.pos[k][:b]]) for k in cond.pos}
        for t in steps:
            out = s._model(torch.cat([xb, xb]), traj.schedule.timesteps[t], sub, c.guidance_scale)
            out.float().pow(2).mean().backward()
            if c.kl_beta > 0:
                with torch.no_grad(), s.reference():
                    s._model(torch.cat([xb, xb]), traj.schedule.timesteps[t], sub, c.guidance_scale)
    trainer.optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return {"rollout": t1 - t0, "train": t2 - t1}


def toy_setup(description: str):
    """Parse ``--iterations --threads --model``, load the toy-shapes sampler (random weights unless
    ``--model``) and add the toy recipe's LoRA (r 16); returns ``(args, sampler, lora_params)``.
    Shared with ``bench/grpo_cpu_levers.py``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default=None, help="a toy-shapes folder or name (default: random weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from visalign.toy import model as tm

        path = tempfile.mkdtemp()
        tm.save(tm.build(0), path)
    sampler = vs.load(path)
    torch.manual_seed(0)
    return args, sampler, add_lora(sampler, LoraSettings(rank=16, alpha=32))


def main() -> None:
    args, sampler, params = toy_setup(__doc__.splitlines()[0])
    cfg = GRPOConfig(group_size=8, prompts_per_iteration=4, num_steps=10, guidance_scale=3.0, kernel="flow_sde",
                     noise_level=0.7, sde_mode="random", sde_window_size=3, clip_range=1e-3, kl_beta=0.04,
                     learning_rate=1e-3, train_batch_size=16, ema_decay=0.0)
    run = RunSettings(run_dir=tempfile.mkdtemp(), progress=False, save_sample_grid=False)
    trainer = GRPOTrainer(sampler, {"shapes": (load_reward("shapes"), 1.0)}, cfg, train_prompts=load_prompts("toy:train"),
                          run=run, trainable=params)
    trainer.step()  # warm-up
    rows, refs = [], []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        batch = trainer.collect(trainer.iteration)
        train = trainer.update(batch, trainer.iteration)
        trainer.iteration += 1
        total = time.perf_counter() - t0
        t = batch.rollout.timings
        rows.append({"total": total, "rollout": t["rollout"] + t["decode"], "reward": t["reward"],
                     "train": train["time/train"]})
        refs.append(model_only(trainer, batch))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ref = {k: statistics.median(r[k] for r in refs) for k in refs[0]}
    ref_total = ref["rollout"] + ref["train"]
    print(f"toy-shapes UNet ({sum(p.numel() for p in sampler.denoiser.parameters()) / 1e6:.1f}M params), "
          f"{cfg.prompts_per_iteration} prompts x {cfg.group_size}, {cfg.num_steps} steps, window {cfg.sde_window_size}, "
          f"{args.threads} threads, median of {args.iterations}")
    print("| part | GRPO iteration s | model-only s | ratio |")
    print("|---|---|---|---|")
    print(f"| rollout (incl. decode) | {med['rollout']:.2f} | {ref['rollout']:.2f} | {med['rollout'] / ref['rollout']:.2f} |")
    print(f"| reward (gold verifier) | {med['reward']:.2f} | - | - |")
    print(f"| train | {med['train']:.2f} | {ref['train']:.2f} | {med['train'] / ref['train']:.2f} |")
    print(f"| **iteration** | **{med['total']:.2f}** | **{ref_total:.2f}** | **{med['total'] / ref_total:.2f}** |")


if __name__ == "__main__":
    main()
