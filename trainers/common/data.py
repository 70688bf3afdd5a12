"""Prompt sources and a resumable prompt sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["load_prompts", "balance", "PromptSampler"]


def load_prompts(spec: str) -> list[dict]:
    """Prompt records ``{"prompt": str, "metadata": dict | None}`` from a spec.

    - ``toy:train`` / ``toy:eval``: the shapes world's splits (with GenEval-style metadata);
    - a ``.txt`` file: one prompt per line;
    - a ``.jsonl`` file: rows with a ``prompt`` field; GenEval metadata rows (``tag``,
      ``include``) are kept as the record's metadata.
    """
    if spec.startswith("toy:"):
        from visalign.toy.prompts import split

        name = spec.split(":", 1)[1]
        return [{"prompt": m["prompt"], "metadata": dict(m)} for m in split(name)]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source {spec!r}: no such file (use toy:train, toy:eval, a .txt or a .jsonl file)")
    records = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{n}: each JSONL row needs a 'prompt' field")
            records.append({"prompt": str(row["prompt"]), "metadata": row if ("include" in row or "tag" in row) else None})
    else:
        records = [{"prompt": line.strip(), "metadata": None} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"prompt source {spec!r} holds no prompts")
    return records


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
