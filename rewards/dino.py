"""DINOv2 similarity to reference images (subject / identity consistency).

Score: cosine similarity between DINOv2 features of each image and of its reference image(s)
(Oquab et al. 2023, "DINOv2"; the DINO score of DreamBooth, Ruiz et al. 2023, uses the CLS token).
Pooling ``"cls"`` uses ``pooler_output`` (the layer-normed CLS token); ``"patch_mean"`` averages
the patch tokens, which follows layout more than identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .backbones import Backbone, get_backbone
from .base import Reward, RewardOutput, check_images
from .registry import info as registry_info

__all__ = ["DinoSimilarity", "dino", "reference_batch"]

POOLINGS = ("cls", "patch_mean")


def reference_batch(references: Any, batch: int, name: str) -> torch.Tensor:
    """Bring references to ``(B or 1, R, 3, H, W)`` (1 when one set serves every image).

    Accepted: ``(3, H, W)`` or ``(1, 3, H, W)`` (one reference for all), ``(B, 3, H, W)`` (one per
    image), ``(B, R, 3, H, W)`` (R per image; the score is the mean similarity over them).
    """
    if not isinstance(references, torch.Tensor):
        raise TypeError(f"reward {name!r}: references must be a float tensor in [0, 1]; got {type(references).__name__}")
    refs = references
    if refs.ndim == 3:
        refs = refs[None]
    if refs.ndim == 4:
        refs = refs[:, None]  # (B or 1, 1, 3, H, W)
    check_images(refs.flatten(0, 1), name)
    if refs.ndim != 5 or refs.shape[0] not in (1, batch):
        raise ValueError(
            f"reward {name!r}: references of shape {tuple(references.shape)} do not fit {batch} images; pass "
            "(3,H,W), (1,3,H,W), (B,3,H,W) or (B,R,3,H,W)"
        )
    return refs


class DinoSimilarity(Reward):
    """Cosine similarity of DINOv2 features to reference images, in ``[-1, 1]``."""

    def __init__(self, backbone: Backbone, pooling: str = "cls") -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"dino pooling={pooling!r}: choose one of {POOLINGS}")
        self.info = registry_info("dino")
        self.backbone, self.pooling = backbone, pooling

    @property
    def backbones(self) -> list[Backbone]:
        return [self.backbone]

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        b = images.shape[0]
        refs = reference_batch(references, b, self.info.name)  # (B or 1, R, 3, H, W)
        n, r = refs.shape[:2]
        img = self.backbone.image_features(images)[self.pooling].float()  # (B, D)
        ref = self.backbone.image_features(refs.flatten(0, 1))[self.pooling].float().view(n, r, -1)  # (n, R, D)
        sims = F.cosine_similarity(img[:, None], ref, dim=-1)  # (B, R)
        return RewardOutput(sims.mean(dim=1), components={"min_over_refs": sims.min(dim=1).values.detach()})


def dino(model: str = "facebook/dinov2-base", pooling: str = "cls", dtype: Any = None, device: Any = None,
         batch_size: int | None = None) -> DinoSimilarity:
    """DINOv2 similarity reward; ``model`` is a hub id (``facebook/dinov2-{small,base,large}``) or a folder."""
    return DinoSimilarity(get_backbone("dinov2", model, dtype=dtype, device=device, batch_size=batch_size), pooling)
