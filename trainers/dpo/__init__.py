"""Diffusion-DPO / Flow-DPO (``algorithm: dpo``): offline from preference pairs, online from rewards."""

from .config import DEFAULT_BETA, DPOConfig
from .trainer import DPOTrainer, dpo_loss

__all__ = ["DPOConfig", "DPOTrainer", "DEFAULT_BETA", "dpo_loss"]
