"""CLIP-family rewards: LAION aesthetic v2, CLIPScore, PickScore, HPSv2.

All four embed images with a (shared, cached) CLIP backbone (:mod:`.backbones`) and differ in the
head: an affine MLP on the normalised image embedding (aesthetic) or a scaled cosine between image
and text embeddings.  Preprocessing is torch ops (:mod:`.preprocess`), so every score is
differentiable with respect to the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbones import Backbone, get_backbone
from .base import Reward, RewardOutput
from .loading import hub_download, load_state_dict_file, load_strict
from .registry import info as registry_info

__all__ = ["AestheticHead", "AestheticReward", "ClipSimilarityReward", "aesthetic", "clipscore", "pickscore", "hpsv2"]


def cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32, ``(B,)``."""
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


class BackboneReward(Reward):
    """A reward computed from one backbone's features (exposes ``backbones`` for sharing)."""

    backbone: Backbone

    @property
    def backbones(self) -> list[Backbone]:
        return [self.backbone]


# ---------------------------------------------------------------------------------------------
# LAION aesthetic predictor v2
# ---------------------------------------------------------------------------------------------
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" + AESTHETIC_HEAD_FILE
)
AESTHETIC_HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP (Schuhmann, 2022).

    ``layers`` = Linear(D,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64),
    Dropout(0.1), Linear(64,16), Linear(16,1): no activations, so at inference it is one affine map.
    """

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def _default_head_path() -> Path:
    root = Path(os.environ.get("VISALIGN_CACHE", Path.home() / ".cache" / "visalign"))
    return root / "laion-aesthetic-v2" / AESTHETIC_HEAD_FILE


def load_aesthetic_head(head: str | None, in_dim: int) -> AestheticHead:
    """Load the head strictly from ``head`` (a file, or ``hf-hub:<repo>/<file>``), or the default cache path."""
    if head is None:
        path = _default_head_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"the LAION aesthetic head is not at {str(path)!r}. Download {AESTHETIC_HEAD_FILE} from "
                f"{AESTHETIC_HEAD_URL} (Apache-2.0) to that path, or pass head=/path/to/{AESTHETIC_HEAD_FILE}."
            )
    elif head.startswith("hf-hub:"):
        repo, _, filename = head[len("hf-hub:"):].rpartition("/")
        path = Path(hub_download(repo, filename, "LAION aesthetic head"))
    else:
        path = Path(head)
    module = AestheticHead(in_dim)
    load_strict(module, load_state_dict_file(path), f"LAION aesthetic head {str(path)!r}")
    return module.eval().requires_grad_(False)


class AestheticReward(BackboneReward):
    """LAION aesthetic predictor v2: ``head(normalize(clip_image_embedding))``, ~1-10.

    Reference: Schuhmann, "improved-aesthetic-predictor" (2022); used as the reward in DDPO (Black
    et al. 2023) and Flow-GRPO.  Known hacks: centred subject, blurred background, over-saturation.
    """

    def __init__(self, backbone: Backbone, head: AestheticHead) -> None:
        self.info = registry_info("aesthetic")
        self.backbone = backbone
        self.head = head.to(backbone.device)

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        emb = self.backbone.image_features(images)["embeds"].float()  # (B, D)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return RewardOutput(self.head(emb).float())


def aesthetic(model: str = "ViT-L-14", pretrained: str = "openai", head: str | None = None,
              dtype: Any = None, device: Any = None, batch_size: int | None = None) -> AestheticReward:
    """LAION aesthetic v2 on open_clip ``model`` / ``pretrained`` (default OpenAI ViT-L/14)."""
    backbone = get_backbone("open_clip", model, pretrained, dtype=dtype, device=device, batch_size=batch_size)
    in_dim = int(backbone.model.visual.output_dim)
    return AestheticReward(backbone, load_aesthetic_head(head, in_dim))


# ---------------------------------------------------------------------------------------------
# image-text similarity rewards
# ---------------------------------------------------------------------------------------------
class ClipSimilarityReward(BackboneReward):
    """``scale * cos(image, text)`` (clamped at ``floor`` when given), with ``cos`` as a component.

    Args:
        name: registry name whose info this reward carries.
        backbone: a CLIP backbone.
        scale: a number, or ``"logit_scale"`` for the model's learned ``logit_scale.exp()`` (PickScore).
        floor: lower clamp of the cosine (CLIPScore uses 0); ``None`` for no clamp.
    """

    def __init__(self, name: str, backbone: Backbone, scale: float | str = 1.0, floor: float | None = None) -> None:
        self.info = registry_info(name)
        self.backbone = backbone
        self.scale = backbone.logit_scale if scale == "logit_scale" else float(scale)
        self.floor = floor

    def score(self, images, prompts: Sequence[str], references, metadata) -> RewardOutput:
        img = self.backbone.image_features(images)["embeds"]
        txt = self.backbone.text_features(prompts).to(img.device)
        cos = cosine(img, txt)  # (B,)
        clamped = cos if self.floor is None else cos.clamp(min=self.floor)
        return RewardOutput(self.scale * clamped, components={"cos": cos.detach()})


def _clip_backbone(model: str, pretrained: str | None, backend: str | None, processor: str | None,
                   dtype: Any, device: Any, batch_size: int | None, resize: str = "shortest_crop") -> Backbone:
    if backend is None:
        import open_clip

        backend = "open_clip" if model in open_clip.list_models() else "transformers"
    if backend == "open_clip":
        return get_backbone("open_clip", model, pretrained or "openai", resize=resize,
                            dtype=dtype, device=device, batch_size=batch_size)
    if backend == "transformers":
        return get_backbone("transformers-clip", model, processor, dtype=dtype, device=device, batch_size=batch_size)
    raise ValueError(f"backend={backend!r}: choose 'open_clip' or 'transformers' (or leave it out to infer it from model)")


def clipscore(model: str = "ViT-L-14", pretrained: str | None = "openai", scale: float = 100.0,
              backend: str | None = None, processor: str | None = None,
              dtype: Any = None, device: Any = None, batch_size: int | None = None) -> ClipSimilarityReward:
    """CLIPScore ``scale * max(cos, 0)``: 100 as in torchmetrics, 2.5 as in Hessel et al. (2021).

    ``model`` is an open_clip architecture (with ``pretrained`` tag or file) or a transformers
    CLIP hub id / folder (``backend`` is inferred from which it is).
    """
    backbone = _clip_backbone(model, pretrained, backend, processor, dtype, device, batch_size)
    return ClipSimilarityReward("clipscore", backbone, scale=scale, floor=0.0)


def pickscore(model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
              dtype: Any = None, device: Any = None, batch_size: int | None = None) -> ClipSimilarityReward:
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, text)``, ~18-24."""
    backbone = get_backbone("transformers-clip", model, processor, dtype=dtype, device=device, batch_size=batch_size)
    return ClipSimilarityReward("pickscore", backbone, scale="logit_scale")


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hpsv2(version: str = "v2.1", checkpoint: str | None = None, model: str = "ViT-H-14",
          dtype: Any = None, device: Any = None, batch_size: int | None = None) -> ClipSimilarityReward:
    """HPSv2 / v2.1 (Wu et al. 2023): cosine of open_clip ViT-H/14 embeddings, letterboxed input.

    ``checkpoint`` is a local file (its ``"state_dict"`` is the full CLIP model); by default the
    file of ``version`` from hub repo ``xswu/HPSv2``.  v2.0 and v2.1 scores are not comparable.
    """
    if version not in HPS_FILES:
        raise ValueError(f"hpsv2 version={version!r}: choose one of {sorted(HPS_FILES)}")
    checkpoint = checkpoint or hub_download("xswu/HPSv2", HPS_FILES[version], f"HPSv2 {version}")
    backbone = get_backbone("open_clip", model, checkpoint, resize="letterbox",
                            dtype=dtype, device=device, batch_size=batch_size)
    return ClipSimilarityReward("hpsv2", backbone, scale=1.0)
