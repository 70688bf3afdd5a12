"""Video wrappers: image rewards on sampled frames, and VBench-style temporal consistency."""

import pytest
import torch

from visalign import rewards as R
from visalign.rewards.video import frame_indices


def _video(images):
    return torch.stack([images, images.flip(-1), images.roll(5, -1), images.flip(-2)], dim=1)  # (4, 4, 3, H, W)


def test_frame_indices():
    assert frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert frame_indices(3, None).tolist() == [0, 1, 2] and frame_indices(3, 8).tolist() == [0, 1, 2]


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_frames_reduce(reduce):
    video = _video(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    inner = R.load("jpeg_incompressibility")
    wrapped = R.video_frames(inner, frames=3, reduce=reduce)
    out = wrapped(video)  # frames 0, 2, 3 (round(1.5) = 2)
    per = torch.stack([inner(video[:, i]).scores for i in (0, 2, 3)], dim=1)
    assert torch.allclose(out.scores, per.mean(1) if reduce == "mean" else per.min(1).values)
    assert wrapped.info.modality == "video"
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        R.video_frames(inner)(video[:, 0])


def test_frames_with_prompts(tiny_open_clip, images, prompts):
    kw = dict(model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))
    video = _video(images)
    out = R.load("video_frames", reward="clipscore", frames=2, reduce="min", **kw)(video, prompts)
    inner = R.load("clipscore", **kw)
    per = torch.stack([inner(video[:, i], prompts).scores for i in (0, 3)], dim=1)
    assert torch.allclose(out.scores, per.min(1).values, atol=1e-5)


def test_temporal_consistency_formula(tiny_dinov2, images):
    reward = R.load("temporal_consistency", model=str(tiny_dinov2))
    static = images[:, None].expand(4, 3, 3, 40, 48)
    assert torch.allclose(reward(static).scores, torch.ones(4), atol=1e-5)
    video = _video(images)
    out = reward(video)
    feats = torch.nn.functional.normalize(
        R.load("dino", model=str(tiny_dinov2)).backbone.image_features(video.flatten(0, 1))["cls"], dim=-1).view(4, 4, -1)
    sims_prev = torch.stack([(feats[:, i] * feats[:, i - 1]).sum(-1) for i in range(1, 4)], 1)
    sims_first = torch.stack([(feats[:, i] * feats[:, 0]).sum(-1) for i in range(1, 4)], 1)
    expected = ((sims_prev.clamp_min(0) + sims_first.clamp_min(0)) / 2).mean(1)
    assert torch.allclose(out.scores, expected, atol=1e-5)
    assert torch.allclose(out.components["adjacent"], sims_prev.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="videos"):
        reward(images)


def test_temporal_consistency_clip(tiny_open_clip, images):
    reward = R.load("temporal_consistency", backbone="clip", model=tiny_open_clip.arch,
                    pretrained=str(tiny_open_clip.weights))
    assert torch.allclose(reward(images[:, None].expand(4, 2, 3, 40, 48)).scores, torch.ones(4), atol=1e-5)
