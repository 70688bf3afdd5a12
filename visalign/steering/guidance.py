"""Reward-gradient guidance: a denoiser wrapper that adds the gradient of a differentiable reward of
the x0-prediction to the model's prediction (Bansal et al. 2023, "Universal Guidance for Diffusion
Models", forward guidance; the classifier-guidance form of Dhariwal & Nichol 2021, eq. 14).

The guidance term adds ``w_t * g`` to the score, ``g = grad_x r(decode(x0_hat(x_t)))``, so the
sampler targets (approximately) ``p_t(x) exp(w_t r(x0_hat(x)))``.  Written in each
parameterisation (docs/steering.md derives them):

- eps: ``eps' = eps - w_t sqrt(1 - ab_t) g`` (Universal Guidance eq. 6);
- v-prediction: ``v' = v - w_t sqrt(1 - ab_t) / sqrt(ab_t) g``;
- rectified flow (``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``): the score is
  ``-(x + (1 - s) v) / s``, so adding ``w g`` to it gives ``v' = v - w_t s / (1 - s) g``; the
  x0-prediction then moves by ``+w_t s^2 / (1 - s) g``, toward higher reward.  At ``s = 1`` the
  schedule's second noise level replaces ``s`` in ``1 - s`` (as Flow-GRPO's SDE does).

``w_t = scale * schedule(i)`` inside the window ``[start, end)`` of steps, 0 outside; ``g`` is
clipped to ``max_grad_norm`` (L2 per sample) when set.  With ``through_denoiser=True`` the gradient
flows through the network (Universal Guidance); ``False`` treats the prediction as a constant, so
only the decoder and the reward are differentiated (cheaper; the DPS-style shortcut).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .best_of_n import run_best_of_n
from .common import SteerCall, SteerResult

__all__ = ["GuidanceConfig", "RewardGuidance", "SCHEDULES", "guided", "run_guidance"]

#: name -> weight of step i of n (times the scale)
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda i, n: 1.0,
    "increasing": lambda i, n: (i + 1) / n,
    "decreasing": lambda i, n: 1.0 - i / n,
}


@dataclass
class GuidanceConfig:
    """Reward-gradient guidance settings (``reward_guidance:`` in a steering recipe)."""

    #: w: strength of the reward term added to the score (0 = unguided)
    scale: float = 1.0
    #: how w varies over the steps: constant, increasing ((i+1)/N) or decreasing (1 - i/N)
    schedule: str = "constant"
    #: guided steps: [start, end) (end None = to the last step)
    start: int = 0
    end: int | None = None
    #: clip the L2 norm of each sample's gradient to this (None = no clipping)
    max_grad_norm: float | None = None
    #: differentiate through the denoiser (Universal Guidance) or treat its prediction as constant
    through_denoiser: bool = True
    #: samples per gradient computation (None = the whole batch); bounds memory for video
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"reward_guidance.schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f"reward_guidance: the window [start, end) = [{self.start}, {self.end}) is empty; "
                             "set end > start or end: null")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"reward_guidance.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"reward_guidance.chunk_size must be >= 1 or null, got {self.chunk_size}")


class RewardGuidance:
    """Wrap a denoiser so that its prediction carries the reward-gradient term (module docstring).

    Args:
        denoiser (`Callable`): the base denoiser ``denoiser(x, i, schedule, cond)`` (e.g. CFG).
        sampler (`Sampler`): decodes the x0-prediction into images for the reward.
        reward (`Callable`): a differentiable reward ``reward(images, prompts) -> RewardOutput``.
        config (`GuidanceConfig`): scale, schedule, window, clipping.

    The term is computed under its own ``torch.enable_grad()`` (a gradient is what guidance is) and
    enters the returned prediction as a constant.  :attr:`grad_calls` counts the samples whose
    gradient went through the denoiser; :attr:`reward_calls` the images the reward scored.
    :attr:`last` keeps ``(i, x, base prediction)`` of the latest call, which FK steering needs to
    weight guided proposals by the base transition (``fk.py``).
    """

    def __init__(self, denoiser: Callable, sampler, reward: Callable, config: GuidanceConfig | None = None) -> None:
        self.denoiser = denoiser
        self.sampler = sampler
        self.reward = reward
        self.config = config or GuidanceConfig()
        self.grad_calls = 0
        self.reward_calls = 0
        self.last: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def weight(self, i: int, num_steps: int) -> float:
        c = self.config
        end = num_steps if c.end is None else min(c.end, num_steps)
        if not c.start <= i < end or c.scale == 0:
            return 0.0
        return float(c.scale) * SCHEDULES[c.schedule](i, num_steps)

    def score_factor(self, schedule, i: int, like: torch.Tensor) -> torch.Tensor:
        """How much of ``g`` to subtract from the prediction to add ``g`` to the score."""
        if schedule.parameterization == "flow":
            s = schedule.sigma(i, like)
            s_den = torch.where(s >= 1.0, schedule.sigma(1, like), s)
            return s / (1 - s_den)
        ab = schedule.alpha_cumprod(i, like)
        if schedule.parameterization == "eps":
            return (1 - ab).sqrt()
        return (1 - ab).sqrt() / ab.sqrt()

    def gradient(self, x: torch.Tensor, i: int, schedule, cond, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base prediction, g)`` for the rows ``rows`` of the batch."""
        from visalign.samplers.kernels import predict_x0

        xc = x[rows].detach().float().requires_grad_(True)
        c = cond[rows]
        with torch.enable_grad():
            if self.config.through_denoiser:
                pred = self.denoiser(xc, i, schedule, c)
                self.grad_calls += xc.shape[0]
                x0 = predict_x0(pred, xc, schedule, i)
            else:
                with torch.no_grad():
                    pred = self.denoiser(xc, i, schedule, c)
                x0 = predict_x0(pred.detach(), xc, schedule, i)
            images = self.sampler.decode(x0).float()
            out = self.reward(images, list(c.prompts))
            self.reward_calls += xc.shape[0]
            r = torch.where(out.valid.to(out.scores.device), out.scores, torch.zeros_like(out.scores))
            (g,) = torch.autograd.grad(r.sum(), xc)
        return pred.detach(), torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)

    def __call__(self, x: torch.Tensor, i: int, schedule, cond) -> torch.Tensor:
        w = self.weight(i, len(schedule))
        if w == 0.0:
            pred = self.denoiser(x, i, schedule, cond)
            self.last = (i, x, pred)
            return pred
        size = self.config.chunk_size or x.shape[0]
        preds, grads = [], []
        for start in range(0, x.shape[0], size):
            p, g = self.gradient(x, i, schedule, cond, slice(start, min(x.shape[0], start + size)))
            preds.append(p)
            grads.append(g)
        pred, g = torch.cat(preds), torch.cat(grads)  # (B, ...)
        if self.config.max_grad_norm is not None:
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            g = g * (self.config.max_grad_norm / norm).clamp(max=1.0).view(-1, *([1] * (g.ndim - 1)))
        self.last = (i, x, pred)
        guided = pred.float() - w * self.score_factor(schedule, i, g) * g
        return guided.to(pred.dtype)


def guided_denoiser(denoiser: Callable, sampler, reward: Callable, config: GuidanceConfig | None) -> Callable:
    """``denoiser`` itself when ``config`` is None or its scale is 0, else a :class:`RewardGuidance` around it."""
    if config is None:
        return denoiser
    return RewardGuidance(denoiser, sampler, reward, config)


def needs_gradient(reward: Callable, what: str) -> None:
    """Raise a teaching error when ``reward`` says it has no gradient."""
    info = getattr(reward, "info", None)
    if info is not None and not getattr(info, "differentiable", True):
        raise ValueError(f"{what} needs a differentiable reward; {info.name!r} has no gradient (visalign rewards lists "
                         "which do). Use a differentiable reward for guidance, e.g. shapes-proxy on the toy world, or "
                         "a gradient-free method: bon, fk or search")


def run_guidance(sampler, reward: Callable, config: GuidanceConfig | None, call: SteerCall, *,
                 score_reward: Callable | None = None) -> SteerResult:
    """Reward-guided sampling for each prompt of ``call``: each image is one rollout whose denoiser
    carries the reward-gradient term (``call.particles > 1`` keeps the best of that many guided
    samples by ``score_reward``).

    Args:
        reward (`Callable`): the differentiable reward whose gradient guides.
        config (`GuidanceConfig`): scale, schedule, window, clipping.
        score_reward (`Callable`, *optional*): the reward that scores the final images (defaults to ``reward``).
    """
    config = config or GuidanceConfig()
    needs_gradient(reward, "reward-gradient guidance")
    result = run_best_of_n(sampler, score_reward or reward, None, call,
                           denoiser=lambda base: RewardGuidance(base, sampler, reward, config))
    result.method = "guidance"
    result.settings["reward_guidance"] = asdict(config)
    return result


def guided(sampler, prompts, reward: Callable, config: GuidanceConfig | None = None, *, score_reward: Callable | None = None,
           samples: int = 1, **shared) -> SteerResult:
    """Reward-guided sampling: each image is one rollout whose denoiser carries the reward-gradient
    term (``samples > 1`` keeps the best of that many guided samples by ``score_reward``).

    Args:
        reward (`Callable`): the differentiable reward whose gradient guides.
        config (`GuidanceConfig`): scale, schedule, window, clipping.
        score_reward (`Callable`, *optional*): the reward that scores the final images (defaults to ``reward``).
        samples (`int`, *optional*, defaults to 1): guided samples per image.
        shared: the settings every method shares, :meth:`~visalign.steering.common.SteerCall.resolve`'s
            (``kernel`` defaults to ``"ode"``).
    """
    call = SteerCall.resolve(sampler, prompts, particles=samples, what="guided samples per image", **shared)
    return run_guidance(sampler, reward, config, call, score_reward=score_reward)
