"""Category balancing and a resumable prompt sampler (prompt sources: :mod:`visalign.prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visalign.prompts import load_prompts

__all__ = ["load_prompts", "balance", "PromptSampler"]


def balance(records: list[dict], key: str = "tag") -> list[dict]:
    """Oversample so every value of ``metadata[key]`` (e.g. GenEval's category) has as many records
    as the largest: each category is then drawn equally often, as GenEval weighs them equally."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        value = (r.get("metadata") or {}).get(key)
        if value is None:
            raise ValueError(f"cannot balance prompts by {key!r}: a record has no metadata[{key!r}] ({r['prompt']!r})")
        groups.setdefault(str(value), []).append(r)
    most = max(len(g) for g in groups.values())
    return [g[i % len(g)] for name in sorted(groups) for g in [groups[name]] for i in range(most)]


@dataclass
class PromptSampler:
    """Draws prompts without replacement in seeded epochs; its state is two integers."""

    records: list[dict]
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.records), generator=g).tolist()

    def next(self, k: int) -> list[dict]:
        out: list[dict] = []
        order = self._order()
        while len(out) < k:
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                order = self._order()
            out.append(self.records[order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
