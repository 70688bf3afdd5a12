"""Injected image artifacts and the labelled data of the toy artifact reward ``shapes-artifact``.

Reward hacking shows up as artifacts (docs/rewards.md, "Known hacks"): blur and over-smoothing,
over-saturated colour, periodic grid textures, blotches.  An artifact reward trained on a few
hundred curated samples and used as a regulariser or held-out judge catches them ("Understanding
Reward Hacking in Text-to-Image RL").  Here the artifacts are injected into base-model samples
of the toy world, so the labels are free and exact:

- ``blur``: Gaussian blur, sigma uniform in [0.7, 1.5] px;
- ``saturation``: colours pushed away from their grey value by a factor in [1.8, 3.0], clipped;
- ``grid``: a periodic grid of lines every 3 or 4 px, added with amplitude +-[0.12, 0.3];
- ``blotches``: 2-4 soft discs of a random colour, radius 2-5 px, opacity 0.5-0.9.

:func:`training_data` is the reward-head kit's data provider (``visalign rewards train
shapes-artifact``): every pool image once clean (label 1) and once with one artifact (label 0),
held out on the eval-split samples.  The toy world imports nothing from the kit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .proxy import _default_pool_path, make_pool, read_pool, roc_auc

__all__ = ["KINDS", "inject", "training_data"]

KINDS = ("blur", "saturation", "grid", "blotches")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = []
    for img, sigma in zip(x, _uniform(g, len(x), 0.7, 1.5).tolist()):
        r = max(1, math.ceil(3 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
        k = k / k.sum()
        y = F.pad(img[None], (r, r, r, r), mode="replicate")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        out.append(y[0])
    return torch.stack(out)


def saturation(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    grey = x.mean(1, keepdim=True)
    s = _uniform(g, len(x), 1.8, 3.0).view(-1, 1, 1, 1)
    return (grey + s * (x - grey)).clamp(0, 1)


def grid(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    period = torch.randint(3, 5, (b,), generator=g)
    amp = _uniform(g, b, 0.12, 0.3) * torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    phase = torch.randint(0, 3, (b, 2), generator=g)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    p = period.view(-1, 1, 1)
    lines = (((ys + phase[:, :1, None]) % p) == 0) | (((xs + phase[:, 1:, None]) % p) == 0)  # (B, H, W)
    return (x + amp.view(-1, 1, 1, 1) * lines[:, None].to(x.dtype)).clamp(0, 1)


def blotches(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    out = x.clone()
    for i in range(b):
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            r = float(_uniform(g, 1, 2.0, 5.0))
            alpha = float(_uniform(g, 1, 0.5, 0.9))
            colour = torch.rand(3, 1, 1, generator=g)
            d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
            mask = (alpha * torch.sigmoid((r - d) * 2.0))[None]  # soft edge, (1, H, W)
            out[i] = out[i] * (1 - mask) + colour * mask
    return out


_INJECT = {"blur": blur, "saturation": saturation, "grid": grid, "blotches": blotches}


def inject(images: torch.Tensor, kinds: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] with artifact ``kinds[i]`` injected into image ``i``."""
    if len(kinds) != len(images):
        raise ValueError(f"inject: {len(images)} images but {len(kinds)} kinds")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown artifact kinds {unknown}: choose from {list(KINDS)}")
    out = images.clone()
    for kind in KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            out[idx] = _INJECT[kind](images[idx], generator)
    return out


def _labelled(images_u8: torch.Tensor, seed: int):
    """Each image once clean (label 1) and once with a random artifact (label 0)."""
    g = torch.Generator().manual_seed(seed)
    kinds = [KINDS[int(i)] for i in torch.randint(len(KINDS), (len(images_u8),), generator=g)]
    x = images_u8.float() / 255
    bad = (inject(x, kinds, g) * 255).round().to(torch.uint8)
    images = torch.cat([images_u8, bad])
    targets = torch.cat([torch.ones(len(x)), torch.zeros(len(x))])
    return images, targets, ["clean"] * len(x) + kinds


def training_data(seed: int = 0, log=print, model: str = "toy-shapes", pool: str | None = None,
                  pool_train: int = 1500, pool_eval: int = 480, pool_steps: int = 10) -> dict:
    """The kit's data provider for ``shapes-artifact``: base-model samples of the pool (shared with
    ``shapes-proxy``'s, made when absent) clean (label 1) vs with one injected artifact (label 0).
    Train: the train-split samples; held out: the eval-split samples, with ROC AUC per kind in the
    report."""
    from pathlib import Path

    pool_path = Path(pool) if pool else _default_pool_path(model, seed, pool_train, pool_eval, pool_steps)
    if not pool_path.is_file():
        make_pool(pool_path, model, pool_train, pool_eval, seed=seed, num_steps=pool_steps, log=log)
    tensors, info = read_pool(pool_path)
    if info["model"] != str(model):
        raise ValueError(f"{pool_path} holds samples of {info['model']!r}, not {model!r}")
    is_eval = tensors["is_eval"]
    tr_x, tr_y, _ = _labelled(tensors["images"][~is_eval], seed)
    va_x, va_y, va_kinds = _labelled(tensors["images"][is_eval], seed + 1)
    va_kinds = np.array(va_kinds)
    gold = va_y.numpy() > 0.5

    def report(scores: np.ndarray) -> dict:
        clean = va_kinds == "clean"
        return {"heldout_auc_by_kind": {k: roc_auc(np.concatenate([scores[clean], scores[va_kinds == k]]),
                                                   np.concatenate([gold[clean], gold[va_kinds == k]]))
                                        for k in KINDS}}

    return {"train": {"images": tr_x, "prompts": [None] * len(tr_x), "targets": tr_y},
            "val": {"images": va_x, "prompts": [None] * len(va_x), "targets": va_y}, "report": report}
