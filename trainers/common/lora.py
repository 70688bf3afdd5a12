"""LoRA settings of a training recipe; the LoRA machinery itself is :mod:`visalign.samplers.lora`
(family facts such as the default target modules live on each family adapter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visalign.samplers.lora import add_lora as _add_lora
from visalign.samplers.lora import load_lora, lora_state_dict, save_lora

__all__ = ["LoraSettings", "add_lora", "save_lora", "load_lora", "lora_state_dict"]


@dataclass
class LoraSettings:
    """LoRA hyperparameters (Flow-GRPO's SD3.5 defaults: r = 32, alpha = 64)."""

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    #: module name suffixes to adapt; None = the family default (``Sampler.lora_targets``)
    target_modules: list[str] | None = None
    #: "gaussian" (A ~ N(0, 1/r), B = 0) keeps the initial model exactly; peft's default is the same for B
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


def add_lora(sampler, settings: LoraSettings, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the denoiser and add trainable LoRA adapters as ``settings`` say."""
    return _add_lora(sampler, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                     target_modules=settings.target_modules, init=settings.init, adapter_name=adapter_name)
