"""Group-relative policy optimisation for diffusion and flow models (Flow-GRPO, DDPO)."""

from ..common.advantages import PerPromptStats, group_advantages
from .config import GRPOConfig
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "group_advantages", "PerPromptStats"]
