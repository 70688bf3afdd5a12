"""Reward back-propagation through the sampling chain: DRaFT-K, DRaFT-LV, AlignProp and ReFL."""

from .config import METHODS, RewardBackpropConfig
from .trainer import RewardBackpropTrainer, check_differentiable

__all__ = ["RewardBackpropConfig", "RewardBackpropTrainer", "METHODS", "check_differentiable"]
