"""Training algorithms (imported as ``visalign.trainers``); inference-time steering is
:mod:`visalign.steering`.

Heavy modules load on first use: ``from visalign.trainers import GRPOTrainer`` imports torch and
accelerate, not the reward models.  Algorithms are registered by name in
:mod:`visalign.trainers.registry`; every trainer stands on :class:`Trainer` (``trainers/base.py``).
"""

from __future__ import annotations

__all__ = ["Trainer", "OptimConfig", "TrainingStopped", "GRPOConfig", "GRPOTrainer", "NFTConfig", "NFTTrainer",
           "RewardBackpropConfig", "RewardBackpropTrainer", "DPOConfig", "DPOTrainer",
           "RunSettings", "LoraSettings", "TrainRecipe", "build_trainer", "load_recipe", "registry"]

_LAZY = {
    "Trainer": ".base",
    "OptimConfig": ".base",
    "TrainingStopped": ".base",
    "GRPOConfig": ".grpo.config",
    "GRPOTrainer": ".grpo.trainer",
    "NFTConfig": ".nft.config",
    "NFTTrainer": ".nft.trainer",
    "RewardBackpropConfig": ".backprop.config",
    "RewardBackpropTrainer": ".backprop.trainer",
    "DPOConfig": ".dpo.config",
    "DPOTrainer": ".dpo.trainer",
    "RunSettings": ".common.run",
    "LoraSettings": ".common.lora",
    "TrainRecipe": ".recipe",
    "build_trainer": ".recipe",
    "load_recipe": ".recipe",
}


def __getattr__(name: str):
    import importlib

    if name == "registry":
        return importlib.import_module(".registry", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'visalign.trainers' has no attribute {name!r}")
