"""Training and steering algorithms (imported as ``visalign.trainers``).

Heavy modules load on first use: ``from visalign.trainers import GRPOTrainer`` imports torch and
accelerate, not the reward models.
"""

from __future__ import annotations

__all__ = ["GRPOConfig", "GRPOTrainer", "RunSettings", "LoraSettings", "TrainRecipe", "build_trainer", "load_recipe"]

_LAZY = {
    "GRPOConfig": ".grpo.config",
    "GRPOTrainer": ".grpo.trainer",
    "RunSettings": ".common.run",
    "LoraSettings": ".common.lora",
    "TrainRecipe": ".recipe",
    "build_trainer": ".recipe",
    "load_recipe": ".recipe",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'visalign.trainers' has no attribute {name!r}")
