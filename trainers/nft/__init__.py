"""DiffusionNFT (Zheng et al. 2025): likelihood-free online RL on the forward process."""

from .config import NFTConfig
from .trainer import NFTTrainer

__all__ = ["NFTConfig", "NFTTrainer"]
