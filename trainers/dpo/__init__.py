"""Diffusion-DPO / Flow-DPO (``algorithm: dpo``): offline from preference pairs, online from rewards."""

from .config import DEFAULT_BETA, DPOConfig, DPOObjective, OfflineDPOConfig, OnlineDPOConfig
from .loss import LOSS_TYPES, dpo_loss
from .trainer import DPOTrainer, OfflineDPOTrainer, OnlineDPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "OfflineDPOConfig", "OnlineDPOConfig", "OfflineDPOTrainer", "OnlineDPOTrainer",
           "DPOObjective", "DEFAULT_BETA", "LOSS_TYPES", "dpo_loss"]
