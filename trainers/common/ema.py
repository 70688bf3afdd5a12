"""Exponential moving average of trainable weights (Flow-GRPO keeps an EMA of the LoRA weights).

In a sharded run (FSDP2, ZeRO-3) each process keeps the average of the part of each weight it
holds: the average is elementwise, so the shards' averages are the average of the whole weights."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch

from .sharding import local


class EMA:
    """The average of ``params`` (``decay`` per update).  ``resync``, when given, is called before and
    after the average is swapped in: a sharded model drops the gathered copies of its weights there
    (``Trainer.resync_weights``), so the next forward gathers the weights just written."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.9,
                 resync: Callable[[], None] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.resync = resync
        self.shadow = [local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(local(p).detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Run with the EMA weights in place of the live ones (for evaluation and saving)."""
        backup = [local(p).detach().clone() for p in self.params]
        if self.resync is not None:
            self.resync()
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                local(p).copy_(s)
        try:
            yield
        finally:
            if self.resync is not None:
                self.resync()
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local(p).copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
