"""Steering judged on the toy world: ``visalign steer RECIPE --toy-eval [--lora DIR]``.

The toy world's question for a steering recipe is ``visalign toy eval``'s: on the 243 evaluation
prompts, with ``samples`` images per prompt, how often does the gold verifier pass the scene
(GenEval's mean of the six category accuracies)?  :func:`evaluate_steered` answers it for steered
images: image ``n`` of the prompt-major job list (``samples`` per prompt, as ``toy eval`` orders
them) comes out of the recipe's method run on batches of ``prompts_per_batch`` jobs, the batch that
starts at job ``c`` seeded ``seed + c * particles``; the steering reward is the recipe's (a learned
one such as ``shapes-proxy``: the gold verifier only judges).  :func:`compare` puts three rows side
by side on the same prompts: the base model, the base with a LoRA, and the LoRA steered — the
README's main job prints it.

Like the toy world's reward adapters, this module sits above the rest of :mod:`visalign.toy`: it
uses steering (:mod:`visalign.steering`), which the toy world's core never imports; ``visalign
steer --toy-eval`` calls it (docs/architecture.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["evaluate_steered", "compare", "format_compare"]


def _judge(images: torch.Tensor, metas: list[dict], samples: int) -> dict:
    import numpy as np

    from .prompts import TAGS, overall
    from .verify import verify

    verdicts = verify(images, metadata=metas)
    strict = np.array([float(v.strict) for v in verdicts])
    cats = {t: float(strict[[m["tag"] == t for m in metas]].mean()) for t in TAGS if any(m["tag"] == t for m in metas)}
    return {"overall_strict": overall(cats), "strict_all_samples": float(strict.mean()),
            "partial": float(np.mean([v.partial for v in verdicts])), "per_category": cats,
            "prompts": len(metas) // samples, "samples_per_prompt": samples}


def evaluate_steered(sampler, metas: list[dict], reward, cfg, *, samples: int = 4, guidance_reward=None,
                     state_file: str | Path | None = None, progress: bool = True,
                     on_images: Callable[[list, list[dict]], None] | None = None) -> dict:
    """Gold strict accuracy of the recipe ``cfg`` (a :class:`~visalign.steering.config.SteerConfig`) steering
    ``sampler`` (its live weights, a LoRA included) on the prompt records ``metas``.

    With ``state_file`` the steered images are saved after every batch (atomically) and a rerun
    continues from there.  Returns ``toy eval``'s summary plus ``seconds`` (steering only),
    ``seconds_per_image``, ``denoiser_calls_per_image``, ``reward_calls_per_image`` and, in
    ``images``, the steered images (CPU float tensors) for further scoring."""
    from tqdm.auto import tqdm

    from visalign.steering.config import steer

    if not metas:
        raise ValueError("evaluate_steered: no prompts to evaluate")
    if samples < 1:
        raise ValueError(f"evaluate_steered: samples per prompt must be >= 1, got {samples}")
    jobs = [m for m in metas for _ in range(samples)]
    k, batch = cfg.particles, cfg.run.prompts_per_batch
    state_file = Path(state_file) if state_file is not None else None
    state = {"images": [], "seconds": 0.0, "denoiser_calls": 0.0, "reward_calls": 0.0}
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, weights_only=True)
    with tqdm(total=len(jobs), initial=len(state["images"]), desc=f"toy eval, steered ({cfg.method})", unit="img",
              disable=not progress) as bar:
        while len(state["images"]) < len(jobs):
            c = len(state["images"])
            part = jobs[c:c + batch]
            t0 = time.perf_counter()
            res = steer(sampler, [m["prompt"] for m in part], reward, cfg, metadata=part, guidance_reward=guidance_reward,
                        seed=cfg.seed + c * k)
            state["seconds"] += time.perf_counter() - t0
            state["denoiser_calls"] += res.compute["denoiser_calls"] * len(part)
            state["reward_calls"] += res.compute["reward_calls"] * len(part)
            state["images"] += [item.image.detach().float().cpu() for item in res.items]
            if state_file is not None:
                tmp = state_file.with_suffix(".tmp")
                torch.save(state, tmp)
                tmp.replace(state_file)
            bar.update(len(part))
    n = len(jobs)
    out = _judge(torch.stack(state["images"]), jobs, samples)
    if on_images is not None:
        on_images(state["images"], jobs)
    out.update({"method": cfg.method, "reward": cfg.reward, "particles": k, "seconds": round(state["seconds"], 1),
                "seconds_per_image": state["seconds"] / n, "denoiser_calls_per_image": state["denoiser_calls"] / n,
                "reward_calls_per_image": state["reward_calls"] / n, "images": state["images"]})
    return out


def compare(cfg, *, lora: str | None, samples: int = 4, max_prompts: int | None = None, progress: bool = True,
            load_reward: Callable | None = None) -> dict:
    """The base model, the base with ``lora`` (when given) and the recipe steering the base with
    ``lora``, each judged on the eval prompts (``toy eval``'s seeds for the unsteered rows).
    Returns ``{"rows": [{"name", ...summary}], "prompts", "samples_per_prompt"}``."""
    import visalign.samplers as vs
    from visalign.steering.guidance import needs_gradient

    from .evaluate import evaluate_sampler
    from .prompts import split

    metas = split("eval")[:max_prompts]
    if load_reward is None:
        from visalign.steering.common import load_reward
    reward = load_reward(cfg.reward, cfg.reward_options)
    g_reward = None
    if cfg.method in ("guidance", "fk+guidance"):
        g_reward = load_reward(cfg.guidance_reward, cfg.reward_options) if cfg.guidance_reward else reward
        needs_gradient(g_reward, f"method {cfg.method}")
    rows = []
    sampler = vs.load(cfg.model.name)
    if sampler.family != "toy":
        raise ValueError(f"the toy evaluation judges toy-world models (toy-shapes or a folder saved by toy "
                         f"pretraining); {cfg.model.name!r} is a {sampler.family} model")
    with torch.no_grad():
        rows.append({"name": f"base ({cfg.model.name})",
                     **evaluate_sampler(sampler, metas, samples_per_prompt=samples, num_steps=10, progress=progress)})
    if lora:
        from visalign.samplers.lora import load_finetuned

        load_finetuned(sampler, lora)
        with torch.no_grad():
            rows.append({"name": f"+ fine-tuned {lora}",
                         **evaluate_sampler(sampler, metas, samples_per_prompt=samples, num_steps=10,
                                            progress=progress)})
    steered = evaluate_steered(sampler, metas, reward, cfg, samples=samples, guidance_reward=g_reward,
                               progress=progress)
    steered.pop("images")
    what = f"{cfg.method} k = {cfg.particles} by {cfg.reward}"
    rows.append({"name": f"{'+ fine-tuned, ' if lora else ''}steered: {what}", **steered})
    return {"rows": rows, "prompts": len(metas), "samples_per_prompt": samples}


def format_compare(result: dict) -> str:
    """A markdown table: overall strict accuracy and its change over the first row, per category."""
    rows = result["rows"]
    cats = list(rows[0]["per_category"])
    base = rows[0]["overall_strict"]
    lines = [f"toy eval: {result['prompts']} evaluation prompts x {result['samples_per_prompt']} samples, judged by "
             "the gold verifier (overall = GenEval's mean of the categories)",
             "| | overall strict | change | " + " | ".join(cats) + " | seconds |",
             "|---|---|---|" + "---|" * len(cats) + "---|"]
    for r in rows:
        delta = r["overall_strict"] - base
        lines.append(f"| {r['name']} | **{r['overall_strict']:.3f}** | "
                     f"{'' if r is rows[0] else f'{100 * delta:+.1f} points'} | "
                     + " | ".join(f"{r['per_category'][c]:.3f}" for c in cats) + f" | {r['seconds']} |")
    return "\n".join(lines)
