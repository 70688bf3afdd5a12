"""Exponential moving average of trainable weights (Flow-GRPO keeps an EMA of the LoRA weights)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


class EMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run with the EMA weights in place of the live ones (for evaluation and saving)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
