"""``visalign toy eval``: GenEval-style accuracy of a model on the toy world's evaluation prompts.

The eval split is every prompt of the grammar (243), the training prompts included: it measures
how well the model draws the world.  60 of its prompts hold a colour binding or position composition
that no training prompt has; their accuracy is reported beside the overall one (``heldout``, and
``seen`` for the other 183), as the figure for generalisation to compositions never trained on.

Every eval prompt gets ``samples_per_prompt`` ODE samples (seed ``seed + j * n + k`` for sample
``k`` of prompt ``j``, so a LoRA and its base see the same noise), scored by the gold verifier.
The overall score is GenEval's: the unweighted mean of the per-category strict accuracies.

``pass_at`` adds pass@k for each k: the chance that at least one of k samples of a prompt passes,
with the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", eq. 1) from the ``samples_per_prompt`` samples, averaged over a category's prompts and then
over categories like the overall score.  Set against pass@1 it says how much of a model's failure
is unreliability (right scenes that best-of-k finds, which alignment can make the rule) and how
much is missing capability.
"""

from __future__ import annotations

import time

import torch

__all__ = ["evaluate_model", "evaluate_sampler", "format_report", "pass_at_k", "by_heldout"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` passes among ``n`` samples (Chen et al. 2021, eq. 1):
    ``1 - C(n - c, k) / C(n, k)``."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples per prompt ({n})")
    if n - c < k:
        return 1.0
    from math import comb

    return 1.0 - comb(n - c, k) / comb(n, k)


def by_heldout(strict, metas: list[dict]) -> dict:
    """Strict accuracy (the mean over samples) of the prompts with a composition never trained on
    (``heldout``) and of the others (``seen``): ``{"heldout": {"prompts", "strict"}, "seen": ...}``;
    ``{}`` when the prompt records carry no ``heldout`` flag.  ``strict``: ``(prompts, samples)``
    pass / fail, in the order of ``metas``."""
    import numpy as np

    if not metas or any("heldout" not in m for m in metas):
        return {}
    strict = np.asarray(strict, dtype=float).reshape(len(metas), -1)
    out = {}
    for key, flag in (("heldout", True), ("seen", False)):
        rows = [i for i, m in enumerate(metas) if bool(m["heldout"]) is flag]
        out[key] = {"prompts": len(rows), "strict": float(strict[rows].mean()) if rows else None}
    return out


def evaluate_model(model: str = "toy-shapes", *, lora: str | None = None, samples_per_prompt: int = 4,
                   num_steps: int = 10, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 200,
                   max_prompts: int | None = None, bf16: bool = False, progress: bool = True,
                   pass_at: tuple[int, ...] = ()) -> dict:
    """Accuracy of ``model`` (optionally with a LoRA) on the eval split, judged by the gold verifier.

    Sampling goes through the library's collect step; sample ``k`` of prompt ``j`` uses seed
    ``seed + j * samples_per_prompt + k``.  Returns the summary that ``visalign toy eval`` prints.
    """
    import visalign.samplers as vs

    from .prompts import split

    for k in pass_at:
        if not 1 <= k <= samples_per_prompt:
            raise ValueError(f"--pass-at {k}: k must be between 1 and --samples-per-prompt ({samples_per_prompt}); "
                             f"raise --samples-per-prompt to at least {k}")
    sampler = vs.load(model)
    if lora:
        from visalign.samplers.lora import load_finetuned

        load_finetuned(sampler, lora)
    result = evaluate_sampler(sampler, split("eval")[:max_prompts], samples_per_prompt=samples_per_prompt,
                              num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                              bf16=bf16, progress=progress, pass_at=pass_at)
    return {"model": model, "lora": lora, **result}


def evaluate_sampler(sampler, metas: list[dict], *, samples_per_prompt: int = 4, num_steps: int = 10,
                     guidance_scale: float | None = None, seed: int = 0, batch_size: int = 200, bf16: bool = False,
                     progress: bool = True, pass_at: tuple[int, ...] = (), on_batch=None) -> dict:
    """:func:`evaluate_model` on a loaded sampler (its live weights, LoRA included) and the prompt
    records ``metas`` (eval-split metadata; ``split("eval")`` is what ``visalign toy eval`` uses).

    ``on_batch(images, metadata)``, when given, also sees every batch of samples (to score them with
    another reward); no images are kept otherwise.
    """
    import contextlib

    import numpy as np

    import visalign.samplers as vs

    from .prompts import TAGS, overall
    from .verify import verify

    if not metas:
        raise ValueError("evaluate_sampler: no prompts to evaluate")
    guidance = sampler.default_guidance if guidance_scale is None else guidance_scale
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    t0 = time.perf_counter()
    verdicts = []

    def judge(start, batch):  # the gold verifier on each batch as it comes; no images are kept
        verdicts.extend(verify(batch.images, metadata=batch.metadata))
        if on_batch is not None:
            on_batch(batch.images, batch.metadata)

    jobs = [m for m in metas for _ in range(samples_per_prompt)]
    vs.collect(sampler, [m["prompt"] for m in jobs], metadata=jobs, num_steps=num_steps, guidance_scale=guidance,
               seeds=[seed + n for n in range(len(jobs))], batch_size=batch_size, keep_images=False,
               autocast=autocast, on_batch=judge, progress="toy eval" if progress else False)
    strict = np.array([float(v.strict) for v in verdicts]).reshape(len(metas), samples_per_prompt)
    partial = float(np.mean([v.partial for v in verdicts]))
    per_category = {t: float(strict[[m["tag"] == t for m in metas]].mean()) for t in TAGS
                    if any(m["tag"] == t for m in metas)}  # categories sampled
    passes = strict.sum(1).round().astype(int).tolist()
    pass_k = {}
    for k in pass_at:
        by_tag: dict[str, list[float]] = {}
        for meta, c in zip(metas, passes):
            by_tag.setdefault(meta["tag"], []).append(pass_at_k(samples_per_prompt, c, k))
        cats = {t: sum(by_tag[t]) / len(by_tag[t]) for t in TAGS if t in by_tag}
        pass_k[str(k)] = {"overall": overall(cats), "per_category": cats}
    return {
        "overall_strict": overall(per_category),
        "strict_all_samples": float(strict.mean()),
        "partial": partial,
        "per_category": per_category,
        "prompts": len(metas),
        "samples_per_prompt": samples_per_prompt,
        "num_steps": num_steps,
        "guidance_scale": guidance,
        "seed": seed,
        "pass_at_k": pass_k,
        **by_heldout(strict, metas),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_report(result: dict) -> str:
    lines = [f"toy eval: {result['model']}" + (f" + {result['lora']}" if result["lora"] else ""),
             f"{result['prompts']} prompts x {result['samples_per_prompt']} samples, {result['num_steps']} ODE steps, "
             f"CFG {result['guidance_scale']}, seed {result['seed']} ({result['seconds']} s)",
             "| category | strict accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["per_category"].items()]
    lines += [f"| **overall (GenEval mean of categories)** | **{result['overall_strict']:.3f}** |",
              f"partial credit: {result['partial']:.3f}"]
    held, seen = result.get("heldout"), result.get("seen")
    if held and held["prompts"] and seen:
        lines.append(f"compositions never trained on ({held['prompts']} prompts): strict {held['strict']:.3f}; "
                     f"the other {seen['prompts']} prompts: {seen['strict']:.3f} (means over samples)")
    for k, v in result.get("pass_at_k", {}).items():
        cats = ", ".join(f"{t} {a:.3f}" for t, a in v["per_category"].items())
        lines.append(f"pass@{k}: overall {v['overall']:.3f} ({cats})")
    return "\n".join(lines)
