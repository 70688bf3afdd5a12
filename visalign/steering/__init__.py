"""Inference-time steering (docs/steering.md): improve a model's samples against a reward without
training it.

- :func:`best_of_n`: N samples per prompt, the best by a reward;
- :func:`fk_steer`: Feynman-Kac particle steering (potentials, resampling, final correction);
- :class:`RewardGuidance` / :func:`guided`: reward-gradient guidance as a denoiser wrapper (also
  FK's proposal: ``fk_steer(..., proposal=GuidanceConfig(...))``);
- :func:`noise_search`: zero-order search over initial noises;
- :func:`steer`: any of them from one :class:`SteerConfig` (what ``visalign steer`` runs).

Every method has one signature, ``run_*(sampler, reward, config, call, **extras) -> SteerResult``
(:func:`run_best_of_n`, :func:`run_fk`, :func:`run_guidance`, :func:`run_search`): ``config`` is
the method's own settings and ``call`` a :class:`SteerCall`, the settings all methods share
(prompts, particles, steps, guidance scale, kernel, seed, batching), resolved once by
:meth:`SteerCall.resolve`.  The functions above are that plus the resolution.

Steering is a peer of :mod:`visalign.trainers`, not a trainer: it stands on the samplers and the
rewards only (docs/architecture.md).
"""

from __future__ import annotations

from . import resampling
from .best_of_n import best_of_n, run_best_of_n
from .common import SteerCall, Steered, SteerResult
from .fk import FKConfig, FKHook, fk_steer, run_fk
from .guidance import GuidanceConfig, RewardGuidance, guided, run_guidance
from .search import SearchConfig, noise_search, run_search

__all__ = ["best_of_n", "fk_steer", "FKConfig", "FKHook", "GuidanceConfig", "RewardGuidance", "guided",
           "noise_search", "SearchConfig", "Steered", "SteerResult", "SteerCall", "run_best_of_n", "run_fk",
           "run_guidance", "run_search", "SteerConfig", "steer", "METHODS", "resampling"]


def __getattr__(name: str):
    if name in ("SteerConfig", "steer", "METHODS"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'visalign.steering' has no attribute {name!r}")
