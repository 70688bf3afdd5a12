"""Reward models and reward composition (imported as ``visalign.rewards``).

See docs/rewards.md for the contract (``rewards/base.py``) and the catalogue.
"""

from collections.abc import Mapping
from typing import Any

from . import catalog as _catalog  # noqa: F401  (registers built-ins; no model code)
from . import catalog_vlm as _catalog_vlm  # noqa: F401  (registers the VLM judges)
from .base import Reward, RewardInfo, RewardOutput, check_images, sample_metadata
from .catalog import catalog_table
from .compose import combine
from .preprocess import PreprocessSpec, preprocess, to_tensor
from .registry import available, info, parse_spec, register
from .registry import load as _load_one
from .video import video_frames

__all__ = ["Reward", "RewardInfo", "RewardOutput", "check_images", "sample_metadata", "available", "info", "load",
           "parse_spec", "register", "catalog_table", "combine", "PreprocessSpec", "preprocess", "to_tensor", "video_frames"]


def load(spec: str | Mapping[str, float], /, *, shared: Mapping[str, Any] | None = None, **options: Any) -> Reward:
    """Build a reward from a name, a spec string or a recipe's mapping of weights.

    Args:
        spec: ``"aesthetic"``, ``"clipscore:model=ViT-L-14"`` (options after the colon), or a mapping
            ``{spec: weight}`` as in a recipe's ``rewards:`` (the weighted sum, built with
            :func:`~visalign.rewards.combine`; its components are the specs).
        shared: options offered to every reward (a recipe's ``reward_options``: ``device``,
            ``dtype``...); each reward takes only those its factory accepts, and they override
            the spec's.
        options: options of the reward (override the spec's); with a mapping, given to every reward.

    Examples::

        visalign.rewards.load("aesthetic")
        visalign.rewards.load("clipscore:model=ViT-L-14", device="cuda")
        visalign.rewards.load({"aesthetic": 1.0, "pickscore": 0.5}, shared={"device": "cuda"})
    """
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("rewards: give at least one reward, e.g. {'aesthetic': 1.0}")
        return combine({s: float(w) for s, w in spec.items()}, shared=shared, **options)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("rewards: give at least one reward, e.g. {'aesthetic': 1.0}")
        return combine({s: float(w) for s, w in spec.items()}, shared=shared, **options)
    return _load_one(spec, shared=shared, **options)
