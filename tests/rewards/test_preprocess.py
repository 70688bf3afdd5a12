"""The tensor preprocessing matches open_clip's and transformers' official pipelines on uint8 images."""

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    preprocess,
    to_tensor,
)

SIZES = [(40, 48), (37, 61), (64, 45), (32, 32)]


def _uint8_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 6 + 2, w // 6 + 2, generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (x[0] * 255).round().to(torch.uint8)  # (3, H, W)


def _pil(u8):
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


def check_close(ours, ref):
    # PIL resamples in 8-bit fixed point with an intermediate uint8 image: differences of about one
    # grey level (1/255 / std ~ 0.015 after normalisation) at some pixels, far less on average.
    diff = (ours - ref).abs()
    assert diff.max() < 0.035 and diff.mean() < 0.008, (diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("mode,resize", [("shortest", "shortest_crop"), ("longest", "letterbox"), ("squash", "squash")])
def test_matches_open_clip_transform(hw, mode, resize):
    from open_clip.transform import image_transform

    u8 = _uint8_image(*hw, seed=hw[0])
    ref = image_transform(32, is_train=False, resize_mode=mode)(_pil(u8))
    ours = preprocess(u8[None].float() / 255, PreprocessSpec(32, resize=resize))[0]
    assert ours.shape == ref.shape == (3, 32, 32)
    check_close(ours, ref)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_matches_transformers_clip_processor(hw, backend):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cls = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    proc = cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    u8 = _uint8_image(*hw, seed=hw[1])
    ref = torch.as_tensor(np.asarray(proc(images=[_pil(u8)], return_tensors="pt")["pixel_values"]))[0]
    ours = preprocess(u8[None].float() / 255, PreprocessSpec(32, crop_offset="floor"))[0]
    check_close(ours, ref)


@pytest.mark.parametrize("hw", SIZES)
def test_matches_bit_processor_with_resize_then_crop(hw):
    from transformers import BitImageProcessor

    proc = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                             image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    u8 = _uint8_image(*hw, seed=3)
    ref = proc(images=[_pil(u8)], return_tensors="pt")["pixel_values"][0]
    spec = PreprocessSpec(32, resize_to=40, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_offset="floor")
    check_close(preprocess(u8[None].float() / 255, spec)[0], ref)


def test_letterbox_geometry_and_zero_padding():
    x = torch.ones(1, 3, 20, 40)  # white, 1:2 -> 16 x 32 inside a 32 x 32 square, 8 rows of padding each side
    out = preprocess(x, PreprocessSpec(32, resize="letterbox"))[0]
    pad_value = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(out[:, :8].mean(dim=(1, 2)), pad_value, atol=1e-6)
    assert torch.allclose(out[:, 24:].mean(dim=(1, 2)), pad_value, atol=1e-6)
    assert torch.allclose(out[:, 8:24].mean(dim=(1, 2)), white, atol=1e-5)


def test_crop_offsets_differ_on_odd_margins():
    x = torch.arange(35, dtype=torch.float32).view(1, 1, 1, 35).expand(1, 3, 32, 35) / 34
    spec = dict(mean=(0, 0, 0), std=(1, 1, 1))
    rounded = preprocess(x, PreprocessSpec(32, **spec))  # margin 3 -> round(1.5) = 2 (torchvision)
    floored = preprocess(x, PreprocessSpec(32, crop_offset="floor", **spec))  # 3 // 2 = 1 (transformers)
    assert rounded[0, 0, 0, 0] * 34 == pytest.approx(2.0)
    assert floored[0, 0, 0, 0] * 34 == pytest.approx(1.0)


def test_gradient_and_dtype():
    x = torch.rand(2, 3, 40, 50, dtype=torch.float64, requires_grad=True)
    out = preprocess(x, PreprocessSpec(32))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(32, resize="crop")
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), PreprocessSpec(8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess(torch.zeros(3, 8, 8), PreprocessSpec(8))


def test_to_tensor_roundtrip():
    u8 = _uint8_image(12, 10, seed=5)
    x = to_tensor([_pil(u8), _pil(u8).convert("L").convert("RGB")])
    assert x.shape == (2, 3, 12, 10) and x.dtype == torch.float32
    assert torch.equal((x[0] * 255).round().to(torch.uint8), u8)
    with pytest.raises(ValueError, match="different sizes"):
        to_tensor([_pil(u8), _pil(_uint8_image(8, 8, 0))])
    assert to_tensor([_pil(u8), _pil(_uint8_image(8, 8, 0))], size=(12, 10)).shape == (2, 3, 12, 10)
