"""Algorithm registry: a name -> (its config class, its trainer class), kept as data.

Entries are ``"module:Class"`` strings imported on first use (like the reward registry), so
listing algorithms imports no trainer.  Recipes name an algorithm (``algorithm: grpo``) and give
its settings under a section of the same name; the CLI and :func:`visalign.trainers.build_trainer`
look it up here.  Register a new algorithm with :func:`register` (docs/architecture.md).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

__all__ = ["Algorithm", "register", "get", "available"]


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm: its name, config and trainer classes and a one-line summary."""

    name: str
    config_target: str
    trainer_target: str
    description: str = ""

    @staticmethod
    def _resolve(target: str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def config_class(self) -> type:
        return self._resolve(self.config_target)

    @property
    def trainer_class(self) -> type:
        return self._resolve(self.trainer_target)


_REGISTRY: dict[str, Algorithm] = {}


def register(name: str, config: str, trainer: str, description: str = "") -> None:
    """Register ``name`` with ``"module:ConfigClass"`` and ``"module:TrainerClass"`` targets."""
    _REGISTRY[name] = Algorithm(name, config, trainer, description)


def available() -> list[Algorithm]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get(name: str) -> Algorithm:
    """The registered algorithm ``name``; an unknown name is an error that suggests the nearest."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


register("grpo", "visalign.trainers.grpo.config:GRPOConfig", "visalign.trainers.grpo.trainer:GRPOTrainer",
         "Flow-GRPO (flow models) / DDPO (eps, v models): clipped policy gradient on SDE rollouts")
register("nft", "visalign.trainers.nft.config:NFTConfig", "visalign.trainers.nft.trainer:NFTTrainer",
         "DiffusionNFT: advantage-weighted flow matching on ODE rollouts (flow models)")
register("backprop", "visalign.trainers.backprop.config:RewardBackpropConfig",
         "visalign.trainers.backprop.trainer:RewardBackpropTrainer",
         "reward back-propagation: DRaFT-K, DRaFT-LV, AlignProp, ReFL (differentiable rewards, every family)")
register("dpo", "visalign.trainers.dpo.config:DPOConfig", "visalign.trainers.dpo.trainer:DPOTrainer",
         "Diffusion-DPO / Flow-DPO: preference pairs offline (Pick-a-Pic, a JSONL folder) or reward-ranked online")
