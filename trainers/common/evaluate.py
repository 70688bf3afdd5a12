"""Evaluation on held-out prompts: ODE samples scored by every eval reward (including rewards
the run does not train on, so reward hacking shows), through the shared collect step."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["evaluate", "save_grid", "eval_seeds"]


def eval_seeds(num_prompts: int, samples_per_prompt: int, seed: int = 0) -> list[int]:
    """Sample ``k`` of prompt ``j`` uses seed ``seed + j * samples_per_prompt + k``, so evaluations
    at different iterations, and a LoRA and its base, see the same noise."""
    return [seed + j * samples_per_prompt + k for j in range(num_prompts) for k in range(samples_per_prompt)]


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
    """Mean of every eval reward and its components over ``records`` x ``samples_per_prompt``
    (``eval/<reward>`` and ``eval/<reward>/<component>``, plus ``eval/valid_fraction``).

    Returns ``(metrics, the first keep_images images)``; video evaluations keep each clip's middle
    frame.
    """
    from visalign.samplers import collect

    records = list(records)
    prompts = [r["prompt"] for r in records for _ in range(samples_per_prompt)]
    metadata = [r.get("metadata") for r in records for _ in range(samples_per_prompt)]
    out = collect(sampler, prompts, rewards, metadata=metadata, num_steps=num_steps, guidance_scale=guidance_scale,
                  seeds=eval_seeds(len(records), samples_per_prompt, seed), batch_size=batch_size,
                  keep_images=keep_images, autocast=autocast, progress="eval" if progress else False, size=size)
    images = out.images
    if images is not None and images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    return out.means(prefix="eval/"), images


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """A PNG grid of ``(N, 3, H, W)`` images in ``[0, 1]``, written atomically."""
    from torchvision.utils import make_grid

    from visalign.sample import save_image

    return save_image(make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0), path)
