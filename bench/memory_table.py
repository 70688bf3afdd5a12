"""The memory table of docs/memory.md: peak GiB per GPU of one training step for each published
family x {LoRA, full fine-tuning} x {DDP, FSDP, ZeRO-3}, computed by the planner (``visalign plan``).

The step is the same for every model so the rows compare: GRPO (Flow-GRPO; DDPO for SD1.5 / SDXL)
with a micro-batch of one sample at the family's usual resolution, the family's CFG scale (two
rows per forward; FLUX.1-dev's guidance is embedded: one row), bfloat16 weights and autocast, the
default EMA of the trained weights, LoRA r = 32 on the family's default targets, the default text
length (SD3: 77 + 256 tokens, FLUX / Wan: 512), Wan at 81 frames of 480 x 832.  Each model is
planned without and with gradient checkpointing.  Nothing is downloaded: the published configs
are built on the meta device.

    python bench/memory_table.py [--gpus 8] [--gpu-mem 80] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: (label, hub id, height, width, CFG scale of the family's sampling)
MODELS = [
    ("SD1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 512, 7.5),
    ("SDXL base", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 1024, 5.0),
    ("SD3.5-Medium", "stabilityai/stable-diffusion-3.5-medium", 1024, 1024, 4.5),
    ("SD3.5-Large", "stabilityai/stable-diffusion-3.5-large", 1024, 1024, 3.5),
    ("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", 1024, 1024, 3.5),
    ("Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 5.0),
    ("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 5.0),
]
STRATEGIES = ("ddp", "fsdp", "zero3")


def recipe(hub_id: str, height: int, width: int, guidance: float, *, lora: bool, checkpointing: bool):
    from visalign.trainers.common.lora import LoraSettings
    from visalign.trainers.common.run import RunSettings
    from visalign.trainers.grpo.config import GRPOConfig
    from visalign.trainers.plan import resolve_model
    from visalign.trainers.recipe import ModelSection, TrainRecipe

    eps_model = resolve_model(hub_id).family in ("sd", "sdxl")
    config = GRPOConfig(group_size=8, prompts_per_iteration=8, train_batch_size=1, guidance_scale=guidance,
                        kernel="ddim" if eps_model else "flow_sde")
    model = ModelSection(name=hub_id, dtype="bfloat16", device="cuda", height=height, width=width,
                         gradient_checkpointing=checkpointing)
    return TrainRecipe(algorithm="grpo", model=model, lora=LoraSettings(rank=32, alpha=64) if lora else None,
                       run=RunSettings(mixed_precision="bf16"), config=config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0)
    ap.add_argument("--json", action="store_true", help="print every plan as JSON instead of the tables")
    args = ap.parse_args()

    from visalign.trainers.plan import GIB, plan_recipe

    t0 = time.perf_counter()
    plans = []
    for checkpointing in (False, True):
        for label, hub_id, h, w, g in MODELS:
            for lora in (True, False):
                plan = plan_recipe(recipe(hub_id, h, w, g, lora=lora, checkpointing=checkpointing), gpus=args.gpus,
                                   gpu_mem_gib=args.gpu_mem, strategies=STRATEGIES)
                plans.append((label, checkpointing, plan))
    if args.json:
        print(json.dumps([{"label": label, **plan.to_dict()} for label, _, plan in plans], indent=2))
        return
    budget = plans[0][2].rows[0].budget / GIB
    print(f"Peak GiB per GPU, {args.gpus} x {args.gpu_mem:g} GiB GPUs (fits: below {budget:.1f} GiB, a 10 % margin)\n")
    for checkpointing in (False, True):
        print(f"Gradient checkpointing {'on' if checkpointing else 'off'}:\n")
        head = "| model | size | denoiser | mode | trained | activations | " + " | ".join(
            {"ddp": "DDP", "fsdp": "FSDP", "zero3": "ZeRO-3"}[s] for s in STRATEGIES) + " |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for label, ck, plan in plans:
            if ck != checkpointing:
                continue
            size = f"{plan.height}x{plan.width}" + (f"x{plan.frames}" if plan.frames else "")
            mode = f"LoRA r={plan.lora_rank}" if plan.mode == "lora" else "full"
            act = plan.rows[0].activations + plan.rows[0].recompute
            cells = [f"{r.total / GIB:.1f} {'yes' if r.fits else 'no'}" for r in plan.rows]
            print(f"| {label} | {size} | {plan.denoiser_parameters / 1e9:.2f} B | {mode} | "
                  f"{plan.trainable_parameters / 1e9:.3f} B | {act / GIB:.1f} | " + " | ".join(cells) + " |")
        print()
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
