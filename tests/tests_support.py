"""Small helpers shared by several test modules (on sys.path through tests/conftest.py)."""

import torch  # noqa: F401

from visalign.rewards import Reward, RewardInfo, RewardOutput


class Brightness(Reward):
    """Mean pixel value: a cheap reward that a policy can move in a few iterations."""

    info = RewardInfo("brightness", inputs=("images",), native_range=(0.0, 1.0), differentiable=True)

    def __init__(self, nan_every: int = 0):
        self.nan_every = nan_every
        self.calls = 0

    def score(self, images, prompts, references, metadata):
        self.calls += 1
        s = images.float().flatten(1).mean(1)
        if self.nan_every:
            s = s.clone()
            s[:: self.nan_every] = float("nan")
        return RewardOutput(s, components={"bright": s.detach()})


class MetadataRecorder(Reward):
    """Scores 0 and records the ``metadata`` argument that reached ``score`` (contract tests)."""

    info = RewardInfo("recorder")

    def __init__(self):
        self.seen = []

    def score(self, images, prompts, references, metadata):
        self.seen.append(metadata)
        return RewardOutput(images.new_zeros(images.shape[0]))
