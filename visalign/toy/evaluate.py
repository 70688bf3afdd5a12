"""``visalign toy eval``: GenEval-style accuracy of a model on the toy world's held-out prompts.

Every eval prompt gets ``samples_per_prompt`` ODE samples (seed ``seed + j * n + k`` for sample
``k`` of prompt ``j``, so a LoRA and its base see the same noise), scored by the gold verifier.
The overall score is GenEval's: the unweighted mean of the per-category strict accuracies.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

__all__ = ["evaluate_model", "format_report"]


def evaluate_model(model: str = "toy-shapes", *, lora: str | None = None, samples_per_prompt: int = 4,
                   num_steps: int = 10, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 200,
                   max_prompts: int | None = None, bf16: bool = False, progress: bool = True) -> dict:
    import contextlib

    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.trainers.common.evaluate import evaluate

    from .prompts import TAGS, overall, split

    sampler = vs.load(model)
    if lora:
        from visalign.trainers.common.lora import load_lora

        load_lora(sampler, lora)
    records = [{"prompt": m["prompt"], "metadata": dict(m)} for m in split("eval")][:max_prompts]
    guidance = sampler.default_guidance if guidance_scale is None else guidance_scale
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    t0 = time.perf_counter()
    metrics, _ = evaluate(sampler, records, {"shapes": vr.load("shapes")}, num_steps=num_steps,
                          guidance_scale=guidance, samples_per_prompt=samples_per_prompt, seed=seed,
                          batch_size=batch_size, autocast=autocast, progress=progress)
    import math

    per_category = {t: metrics[f"eval/shapes/strict/{t}"] for t in TAGS
                    if math.isfinite(metrics.get(f"eval/shapes/strict/{t}", float("nan")))}  # categories sampled
    return {
        "model": model,
        "lora": lora,
        "overall_strict": overall(per_category),
        "strict_all_samples": metrics["eval/shapes/strict"],
        "partial": metrics["eval/shapes/partial"],
        "per_category": per_category,
        "prompts": len(records),
        "samples_per_prompt": samples_per_prompt,
        "num_steps": num_steps,
        "guidance_scale": guidance,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_report(result: dict) -> str:
    lines = [f"toy eval: {result['model']}" + (f" + LoRA {result['lora']}" if result["lora"] else ""),
             f"{result['prompts']} prompts x {result['samples_per_prompt']} samples, {result['num_steps']} ODE steps, "
             f"CFG {result['guidance_scale']}, seed {result['seed']} ({result['seconds']} s)",
             "| category | strict accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["per_category"].items()]
    lines += [f"| **overall (GenEval mean of categories)** | **{result['overall_strict']:.3f}** |",
              f"partial credit: {result['partial']:.3f}"]
    return "\n".join(lines)
