"""Hacking guards every trainer gets through the trainer floor.

- **Gated KL** (GARDO; docs/reward_training.md, "Guards in the trainers"): the KL /
  anchor term of an update applies only to the samples whose reward uncertainty is high, at or
  above the ``kl_gate_quantile`` of the batch; a confident reward is followed freely, an uncertain
  one is held near the reference.  The uncertainty is the trained reward's ``uncertainty``
  component (a head ensemble's standard deviation, ``visalign rewards train``).
- **Adaptive reference** (GARDO; online DPO): every ``reference_refresh_every`` iterations the
  reference becomes the current policy (``Sampler.refresh_reference``), so the KL restrains the
  next stretch of drift instead of pinning the model to the base forever.
- **Held-out alarm**: at every evaluation, for each evaluation reward that is not trained on, the
  run tracks its peak; when it has fallen more than ``alarm_tolerance`` below that peak while a
  trained reward has risen more than ``alarm_tolerance`` since then, the row carries
  ``alarm/hacking = 1`` (and the drop per held-out reward), and the run says so.

Reward-side guards (a reward minus ``kappa`` times its uncertainty, a diversity bonus within a
group) are rewards themselves (``visalign.rewards``), named in a recipe like any reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["GuardSettings", "uncertainty_of", "kl_gate", "HackingAlarm"]


@dataclass
class GuardSettings:
    """The ``guards:`` section of a recipe."""

    #: GARDO's gated KL: the KL / anchor term applies only to samples whose reward uncertainty is at
    #: or above this quantile of the batch (0.5: the uncertain half); null = every sample
    kl_gate_quantile: float | None = None
    #: the reward component that holds the uncertainty (a head ensemble's std); with several trained
    #: rewards their "<name>/uncertainty" components are summed
    uncertainty_component: str = "uncertainty"
    #: make the current policy the reference every N iterations (GARDO's adaptive reference); 0 = never
    reference_refresh_every: int = 0
    #: the held-out alarm's margin (in each reward's own units)
    alarm_tolerance: float = 0.01

    def __post_init__(self) -> None:
        q = self.kl_gate_quantile
        if q is not None and not 0.0 <= q < 1.0:
            raise ValueError(f"guards.kl_gate_quantile must be in [0, 1) or null, got {q}")
        if self.reference_refresh_every < 0:
            raise ValueError(f"guards.reference_refresh_every must be >= 0, got {self.reference_refresh_every}")
        if self.alarm_tolerance < 0:
            raise ValueError(f"guards.alarm_tolerance must be >= 0, got {self.alarm_tolerance}")


def uncertainty_of(components: Mapping[str, torch.Tensor], name: str = "uncertainty") -> torch.Tensor | None:
    """The per-sample uncertainty among a reward output's components: ``name`` itself, or the sum of
    every ``"<reward>/<name>"`` of a combined reward; ``None`` when no reward reports one."""
    if name in components:
        return components[name].detach().float()
    parts = [v.detach().float() for k, v in components.items() if k.endswith("/" + name)]
    return torch.stack(parts).sum(0) if parts else None


def kl_gate(uncertainty: torch.Tensor | None, quantile: float | None) -> torch.Tensor | None:
    """``(B,)`` weights of the KL term: 1 where ``uncertainty >= quantile_q(uncertainty)`` over the
    finite entries, else 0; ``None`` (every sample, weight 1) without a quantile or an uncertainty."""
    if quantile is None or uncertainty is None:
        return None
    u = uncertainty.detach().float().cpu()
    finite = torch.isfinite(u)
    if not finite.any():
        return torch.ones_like(u)
    threshold = torch.quantile(u[finite], float(quantile))
    return ((u >= threshold) | ~finite).float()  # an unjudgeable sample stays restrained


class HackingAlarm:
    """The held-out alarm (see the module docstring).  ``trained``: the names of the rewards the run
    trains on; every other ``eval/<name>`` reward is held out."""

    def __init__(self, trained: Sequence[str], tolerance: float = 0.01) -> None:
        self.trained = list(trained)
        self.tolerance = float(tolerance)
        self.peaks: dict[str, tuple[float, dict[str, float]]] = {}  # held-out -> (peak, trained values then)

    def update(self, metrics: Mapping[str, float], eval_rewards: Sequence[str]) -> dict[str, float]:
        """Alarm metrics for this evaluation's ``metrics`` (``eval/<reward>`` keys)."""
        trained = {t: metrics.get(f"eval/{t}") for t in self.trained}
        trained = {t: v for t, v in trained.items() if v is not None and math.isfinite(v)}
        if not trained:
            return {}
        out: dict[str, float] = {}
        ring = False
        for h in eval_rewards:
            if h in self.trained:
                continue
            value = metrics.get(f"eval/{h}")
            if value is None or not math.isfinite(value):
                continue
            peak, then = self.peaks.get(h, (float("-inf"), {}))
            if value >= peak:
                self.peaks[h] = (value, dict(trained))
                out[f"alarm/{h}/below_peak"] = 0.0
                continue
            drop = peak - value
            out[f"alarm/{h}/below_peak"] = drop
            rose = any(trained[t] - then.get(t, trained[t]) > self.tolerance for t in trained)
            ring |= drop > self.tolerance and rose
        out["alarm/hacking"] = float(ring)
        return out

    def state_dict(self) -> dict:
        return {"peaks": {h: [p, dict(t)] for h, (p, t) in self.peaks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.peaks = {h: (float(p), {k: float(v) for k, v in t.items()}) for h, (p, t) in state["peaks"].items()}
