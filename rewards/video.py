"""Video rewards: any image reward on sampled frames, and temporal consistency.

``video_frames(reward, frames=8, reduce="mean")`` scores ``(B, F, 3, H, W)`` videos by running an
image reward on ``frames`` evenly spaced frames (all when ``None``) and reducing per video with
the mean or the min (the min punishes one bad frame).

``temporal_consistency`` follows VBench's subject / background consistency (Huang et al. 2024,
"VBench", Sec. 3.1): with ``f_i`` the normalised features of frame i (DINO for subjects, CLIP for
backgrounds), ``score = mean_{i>=1} (max(0, <f_i, f_{i-1}>) + max(0, <f_i, f_0>)) / 2``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .backbones import Backbone, backbones_of, get_backbone
from .base import Reward, RewardInfo, RewardOutput
from .registry import info as registry_info
from .registry import load as load_reward

__all__ = ["FrameReward", "TemporalConsistency", "frame_indices", "video_frames", "temporal_consistency"]

_REDUCE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # (B, F) scores, (B, F) valid -> (B,), over valid frames only
    "mean": lambda s, v: torch.where(v, s, 0).sum(1) / v.sum(1).clamp_min(1),
    "min": lambda s, v: torch.where(v, s, torch.inf).amin(1),
}


def frame_indices(num_frames: int, frames: int | None) -> torch.Tensor:
    """``frames`` evenly spaced indices in ``[0, num_frames)``, first and last included."""
    if frames is None or frames >= num_frames:
        return torch.arange(num_frames)
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1 (or None for every frame)")
    return torch.linspace(0, num_frames - 1, frames).round().long()


class FrameReward(Reward):
    """An image reward applied to sampled frames of ``(B, F, 3, H, W)`` videos.

    Each scored frame gets its video's prompt and ``metadata`` entry (and its reference when
    references are per video), so the wrapped reward reads task metadata as it would for images.
    """

    def __init__(self, reward: Reward, frames: int | None = 8, reduce: str = "mean") -> None:
        if reduce not in _REDUCE:
            raise ValueError(f"video reduce={reduce!r}: choose one of {sorted(_REDUCE)}")
        self.inner, self.frames, self.reduce = reward, frames, reduce
        base = reward.info
        self.info = RewardInfo(
            name=f"video_frames[{base.name}]", version=base.version, licence=base.licence, modality="video",
            inputs=base.inputs, native_range=base.native_range, differentiable=base.differentiable,
            weights=base.weights, description=f"{base.name} on {frames or 'all'} frames, {reduce} over frames",
        )

    @property
    def backbones(self) -> list[Backbone]:
        return backbones_of(self.inner)

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 5:
            raise ValueError(f"reward {self.info.name!r} takes videos (B, F, 3, H, W); got {tuple(images.shape)}")
        b, f = images.shape[:2]
        idx = frame_indices(f, self.frames).to(images.device)
        n = idx.numel()
        flat = images.index_select(1, idx).flatten(0, 1)  # (B*n, 3, H, W)
        rep = (lambda xs: [x for x in xs for _ in range(n)]) if prompts is not None else (lambda xs: None)
        refs = references
        if isinstance(references, torch.Tensor) and references.shape[0] == b and references.ndim >= 4:
            refs = references.repeat_interleave(n, dim=0)
        # one entry per frame: the frames of video j share its task metadata (metadata[j])
        meta = [m for m in metadata for _ in range(n)] if metadata is not None else None
        out = self.inner(flat, rep(prompts), references=refs, metadata=meta)
        scores, valid = out.scores.view(b, n), out.valid.view(b, n)
        comps = {k: v.view(b, n).mean(1) for k, v in out.components.items()}
        comps.update({"frame_min": scores.detach().amin(1), "frame_mean": scores.detach().mean(1)})
        return RewardOutput(_REDUCE[self.reduce](scores, valid), components=comps, valid=valid.any(1))


def video_frames(reward: str | Reward, frames: int | None = 8, reduce: str = "mean", **options: Any) -> FrameReward:
    """Wrap an image reward (an object, a name or a spec string, built with ``options``) for video."""
    inner = load_reward(reward, **options) if isinstance(reward, str) else reward
    return FrameReward(inner, frames, reduce)


class TemporalConsistency(Reward):
    """VBench-style consistency of adjacent frames and of each frame with the first, in ``[0, 1]``."""

    def __init__(self, backbone: Backbone, feature: str, frames: int | None = None) -> None:
        self.info = registry_info("temporal_consistency")
        self.backbone, self.feature, self.frames = backbone, feature, frames

    @property
    def backbones(self) -> list[Backbone]:
        return [self.backbone]

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 5 or images.shape[1] < 2:
            raise ValueError(f"temporal_consistency takes videos (B, F>=2, 3, H, W); got {tuple(images.shape)}")
        b, f = images.shape[:2]
        idx = frame_indices(f, self.frames).to(images.device)
        feats = self.backbone.image_features(images.index_select(1, idx).flatten(0, 1))[self.feature]
        feats = F.normalize(feats.float(), dim=-1).view(b, idx.numel(), -1)  # (B, n, D)
        adjacent = (feats[:, 1:] * feats[:, :-1]).sum(-1)  # (B, n-1)
        to_first = (feats[:, 1:] * feats[:, :1]).sum(-1)  # (B, n-1)
        score = ((adjacent.clamp_min(0) + to_first.clamp_min(0)) / 2).mean(1)
        return RewardOutput(score, components={"adjacent": adjacent.mean(1).detach(), "to_first": to_first.mean(1).detach()})


def temporal_consistency(backbone: str = "dino", model: str | None = None, pretrained: str | None = None,
                         frames: int | None = None, dtype: Any = None, device: Any = None,
                         batch_size: int | None = None) -> TemporalConsistency:
    """``backbone="dino"`` (subject consistency; ``model`` default ``facebook/dinov2-base``) or ``"clip"``
    (background consistency; open_clip ``model`` default ``ViT-B-32`` / ``pretrained`` ``openai``)."""
    if backbone == "dino":
        bb = get_backbone("dinov2", model or "facebook/dinov2-base", dtype=dtype, device=device, batch_size=batch_size)
        return TemporalConsistency(bb, "cls", frames)
    if backbone == "clip":
        bb = get_backbone("open_clip", model or "ViT-B-32", pretrained or "openai", dtype=dtype, device=device,
                          batch_size=batch_size)
        return TemporalConsistency(bb, "embeds", frames)
    raise ValueError(f"temporal_consistency backbone={backbone!r}: choose 'dino' or 'clip'")
