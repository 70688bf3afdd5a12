"""VQAScore on a tiny random LLaVA-1.5 (tiny CLIP vision + tiny Llama) loaded by the real loader."""

from __future__ import annotations

import pytest
import torch

from visalign.rewards.vlm import VQA_QUESTION, VQAScore
from visalign.rewards.vlm_backend import clip_style_pixels, load_backend
from visalign.rewards.vlm_testing import tiny_llava

PROMPTS = ["a red cat", "a blue square with a dog"]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return load_backend(str(tiny_llava(tmp_path_factory.mktemp("llava"))))


def test_family_and_image_tokens(backend):
    assert backend.family == "clip"
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inp = backend.inputs(x, [VQA_QUESTION.format(prompt=p) for p in PROMPTS])
    image_id = backend.tokenizer.convert_tokens_to_ids("<image>")
    assert ((inp["input_ids"] == image_id).sum(1) == (16 // 4) ** 2).all()  # CLS dropped ("default" strategy)
    assert inp["pixel_values"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("do_pad", [False, True])
def test_pixels_equal_processor(backend, do_pad):
    ip = backend.processor.image_processor
    ip.do_pad = do_pad
    try:
        g = torch.Generator().manual_seed(1)
        u8 = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)  # crop size: no resampling
        ref = ip(images=list(u8), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(clip_style_pixels(u8.float() / 255, ip), ref, atol=1e-5, rtol=0)
        # a 23x17 image: pad (mean colour) / resize shortest side / centre crop on the float path
        x = 0.25 + 0.5 * torch.rand(2, 3, 23, 17, generator=g)
        ref = ip(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
        if do_pad:  # the processor pads a float image with int(mean * 255) as the fill value: use uint8 grey levels
            x = (x * 255).round() / 255
            ref = ip(images=list((x * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
            diff = (clip_style_pixels(x, ip) - ref).abs()
            assert diff.max() < 2e-2 and diff.mean() < 6e-3  # uint8 fixed-point resampling, see test_vlm.py
        else:
            torch.testing.assert_close(clip_style_pixels(x, ip), ref, atol=1e-4, rtol=0)
    finally:
        ip.do_pad = False


def test_vqascore_equals_independent_softmax_and_has_gradient(backend):
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    x = (u8.float() / 255).requires_grad_(True)
    out = VQAScore(backend)(x, PROMPTS)
    ref = []
    for img, p in zip(u8, PROMPTS):
        text = backend.chat_texts([VQA_QUESTION.format(prompt=p)])
        enc = backend.processor(text=text, images=[img], return_tensors="pt")
        with torch.no_grad():
            ref.append(torch.softmax(backend.model(**enc).logits[0, -1].double(), -1))
    ref = torch.stack(ref)
    yes = backend.tokenizer.convert_tokens_to_ids("Yes")
    no = backend.tokenizer.convert_tokens_to_ids("No")
    torch.testing.assert_close(out.scores.detach().double(), ref[:, yes], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["p_no"].detach().double(), ref[:, no], atol=1e-5, rtol=1e-4)
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unsupported_processor_is_named():
    from transformers import LlavaNextImageProcessor

    class P:  # a processor holder with a LLaVA-NeXT image processor
        image_processor = LlavaNextImageProcessor()
        chat_template = "x"

    from visalign.rewards.vlm_backend import VLMBackend

    with pytest.raises(ValueError, match="anyres"):
        VLMBackend(model=None, processor=P())
