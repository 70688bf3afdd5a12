"""DINOv2 similarity against features computed with transformers' own processor and model."""

import pytest
import torch
from PIL import Image

from visalign import rewards as R


def _reference_features(folder, images, pooling):
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    pils = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        out = model(pixel_values=proc(images=pils, return_tensors="pt")["pixel_values"])
    return out.pooler_output if pooling == "cls" else out.last_hidden_state[:, 1:].mean(1)


@pytest.mark.parametrize("pooling", ["cls", "patch_mean"])
def test_matches_transformers_pipeline(tiny_dinov2, images, pooling):
    refs = images.roll(1, 0)
    feats = _reference_features(tiny_dinov2, torch.cat([images, refs]), pooling)
    expected = torch.nn.functional.cosine_similarity(feats[:4], feats[4:])
    out = R.load("dino", model=str(tiny_dinov2), pooling=pooling)(images, references=refs)
    assert torch.allclose(out.scores, expected, atol=5e-4)


def test_reference_layouts(tiny_dinov2, images):
    reward = R.load("dino", model=str(tiny_dinov2))
    assert torch.allclose(reward(images, references=images).scores, torch.ones(4), atol=1e-5)  # self-similarity
    one = reward(images, references=images[0]).scores  # (3, H, W): one reference for all
    assert one[0] == pytest.approx(1.0, abs=1e-5) and (one[1:] < 1 - 1e-4).all()
    assert torch.allclose(reward(images, references=images[:1]).scores, one)
    both = reward(images, references=torch.stack([images, images.roll(1, 0)], dim=1))  # (B, 2, 3, H, W)
    per = [reward(images, references=images).scores, reward(images, references=images.roll(1, 0)).scores]
    assert torch.allclose(both.scores, (per[0] + per[1]) / 2, atol=1e-6)
    assert torch.allclose(both.components["min_over_refs"], torch.minimum(*per), atol=1e-6)
    with pytest.raises(ValueError, match="references"):
        reward(images, references=images[:3])
    with pytest.raises(ValueError, match="references"):
        reward(images)
    with pytest.raises(ValueError, match="pooling"):
        R.load("dino", model=str(tiny_dinov2), pooling="max")
