"""Reward models and reward composition (imported as ``visalign.rewards``).

See docs/rewards.md for the contract (``rewards/base.py``) and the catalogue.
"""

from .base import Reward, RewardInfo, RewardOutput, check_images, sample_metadata
from .registry import available, info, load, parse_spec, register
from . import catalog as _catalog, catalog_vlm as _catalog_vlm  # noqa: F401  (registers built-ins; no model code)
from .catalog import catalog_table
from .compose import combine
from .preprocess import PreprocessSpec, preprocess, to_tensor
from .video import video_frames

__all__ = ["Reward", "RewardInfo", "RewardOutput", "check_images", "sample_metadata", "available", "info", "load",
           "parse_spec", "register", "catalog_table", "combine", "PreprocessSpec", "preprocess", "to_tensor", "video_frames"]
