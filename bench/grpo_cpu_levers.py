"""What makes a CPU GRPO iteration cheap: the toy recipe's iteration under each lever, side by side.

Variants (all on the toy-shapes UNet, 4 prompts x 8 samples, 10 steps, CFG 3, LoRA r 16, one
optimizer step per iteration), run interleaved in one process so machine load hits all alike:

- ``all steps``: every step stochastic and trained (Flow-GRPO's original), prompts re-encoded
  every iteration, float32;
- ``+ window 3``: a random 3-step SDE window (Flow-GRPO-Fast), only those steps trained;
- ``+ cached prompts``: prompt embeddings encoded once and reused;
- ``+ bf16 autocast``: accelerate's bf16 autocast on the CPU (kernels stay float32);
- ``nft``: the likelihood-free objective for comparison (ODE rollouts, 2 trained noise levels).

    python bench/grpo_cpu_levers.py [--iterations 3] [--threads 1] [--model toy-shapes]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from grpo_overhead import toy_setup  # noqa: E402  (bench/ is the script's folder)

from visalign.prompts import load_prompts  # noqa: E402
from visalign.rewards import load as load_reward  # noqa: E402
from visalign.trainers import GRPOConfig, GRPOTrainer, NFTConfig, NFTTrainer, RunSettings  # noqa: E402

BASE = dict(group_size=8, prompts_per_iteration=4, num_steps=10, guidance_scale=3.0, kernel="flow_sde", noise_level=0.7,
            clip_range=1e-3, kl_beta=0.04, learning_rate=3e-4, train_batch_size=32, ema_decay=0.0)
VARIANTS = {
    "all steps": (dict(sde_mode="all"), dict(cache_prompt_embeddings=False)),
    "+ window 3": (dict(sde_mode="random", sde_window_size=3), dict(cache_prompt_embeddings=False)),
    "+ cached prompts": (dict(sde_mode="random", sde_window_size=3), dict(cache_prompt_embeddings=True)),
    "+ bf16 autocast": (dict(sde_mode="random", sde_window_size=3), dict(cache_prompt_embeddings=True)),
    "nft (ODE rollouts, 2 levels)": (dict(timesteps=2), dict(cache_prompt_embeddings=True)),
}


class _Bf16(object):
    """The first trainer's accelerator with bf16 autocast: accelerate keeps one process-wide state,
    so a second Accelerator(mixed_precision="bf16") cannot be built next to an fp32 one; on the CPU
    accelerate's bf16 autocast is exactly ``torch.autocast("cpu", torch.bfloat16)``."""

    def __init__(self, acc):
        self._acc = acc

    def __getattr__(self, name):
        return getattr(self._acc, name)

    def autocast(self, *args, **kwargs):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def main() -> None:
    args, sampler, params = toy_setup(__doc__.splitlines()[0])
    reward = load_reward("shapes")
    prompts = load_prompts("toy:train")
    trainers = {}
    for name, (grpo, run) in VARIANTS.items():
        settings = RunSettings(run_dir=tempfile.mkdtemp(), progress=False, save_sample_grid=False, **run)
        acc = _Bf16(next(iter(trainers.values())).acc) if "bf16" in name else None
        if name.startswith("nft"):  # its own algorithm: the rollout geometry and optimiser of BASE
            nft_base = {k: v for k, v in BASE.items() if k in NFTConfig.__dataclass_fields__ and k != "kl_beta"}
            trainers[name] = NFTTrainer(sampler, {"shapes": (reward, 1.0)}, NFTConfig(**nft_base, **grpo),
                                        train_prompts=prompts, run=settings, trainable=params, accelerator=acc)
            continue
        trainers[name] = GRPOTrainer(sampler, {"shapes": (reward, 1.0)}, GRPOConfig(**BASE, **grpo),
                                     train_prompts=prompts, run=settings, trainable=params, accelerator=acc)
        trainers[name].step()  # warm-up
    times: dict[str, list[dict]] = {name: [] for name in trainers}
    for _ in range(args.iterations):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            row = tr.step()
            times[name].append({"total": time.perf_counter() - t0, "rollout": row["time/rollout"],
                                "train": row["time/train"]})
    print(f"toy-shapes UNet, {BASE['prompts_per_iteration']} prompts x {BASE['group_size']}, {BASE['num_steps']} steps, "
          f"{args.threads} threads, median of {args.iterations}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| variant | rollout s | train s | iteration s | vs all steps |")
    print("|---|---|---|---|---|")
    ref = statistics.median(r["total"] for r in times["all steps"])
    for name, rows in times.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("total", "rollout", "train")}
        print(f"| {name} | {med['rollout']:.2f} | {med['train']:.2f} | {med['total']:.2f} | {ref / med['total']:.2f}x |")


if __name__ == "__main__":
    main()
