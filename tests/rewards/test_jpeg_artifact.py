"""JPEG (in)compressibility and the weight-free artifact detectors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visalign import rewards as R
from visalign.rewards.artifact import DETECTORS


def test_jpeg_size_equals_pil_file_size(images):
    out = R.load("jpeg_incompressibility")(images)
    for i in range(images.shape[0]):
        array = np.ascontiguousarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=95)
        assert out.scores[i].item() == pytest.approx(len(buf.getvalue()) / 1000)
    comp = R.load("jpeg_compressibility")(images)
    assert torch.equal(comp.scores, -out.scores) and torch.equal(comp.components["size_kb"], out.scores)


def test_jpeg_orders_flat_below_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32, generator=g)])
    s = R.load("jpeg_compressibility")(x).scores
    assert s[0] > s[1]


def _grid(period=4, size=64):
    i = torch.arange(size)
    lines = ((i % period) == 0).float()
    g = torch.maximum(lines[:, None], lines[None, :])  # a 1-px line grid
    return (0.3 + 0.5 * g).expand(3, size, size)


def test_detectors_fire_on_their_hack_and_not_on_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 64, 64, generator=g) * 0.5 + 0.25  # mid grey noise, no hack
    saturated = torch.zeros(3, 64, 64)
    saturated[0] = 1.0  # pure red
    blown = torch.ones(3, 64, 64)
    blank = torch.full((3, 64, 64), 0.1)
    x = torch.stack([noise, saturated, blown, _grid(), blank])
    c = {name: fn(x) for name, fn in DETECTORS.items()}
    assert c["oversaturation"][1] == pytest.approx(1.0, abs=1e-4) and c["oversaturation"][0] < 0.05
    assert c["clipped_exposure"][2] == pytest.approx(1.0) and c["clipped_exposure"][0] == 0
    assert c["periodic_grid"][3] > 0.5 and c["periodic_grid"][0] < 0.1
    assert c["flat_regions"][4] == pytest.approx(1.0) and c["flat_regions"][0] == 0
    assert c["low_entropy"][4] == pytest.approx(1.0) and c["low_entropy"][0] < 0.3
    for v in c.values():
        assert ((v >= 0) & (v <= 1 + 1e-6)).all()


def test_artifact_score_is_negative_weighted_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    out = R.load("artifact", periodic_grid=2.0, low_entropy=0)(x)
    assert "low_entropy" not in out.components
    w = {"oversaturation": 1, "clipped_exposure": 1, "periodic_grid": 2, "flat_regions": 1}
    expected = -sum(w[k] * out.components[k] for k in w) / 5
    assert torch.allclose(out.scores, expected)
    with pytest.raises(ValueError, match="choose from"):
        R.load("artifact", sharpness=1.0)
