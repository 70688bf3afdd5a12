"""Inference-time steering (docs/steering.md): improve a model's samples against a reward without
training it.

- :func:`best_of_n`: N samples per prompt, the best by a reward;
- :func:`fk_steer`: Feynman-Kac particle steering (potentials, resampling, final correction);
- :class:`RewardGuidance` / :func:`guided`: reward-gradient guidance as a denoiser wrapper (also
  FK's proposal: ``fk_steer(..., proposal=GuidanceConfig(...))``);
- :func:`noise_search`: zero-order search over initial noises;
- :func:`steer`: any of them from one :class:`SteerConfig` (what ``visalign steer`` runs).
"""

from __future__ import annotations

from . import resampling
from .best_of_n import best_of_n
from .common import Steered, SteerResult
from .fk import FKConfig, FKHook, fk_steer
from .guidance import GuidanceConfig, RewardGuidance, guided
from .search import SearchConfig, noise_search

__all__ = ["best_of_n", "fk_steer", "FKConfig", "FKHook", "GuidanceConfig", "RewardGuidance", "guided",
           "noise_search", "SearchConfig", "Steered", "SteerResult", "SteerConfig", "steer", "METHODS", "resampling"]


def __getattr__(name: str):
    if name in ("SteerConfig", "steer", "METHODS"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'visalign.steering' has no attribute {name!r}")
