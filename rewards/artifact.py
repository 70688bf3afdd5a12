"""Weight-free detectors of known reward hacks, for use as penalties.

Reward models are hacked in recognisable ways (docs/rewards.md, "Known hacks"): aesthetic
and PickScore/HPS push towards over-saturated colours and blown or crushed exposure, HPS/PickScore
towards grid-like periodic textures, OCR rewards towards blank dark backgrounds.  Each detector
here returns a per-image penalty in ``[0, 1]`` (0 = clean) as a component; the reward's score is
``-sum_k w_k * penalty_k / sum_k w_k`` in ``[-1, 0]``, so it can be added to any reward with
:func:`visalign.rewards.combine`.  Not differentiable overall (the entropy detector uses a
histogram); the other detectors are torch ops.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .base import Reward, RewardOutput
from .registry import info as registry_info

__all__ = ["DETECTORS", "ArtifactPenalty", "artifact"]


def _luma(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return 0.299 * r + 0.587 * g + 0.114 * b  # (B, H, W), ITU-R BT.601


def oversaturation(images: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Mean excess of HSV saturation ``(max - min) / max`` above ``threshold``, scaled to [0, 1]."""
    mx, mn = images.amax(dim=1), images.amin(dim=1)
    sat = (mx - mn) / (mx + 1e-6)  # (B, H, W)
    return (F.relu(sat - threshold) / (1 - threshold)).mean(dim=(1, 2))


def clipped_exposure(images: torch.Tensor, low: float = 0.03, high: float = 0.97) -> torch.Tensor:
    """How far pixels' luminance goes past ``low`` / ``high`` (crushed shadows, blown highlights)."""
    y = _luma(images)
    return (F.relu(y - high) / (1 - high) + F.relu(low - y) / low).mean(dim=(1, 2)).clamp(max=1.0)


def periodic_grid(images: torch.Tensor, min_freq: float = 1 / 24, top_k: int = 8) -> torch.Tensor:
    """Share of mid/high-frequency spectral energy held by the ``top_k`` strongest frequencies.

    A periodic texture (a grid of period p px) puts its energy in a few peaks at multiples of
    ``1/p``; natural images and noise spread it.  Frequencies below ``min_freq`` cycles/px (the
    image's layout) are left out; a Hann window removes the edge discontinuity's cross.
    """
    y = _luma(images)
    y = y - y.mean(dim=(1, 2), keepdim=True)
    h, w = y.shape[-2:]
    window = torch.hann_window(h, periodic=False, device=y.device, dtype=y.dtype)[:, None] * torch.hann_window(
        w, periodic=False, device=y.device, dtype=y.dtype)[None, :]
    power = torch.fft.rfft2(y * window).abs().square()  # (B, H, W//2+1)
    fy = torch.fft.fftfreq(h, device=y.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=y.device)[None, :]
    band = (fy.square() + fx.square()).sqrt() >= min_freq  # (H, W//2+1)
    energy = power[:, band]  # (B, N)
    k = min(top_k, energy.shape[1])
    return energy.topk(k, dim=1).values.sum(dim=1) / (energy.sum(dim=1) + 1e-12)


def flat_regions(images: torch.Tensor, tiles: int = 8, threshold: float = 0.02) -> torch.Tensor:
    """Share of a ``tiles x tiles`` grid whose pixel std is below ``threshold`` (soft: 1 - std/threshold)."""
    b, _, h, w = images.shape
    th, tw = max(h // tiles, 1), max(w // tiles, 1)
    y = _luma(images)[:, : th * (h // th), : tw * (w // tw)]
    blocks = y.unfold(1, th, th).unfold(2, tw, tw)  # (B, nH, nW, th, tw)
    std = blocks.flatten(-2).std(dim=-1)  # (B, nH, nW)
    return F.relu(1 - std / threshold).mean(dim=(1, 2))


def low_entropy(images: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """``1 - H / log(bins)`` of the luminance histogram: 1 for a blank image, ~0 for a varied one."""
    y = _luma(images.detach()).clamp(0, 1)
    idx = (y.flatten(1) * (bins - 1)).round().long()  # (B, HW)
    hist = torch.zeros(y.shape[0], bins, device=y.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
    p = hist / hist.sum(dim=1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return 1 - entropy / math.log(bins)


DETECTORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "oversaturation": oversaturation,
    "clipped_exposure": clipped_exposure,
    "periodic_grid": periodic_grid,
    "flat_regions": flat_regions,
    "low_entropy": low_entropy,
}


class ArtifactPenalty(Reward):
    """Weighted mean of detector penalties, negated: score in ``[-1, 0]``, components in ``[0, 1]``."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        unknown = sorted(set(weights) - set(DETECTORS))
        if unknown or not weights:
            raise ValueError(f"artifact detectors {unknown or '(none)'}: choose from {sorted(DETECTORS)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"artifact weights must be >= 0 with a positive sum; got {dict(weights)}")
        self.info = registry_info("artifact")
        self.weights = dict(weights)

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 4:
            raise ValueError("reward 'artifact' scores images (B,3,H,W); wrap it with video_frames() for video")
        x = images.float().clamp(0, 1)
        components = {name: DETECTORS[name](x) for name in self.weights}
        total = sum(self.weights[n] * components[n] for n in components) / sum(self.weights.values())
        return RewardOutput(-total, components={k: v.detach() for k, v in components.items()})


def artifact(**weights: float) -> ArtifactPenalty:
    """``artifact()`` uses every detector with weight 1; ``artifact(periodic_grid=2, low_entropy=0)`` reweights.

    Detectors given weight 0 are dropped.
    """
    chosen = {name: 1.0 for name in DETECTORS}
    chosen.update({k: float(v) for k, v in weights.items()})
    return ArtifactPenalty({k: v for k, v in chosen.items() if v != 0 or k not in DETECTORS})
