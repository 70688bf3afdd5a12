"""JPEG (in)compressibility rewards (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning" (DDPO), Sec. 6.1): the size of the image saved as JPEG at quality 95.

``jpeg_compressibility`` = ``-size_kB`` (smaller files are better), ``jpeg_incompressibility`` =
``+size_kB``; kB = 1000 bytes, as in the reference code.  Images are quantised to uint8 first, so
there is no gradient.
"""

from __future__ import annotations

import io

import torch

from .base import Reward, RewardOutput
from .registry import info as registry_info

__all__ = ["JpegSize", "jpeg_size_kb", "jpeg_compressibility", "jpeg_incompressibility"]


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``(B,)`` float32: size in kB (1000 bytes) of each ``(3, H, W)`` image in [0, 1] saved as JPEG."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize(Reward):
    """``sign * size_kB`` with ``size_kB`` as a component."""

    def __init__(self, name: str, sign: float, quality: int = 95) -> None:
        if not 1 <= quality <= 95:
            raise ValueError(f"{name}: quality={quality} must be in [1, 95] (PIL's useful range)")
        self.info = registry_info(name)
        self.sign, self.quality = sign, quality

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 4:
            raise ValueError(f"reward {self.info.name!r} scores images (B,3,H,W); wrap it with video_frames() for video")
        size = jpeg_size_kb(images, self.quality)
        return RewardOutput(self.sign * size, components={"size_kb": size})


def jpeg_compressibility(quality: int = 95) -> JpegSize:
    return JpegSize("jpeg_compressibility", -1.0, quality)


def jpeg_incompressibility(quality: int = 95) -> JpegSize:
    return JpegSize("jpeg_incompressibility", 1.0, quality)
