"""Contract tests shared by every reward of the CLIP-family zoo, on tiny random weights."""

import pytest
import torch

from visalign import rewards as R

# The modules of this zoo; rewards registered from other modules (VLMs, ImageReward, the toy
# world's shapes verifier) are tested in their own files.
MODULES = {"clip_rewards", "artifact", "dino", "jpeg", "video"}
NAMES = ["aesthetic", "artifact", "clipscore", "dino", "hpsv2", "jpeg_compressibility", "jpeg_incompressibility",
         "pickscore", "temporal_consistency", "video_frames"]


def test_every_reward_of_these_modules_is_covered():
    from visalign.rewards.registry import _REGISTRY

    ours = {name for name, entry in _REGISTRY.items() if entry.target.partition(":")[0] in MODULES}
    assert ours == set(NAMES)


def _inputs(name, images, is_video, prompts):
    x = images
    if is_video:
        x = torch.stack([images, images.flip(-1), images.roll(3, -2)], dim=1)[:2]  # (2, 3, 3, H, W)
    b = x.shape[0]
    refs = images[:b].flip(0) if "references" in R.info(name).inputs else None
    return x, prompts[:b], refs


@pytest.mark.parametrize("name", NAMES)
def test_contract(name, tiny_rewards, images, prompts):
    factory, is_video = tiny_rewards[name]
    reward = factory()
    x, prompts, refs = _inputs(name, images, is_video, prompts)
    out = reward(x, prompts, references=refs)
    assert out.scores.shape == (x.shape[0],) and out.scores.dtype == torch.float32
    assert out.valid.dtype == torch.bool and out.valid.all()
    assert torch.isfinite(out.scores).all()
    lo, hi = reward.info.native_range
    if name not in ("aesthetic", "pickscore", "hpsv2", "jpeg_compressibility", "jpeg_incompressibility"):
        # ranges of learned heads hold for trained weights only; these are formula-bounded
        assert (out.scores >= lo - 1e-5).all() and (out.scores <= hi + 1e-5).all(), out.scores
    for key, value in out.components.items():
        assert value.shape == (x.shape[0],), key


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_pixels(name, tiny_rewards, images, prompts):
    factory, is_video = tiny_rewards[name]
    reward = factory()
    if not reward.info.differentiable:
        pytest.skip(f"{name} is not differentiable by its info")
    x, prompts, refs = _inputs(name, images, is_video, prompts)
    x = x.clone().requires_grad_(True)
    reward(x, prompts, references=refs).scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_prompts_required(tiny_rewards, images):
    reward = tiny_rewards["clipscore"][0]()
    with pytest.raises(ValueError, match="needs prompts"):
        reward(images)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, visalign.rewards; print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_catalog_table_lists_facts():
    table = R.catalog_table()
    lines = table.splitlines()
    assert lines[0].startswith("| reward | inputs | range | differentiable | licence | weights |")
    row = next(line for line in lines if line.startswith("| hpsv2 |"))
    assert "images, prompts" in row and "| yes |" in row and "Apache-2.0" in row and "xswu/HPSv2" in row
    assert len(lines) == 2 + len(R.available())
