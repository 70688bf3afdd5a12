"""``visalign toy pairs``: offline preference pairs of the toy world, for DPO.

The base model draws ``samples_per_prompt`` samples of every training prompt (the collect step, ODE,
seeded per sample); the gold verifier stands in for the human labeller and judges each sample once
(the label budget is the number of samples judged).  Within a prompt, a sample is preferred to
another when it passes strictly and the other does not, or, both passing or both failing, when its
partial credit is higher; equal verdicts are ties and make no pair (as Pick-a-Pic's ties are
dropped).  With ``strict_only`` only the clear-cut pairs are kept, a strict pass over a fail: every
winner is then a sample the labeller accepted, which is what a supervised term on the winners
(``dpo.sft_weight``) should imitate (``toy-strict:DIR``).  The folder holds ``images/*.png``, ``pairs.jsonl`` (``prompt``, ``chosen``, ``rejected``,
the labeller's partial credits as ``chosen_score`` / ``rejected_score``) and ``summary.json``
(settings, label budget, pass rate), written last, so a folder with it is complete.  It is the
"folder with a JSONL of pairs" that ``algorithm: dpo`` reads (``dpo.pairs: DIR``, or ``toy:DIR`` to
make it when missing; ``toy-strict:DIR`` for ``strict_only``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["make_pairs", "ensure_pairs", "ensure_strict_pairs"]


def make_pairs(out, model="toy-shapes", *, samples_per_prompt: int = 4, num_steps: int = 10,
               guidance_scale: float | None = None, seed: int = 0, split_name: str = "train",
               max_prompts: int | None = None, max_pairs_per_prompt: int | None = None, strict_only: bool = False,
               batch_size: int = 256, progress: bool = True) -> dict:
    """Sample, label with the gold verifier and write the pair folder ``out``; returns the summary.

    Args:
        model: a model name / folder, or a loaded toy :class:`~visalign.samplers.Sampler`.
        samples_per_prompt: samples of each prompt (labels spent per prompt).
        max_pairs_per_prompt: keep at most this many pairs of a prompt, the clearest first (a strict
            pass over a fail, then the larger partial-credit gap); None keeps every ordered pair.
        strict_only: keep only the pairs of a strict pass over a fail (no partial-credit pairs).
    """
    import numpy as np
    from PIL import Image

    import visalign.samplers as vs
    from visalign.io import atomic_write_json, atomic_write_text

    from .prompts import split
    from .verify import verify

    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to make pairs, got {samples_per_prompt}")
    sampler = vs.load(model) if isinstance(model, (str, Path)) else model
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    metas = split(split_name)[:max_prompts]
    jobs = [m for m in metas for _ in range(samples_per_prompt)]
    guidance = sampler.default_guidance if guidance_scale is None else float(guidance_scale)
    verdicts: list = []
    t0 = time.perf_counter()

    def save(start, batch):  # quantise to the PNG that is stored, then label what was stored
        q = (batch.images.clamp(0, 1) * 255).round().to(torch.uint8)
        for k in range(q.shape[0]):
            Image.fromarray(q[k].permute(1, 2, 0).numpy()).save(out / "images" / f"{start + k:06d}.png")
        verdicts.extend(verify(q.float() / 255, metadata=batch.metadata))

    with torch.no_grad():
        vs.collect(sampler, [m["prompt"] for m in jobs], metadata=jobs, num_steps=num_steps, guidance_scale=guidance,
                   seeds=[seed + n for n in range(len(jobs))], batch_size=batch_size, keep_images=False,
                   on_batch=save, progress="toy pairs" if progress else False)
    rows, with_pairs = [], 0
    for j, meta in enumerate(metas):
        ids = list(range(j * samples_per_prompt, (j + 1) * samples_per_prompt))
        key = {n: (float(verdicts[n].strict), float(verdicts[n].partial)) for n in ids}
        cand = [(a, b) for a in ids for b in ids if key[a] > key[b] and (not strict_only or key[a][0] > key[b][0])]
        cand.sort(key=lambda ab: (key[ab[0]][0] - key[ab[1]][0], key[ab[0]][1] - key[ab[1]][1]), reverse=True)
        cand = cand[:max_pairs_per_prompt] if max_pairs_per_prompt is not None else cand
        with_pairs += bool(cand)
        for a, b in cand:
            rows.append({"prompt": meta["prompt"], "chosen": f"images/{a:06d}.png", "rejected": f"images/{b:06d}.png",
                         "chosen_score": key[a][1], "rejected_score": key[b][1],
                         "chosen_strict": bool(key[a][0]), "rejected_strict": bool(key[b][0]), "tag": meta["tag"]})
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    strict = np.array([float(v.strict) for v in verdicts])
    summary = {"model": str(getattr(sampler, "name", model)), "split": split_name, "prompts": len(metas),
               "samples_per_prompt": samples_per_prompt, "num_steps": num_steps, "guidance_scale": guidance,
               "seed": seed, "labels": len(verdicts), "pass_rate": float(strict.mean()) if strict.size else 0.0,
               "pairs": len(rows), "prompts_with_pairs": with_pairs, "max_pairs_per_prompt": max_pairs_per_prompt,
               "strict_only": bool(strict_only),
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "summary.json", summary)
    return summary


def ensure_pairs(folder: str, sampler=None, samples_per_prompt: int = 8, strict_only: bool = False,
                 **options) -> Path:
    """The pair folder ``folder``, made with :func:`make_pairs` (``sampler``, or the shipped
    ``toy-shapes``; 8 samples of every training prompt, 1,464 labels) when it has no
    ``summary.json`` yet: the ``toy:DIR`` pair source of DPO (``toy-strict:DIR`` with
    ``strict_only``).  A folder made by another base, or with the other ``strict_only``, is refused."""
    import inspect

    source = "toy-strict" if strict_only else "toy"
    known = set(inspect.signature(make_pairs).parameters) - {"out", "model", "samples_per_prompt", "strict_only"}
    if set(options) - known:
        raise ValueError(f"dpo.pairs_options {options}: {sorted(set(options) - known)[0]!r} is not an option of the "
                         f"{source}: source (options: samples_per_prompt, {', '.join(sorted(known))})")
    path = Path(folder).expanduser()
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        made_by = summary.get("model")
        if sampler is not None and made_by is not None and made_by != str(sampler.name):
            raise ValueError(f"the preference pairs in {path} are samples of {made_by!r}, but this run trains "
                             f"{sampler.name!r}: offline DPO learns from its own base's samples; point dpo.pairs at "
                             f"another folder ({source}:DIR, made on first use) or delete {path}")
        made_with = summary.get("samples_per_prompt")
        if made_with is not None and int(made_with) != int(samples_per_prompt):
            raise ValueError(f"the preference pairs in {path} were made with {made_with} samples per prompt, but "
                             f"{samples_per_prompt} were asked for (dpo.pairs_options.samples_per_prompt); point "
                             f"dpo.pairs at another folder or delete {path}")
        if bool(summary.get("strict_only", False)) != bool(strict_only):
            other = "toy-strict" if not strict_only else "toy"
            raise ValueError(f"the preference pairs in {path} were made {'with' if not strict_only else 'without'} "
                             f"strict_only (a {other}:DIR folder), but dpo.pairs asks for {source}:{folder}; point it "
                             f"at another folder or delete {path}")
    if not (path / "summary.json").is_file():
        summary = make_pairs(path, sampler if sampler is not None else "toy-shapes",
                             samples_per_prompt=samples_per_prompt, strict_only=strict_only, **options)
        print(f"toy pairs: {summary['pairs']} pairs of {summary['prompts']} prompts in {path} "
              f"({summary['labels']} labels by the gold verifier, pass rate {summary['pass_rate']:.2f})")
    return path


def ensure_strict_pairs(folder: str, sampler=None, samples_per_prompt: int = 8, **options) -> Path:
    """:func:`ensure_pairs` with ``strict_only``: the ``toy-strict:DIR`` pair source of DPO (only a
    strict pass over a fail; every winner is a sample the gold verifier accepted)."""
    return ensure_pairs(folder, sampler, samples_per_prompt, strict_only=True, **options)
