"""Differentiable image preprocessing for reward models.

Every reward takes images as a float tensor in ``[0, 1]`` (``(B, 3, H, W)``) and must bring them
to the size and normalisation its model was trained with.  Doing that with torch ops (not PIL,
not a Hugging Face processor) keeps the autograd graph from score to pixels, which reward
back-propagation (DRaFT, AlignProp, ReFL) needs.

On images that came from ``uint8`` the result matches the official pipelines closely (scores
agree to ~1e-3 relative; tested): open_clip's ``image_transform`` (torchvision ``Resize`` +
``CenterCrop``, or ``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad`` for the letterbox of
HPSv2), and transformers' ``CLIPImageProcessor`` / ``BitImageProcessor`` (DINOv2).  Torch's
antialiased bicubic is the same kernel as PIL's (a = -0.5, widened when downscaling); the small
residual difference is PIL's rounding to ``uint8`` after resizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessSpec",
    "preprocess",
    "to_tensor",
]

# OpenAI CLIP's dataset statistics (open_clip OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# ImageNet statistics (DINOv2, most timm models).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a reward model wants its pixels.

    Args:
        size (`int`): side of the square output.
        resize (`str`, *optional*, defaults to ``"shortest_crop"``): ``"shortest_crop"`` (shortest
            side to ``resize_to`` or ``size``, then centre crop; CLIP, DINOv2), ``"squash"`` (both
            sides to ``size``, aspect ratio lost) or ``"letterbox"`` (longest side to ``size``, zero
            pad the rest before normalisation; HPSv2).
        mean, std (`tuple[float, float, float]`): per-channel normalisation.
        interpolation (`str`, *optional*, defaults to ``"bicubic"``): ``"bicubic"`` or ``"bilinear"``.
        antialias (`bool`, *optional*, defaults to `True`): low-pass when downscaling, as PIL does.
        resize_to (`int`, *optional*): shortest side before the centre crop when it differs from
            ``size`` (DINOv2: 256 then crop 224).  Only for ``"shortest_crop"``.
        crop_offset (`str`, *optional*, defaults to ``"round"``): how an odd crop margin is split:
            ``"round"`` = torchvision / open_clip (``round(margin / 2)``, half to even), ``"floor"`` =
            transformers' image processors (``margin // 2``).
    """

    size: int
    resize: str = "shortest_crop"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    antialias: bool = True
    resize_to: int | None = None
    crop_offset: str = "round"

    def __post_init__(self) -> None:
        if self.resize not in _RESIZERS:
            raise ValueError(f"PreprocessSpec.resize={self.resize!r}: choose one of {sorted(_RESIZERS)}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"PreprocessSpec.interpolation={self.interpolation!r}: choose 'bicubic' or 'bilinear'")
        if self.crop_offset not in _CROP_OFFSETS:
            raise ValueError(f"PreprocessSpec.crop_offset={self.crop_offset!r}: choose one of {sorted(_CROP_OFFSETS)}")
        if self.size <= 0 or (self.resize_to is not None and self.resize_to < self.size):
            raise ValueError(
                f"PreprocessSpec: size must be positive and resize_to >= size; got size={self.size}, "
                f"resize_to={self.resize_to}"
            )


_CROP_OFFSETS: dict[str, Callable[[int], int]] = {
    "round": lambda margin: int(round(margin / 2.0)),  # torchvision.transforms.functional.center_crop
    "floor": lambda margin: margin // 2,  # transformers image_transforms.center_crop
}


def _resize(x: torch.Tensor, hw: tuple[int, int], spec: PreprocessSpec) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x  # PIL and torchvision skip a same-size resize; so do we
    out = F.interpolate(x, size=hw, mode=spec.interpolation, align_corners=False, antialias=spec.antialias)
    # PIL clamps the bicubic overshoot when it writes uint8; keep the same range.
    return out.clamp(0.0, 1.0)


def _centre_crop(x: torch.Tensor, size: int, spec: PreprocessSpec) -> torch.Tensor:
    h, w = x.shape[-2:]
    offset = _CROP_OFFSETS[spec.crop_offset]
    top, left = offset(h - size), offset(w - size)
    return x[..., top : top + size, left : left + size]


def _shortest_crop(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    h, w = x.shape[-2:]
    short_target = spec.resize_to or spec.size
    # torchvision Resize(int) / HF get_resize_output_image_size: the long side is truncated.
    if h <= w:
        hw = (short_target, int(short_target * w / h))
    else:
        hw = (int(short_target * h / w), short_target)
    x = _resize(x, hw, spec)
    if min(x.shape[-2:]) < spec.size:
        raise ValueError(f"image of size {h}x{w} is too small to crop {spec.size} after resizing to {hw}")
    return _centre_crop(x, spec.size, spec)


def _squash(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    return _resize(x, (spec.size, spec.size), spec)


def _letterbox(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    # open_clip ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=0) (HPSv2's ResizeMaxSize).
    h, w = x.shape[-2:]
    ratio = max(h / spec.size, w / spec.size)
    hw = (round(h / ratio), round(w / ratio))
    x = _resize(x, hw, spec)
    pad_h, pad_w = spec.size - hw[0], spec.size - hw[1]
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x


_RESIZERS: dict[str, Callable[[torch.Tensor, PreprocessSpec], torch.Tensor]] = {
    "shortest_crop": _shortest_crop,
    "squash": _squash,
    "letterbox": _letterbox,
}


def preprocess(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Resize, crop or pad, and normalise images for a model; differentiable.

    Args:
        images (`torch.Tensor`): ``(B, 3, H, W)`` floats in ``[0, 1]``.
        spec (`PreprocessSpec`): the model's preprocessing.

    Returns:
        `torch.Tensor`: ``(B, 3, size, size)`` float32, ``(x - mean) / std``.  The caller casts to
        the model's dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess takes (B, 3, H, W) images in [0, 1]; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"preprocess takes float images in [0, 1]; got {images.dtype}. Divide uint8 by 255.")
    x = images.float()  # resampling in float32 whatever the model's dtype
    x = _RESIZERS[spec.resize](x, spec)  # (B, 3, size, size)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_tensor(pil_images: Sequence["object"], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> ``(B, 3, H, W)`` float32 in ``[0, 1]`` (for the gallery edge, never in training).

    All images must share one size unless ``size=(H, W)`` is given, in which case each is resized
    with PIL bicubic first.  Any mode is converted to RGB.
    """
    import numpy as np
    from PIL import Image

    arrays = []
    for i, img in enumerate(pil_images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"to_tensor: item {i} is a {type(img).__name__}, not a PIL image")
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    if not arrays:
        raise ValueError("to_tensor: got no images")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"to_tensor: images have different sizes {sorted(s[:2] for s in shapes)}; pass size=(H, W) "
            "or score them one size at a time"
        )
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return batch.float().div_(255.0)
