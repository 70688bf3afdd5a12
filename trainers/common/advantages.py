"""Group-relative advantages (Flow-GRPO; Shao et al. 2024 "DeepSeekMath" GRPO) and DDPO's
per-prompt running statistics (Black et al. 2023)."""

from __future__ import annotations

from collections import defaultdict, deque

import torch

__all__ = ["group_advantages", "PerPromptStats"]

EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, *, std: str = "global", clip: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_i = (r_i - mean_group(r)) / (std + 1e-4)``, clamped to ``[-clip, clip]``.

    Args:
        rewards: ``(N,)`` with ``N = groups * group_size``, consecutive samples of one prompt.
        valid: ``(N,)`` bool; invalid samples are left out of every statistic and get A = 0.
        std: ``"group"`` (per-group std) or ``"global"`` (std over the whole batch, Flow-GRPO).
    Returns:
        ``(advantages (N,), keep (N,) bool)``: ``keep`` is False for invalid samples and for every
        sample of a group whose valid rewards are all equal (no signal) or that has < 2 valid samples.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().float().view(-1, group_size)
    v = valid.view(-1, group_size) & torch.isfinite(r)
    r0 = torch.where(v, r, torch.zeros_like(r))
    n = v.sum(1, keepdim=True).clamp_min(1)
    mean = r0.sum(1, keepdim=True) / n
    centred = torch.where(v, r - mean, torch.zeros_like(r))
    group_var = (centred**2).sum(1, keepdim=True) / n
    if std == "group":
        denom = group_var.sqrt()
    elif std == "global":
        all_r = r[v]
        denom = (all_r.std(unbiased=False) if all_r.numel() > 1 else torch.tensor(0.0)).expand_as(mean)
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    adv = (centred / (denom + EPS)).clamp(-clip, clip)
    informative = (v.sum(1, keepdim=True) >= 2) & (group_var > 1e-12)
    keep = v & informative
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.flatten(), keep.flatten()


class PerPromptStats:
    """DDPO's per-prompt running statistics over the last ``buffer`` rewards of each prompt."""

    def __init__(self, buffer: int = 16, min_count: int = 16) -> None:
        self.buffer = buffer
        self.min_count = min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer))

    def advantages(self, prompts: list[str], rewards: torch.Tensor, valid: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        r = rewards.detach().float()
        adv = torch.zeros_like(r)
        keep = valid.clone() & torch.isfinite(r)
        all_valid = r[keep]
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p and bool(keep[i])]
            self.history[p].extend(float(r[i]) for i in idx)
            hist = torch.tensor(list(self.history[p])) if len(self.history[p]) >= self.min_count else all_valid
            if hist.numel() < 2:
                continue
            mean, sd = hist.mean(), hist.std(unbiased=False)
            for i in idx:
                adv[i] = (r[i] - mean) / (sd + EPS)
        return adv.clamp(-clip, clip), keep

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        for k, v in state["history"].items():
            self.history[k].extend(v)
