"""Algorithm registry: a name -> (its config class, its trainer class), kept as data.

Entries are ``"module:Class"`` strings imported on first use (like the reward registry), so
listing algorithms imports no trainer.  Recipes name an algorithm (``algorithm: grpo``) and give
its settings under a section of the same name; the CLI and :func:`visalign.trainers.build_trainer`
look it up here.  Register a new algorithm with :func:`register` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from visalign.registry import Registry, resolve

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
        return resolve(target)

    @property
    def config_class(self) -> type:
        return self._resolve(self.config_target)

    @property
    def trainer_class(self) -> type:
        return self._resolve(self.trainer_target)


_REGISTRY = Registry("algorithm")


def register(name: str, config: str, trainer: str, description: str = "") -> None:
    """Register ``name`` with absolute ``"module:ConfigClass"`` and ``"module:TrainerClass"`` targets."""
    _REGISTRY.register(name, Algorithm(name, config, trainer, description))


def available() -> list[Algorithm]:
    return [_REGISTRY.get(k) for k in _REGISTRY.available()]


def get(name: str) -> Algorithm:
    """The registered algorithm ``name``; an unknown name is an error that suggests the nearest."""
    return _REGISTRY.get(name)


register("grpo", "visalign.trainers.grpo.config:GRPOConfig", "visalign.trainers.grpo.trainer:GRPOTrainer",
         "Flow-GRPO (flow models) / DDPO (eps, v models): clipped policy gradient on SDE rollouts")
register("nft", "visalign.trainers.nft.config:NFTConfig", "visalign.trainers.nft.trainer:NFTTrainer",
         "DiffusionNFT: advantage-weighted flow matching on ODE rollouts (flow models)")
register("backprop", "visalign.trainers.backprop.config:RewardBackpropConfig",
         "visalign.trainers.backprop.trainer:RewardBackpropTrainer",
         "reward back-propagation: DRaFT-K, DRaFT-LV, AlignProp, ReFL (differentiable rewards, every family)")
register("dpo", "visalign.trainers.dpo.config:DPOConfig", "visalign.trainers.dpo.trainer:DPOTrainer",
         "Diffusion-DPO / Flow-DPO: preference pairs offline (Pick-a-Pic, a JSONL folder) or reward-ranked online")
