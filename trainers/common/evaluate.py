"""Evaluation on held-out prompts: ODE samples scored by every eval reward (including rewards
the run does not train on, so reward hacking shows)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["evaluate", "save_grid"]


def _nanmean(x: torch.Tensor, valid: torch.Tensor) -> float:
    v = x.detach().float()
    keep = valid & torch.isfinite(v)
    return float(v[keep].mean()) if keep.any() else float("nan")


@torch.no_grad()
def evaluate(
    sampler,
    records: Sequence[dict],
    rewards: Mapping[str, Callable],
    *,
    num_steps: int,
    guidance_scale: float,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    keep_images: int = 0,
    progress: bool = False,
    size: dict | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean of every eval reward and its components over ``records`` x ``samples_per_prompt``.

    Sample ``k`` of prompt ``j`` uses seed ``seed + j * samples_per_prompt + k``, so evaluations
    at different iterations see the same noise.  Returns ``(metrics, first keep_images images)``.
    """
    from tqdm.auto import tqdm

    jobs = [(j, k) for j in range(len(records)) for k in range(samples_per_prompt)]
    scores: dict[str, list[torch.Tensor]] = {}
    valids: dict[str, list[torch.Tensor]] = {}
    kept: list[torch.Tensor] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = jobs[start : start + batch_size]
        recs = [records[j] for j, _ in chunk]
        prompts = [r["prompt"] for r in recs]
        metadata = [r["metadata"] for r in recs] if all(r.get("metadata") for r in recs) else None
        gens = [torch.Generator().manual_seed(seed + j * samples_per_prompt + k) for j, k in chunk]
        with autocast():
            traj = sampler.rollout(prompts, num_steps=num_steps, guidance_scale=guidance_scale, generator=gens,
                                   record_means=False, **(size or {}))
            images = sampler.decode(traj.final).float()
        if sum(k.shape[0] for k in kept) < keep_images:
            shown = images[:, images.shape[1] // 2] if images.ndim == 5 else images  # video: its middle frame
            kept.append(shown[: keep_images - sum(k.shape[0] for k in kept)].cpu())
        for name, reward in rewards.items():
            out = reward(images, prompts, metadata=metadata)
            entries = {name: out.scores, **{f"{name}/{c}": v for c, v in out.components.items() if c != name}}
            for key, val in entries.items():
                scores.setdefault(key, []).append(val.detach().float().cpu())
                valids.setdefault(key, []).append(out.valid.cpu())
    metrics = {f"eval/{k}": _nanmean(torch.cat(v), torch.cat(valids[k])) for k, v in scores.items()}
    first = next(iter(rewards), None)
    if first is not None:
        metrics["eval/valid_fraction"] = float(torch.cat(valids[first]).float().mean())
    return metrics, (torch.cat(kept) if kept else None)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """A PNG grid of ``(N, 3, H, W)`` images in ``[0, 1]``, written atomically."""
    from torchvision.utils import make_grid

    from visalign.sample import save_image

    return save_image(make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0), path)
