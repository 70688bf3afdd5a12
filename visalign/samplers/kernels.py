"""Step kernels: pure functions that take one denoising step *and* score it.

Every kernel has the same signature::

    kernel(pred, x, schedule, i, *, generator=None, prev_sample=None, **options) -> StepOutput

- ``pred``: the model prediction at step ``i`` (guidance already applied), in the sampler's
  parameterisation (``schedule.parameterization``: ``"flow"`` velocity, ``"eps"`` or ``"v"``).
- ``x``: the current sample ``x_i``.
- ``schedule``: the :class:`~visalign.samplers.types.Schedule` of the rollout; the kernel
  reads the numbers of step ``i`` from it, so replaying steps out of order is safe.
- ``generator`` (sample) or ``prev_sample`` (score a stored transition ``x_i -> x_{i+1}``).

One function for both uses means sampling and scoring cannot drift apart: on-policy, the
recomputed log-prob equals the sampled one and the PPO ratio is exactly 1 (ddpo-pytorch's
``ddim_step_with_logprob`` habit).

Notation (docs/samplers.md).  Rectified flow: ``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``,
one step goes from ``s`` to ``s' < s`` with ``dt = s' - s < 0``.  DDPM: ``x_t = sqrt(ab_t) x0 +
sqrt(1 - ab_t) eps``.  Gaussian log-probs are **averaged** over every non-batch dimension, as in
the Flow-GRPO and DDPO reference code.  Kernels compute in float32 and return the float32
sample they scored (the trajectory keeps it, as the Flow-GRPO reference does), so recomputing the
log-prob of a stored transition under bf16 weights is exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from .types import StepOutput

if TYPE_CHECKING:
    from .types import Schedule

__all__ = [
    "ode_step",
    "flow_sde_step",
    "flow_cps_step",
    "ddim_step",
    "KERNELS",
    "get_kernel",
    "gaussian_log_prob",
    "predict_x0",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (one or a list per sample)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(sample; mean, std^2)`` averaged over all non-batch dims -> ``(B,)``.

    ``std`` is a scalar or broadcastable to ``sample``.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=sample.device)
    lp = -((sample.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _mean_over_sample(lp)


def _mean_over_sample(t: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim in logical (contiguous) order, so the same values give the same
    float32 sum whatever their memory layout (a live sample vs its stored copy)."""
    return t.reshape(t.shape[0], -1).mean(1)


def _ddpm_x0_eps(pred: torch.Tensor, x: torch.Tensor, ab_t: torch.Tensor, parameterization: str, clip=None):
    """x0 and eps estimates from an eps- or v-prediction (docs/samplers.md, "Notation").

    ``clip``: clamp x0 to ``[-clip, clip]`` (DDIM's ``clip_sample``; eps is not recomputed)."""
    if parameterization == "eps":
        eps = pred
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    elif parameterization == "v":
        x0 = ab_t.sqrt() * x - (1 - ab_t).sqrt() * pred
        eps = ab_t.sqrt() * pred + (1 - ab_t).sqrt() * x
    else:
        raise ValueError(f"DDPM kernels take parameterization 'eps' or 'v', got {parameterization!r}")
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return x0, eps


def predict_x0(pred: torch.Tensor, x: torch.Tensor, schedule: "Schedule", i: int) -> torch.Tensor:
    """The clean-sample estimate at step ``i`` (float32)."""
    x, pred = x.float(), pred.float()
    if schedule.parameterization == "flow":
        s = schedule.sigma(i, x)
        return x - s * pred
    x0, _ = _ddpm_x0_eps(pred, x, schedule.alpha_cumprod(i, x), schedule.parameterization, schedule.clip_sample_range)
    return x0


def _finish(prev: torch.Tensor, mean: torch.Tensor, std, x0, *, stochastic: bool, kl_std=None) -> StepOutput:
    log_prob = gaussian_log_prob(prev, mean, std) if stochastic else None
    std_t = torch.as_tensor(std, dtype=torch.float32)
    if stochastic and kl_std is None:
        kl_std = std_t
    kl = None if kl_std is None else torch.as_tensor(kl_std, dtype=torch.float32).reshape(())
    return StepOutput(prev_sample=prev.float().contiguous(), mean=mean, std=std_t, log_prob=log_prob, x0=x0, kl_std=kl)


def _sample_or_score(mean, std, generator, prev_sample):
    if prev_sample is not None:
        return prev_sample.float()
    return mean + std * _randn_like(mean, generator)


def ode_step(pred, x, schedule: "Schedule", i: int, *, generator=None, prev_sample=None) -> StepOutput:
    """Deterministic step: Euler for rectified flow, DDIM (eta = 0) for eps / v models.

    Flow: ``x' = x + v * dt`` (the FlowMatchEulerDiscreteScheduler step).  DDPM: ``x' =
    sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat`` (Song et al. 2021, DDIM eq. 12, sigma = 0).
    ``log_prob`` is ``None``: a deterministic transition has no density.
    """
    xf, pf = x.float(), pred.float()
    if schedule.parameterization == "flow":
        s, s_next = schedule.sigma(i, xf), schedule.sigma(i + 1, xf)
        mean = xf + pf * (s_next - s)  # (B, ...)
        x0 = xf - s * pf
    else:
        ab_t, ab_prev = schedule.alpha_cumprod(i, xf), schedule.alpha_cumprod_prev(i, xf)
        x0, eps = _ddpm_x0_eps(pf, xf, ab_t, schedule.parameterization, schedule.clip_sample_range)
        mean = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return _finish(mean, mean, 0.0, x0, stochastic=False)


def _pool(t: torch.Tensor, f: int) -> torch.Tensor:
    """Block means over ``f x f`` blocks of the last two dims (any leading dims)."""
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"noise_pool={f} must divide the latent's height and width ({h} x {w}); choose a divisor")
    return torch.nn.functional.avg_pool2d(t.reshape(-1, 1, h, w), f).reshape(*lead, h // f, w // f)


def _unpool(t: torch.Tensor, f: int) -> torch.Tensor:
    return t.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def flow_sde_step(
    pred, x, schedule: "Schedule", i: int, *, generator=None, prev_sample=None, noise_level: float = 0.7,
    noise_pool: int = 1,
) -> StepOutput:
    """Flow-GRPO's SDE step for rectified flow (Liu et al. 2025, "Flow-GRPO", eq. 9).

    ``std = a * sqrt(s / (1 - s))`` (at ``s == 1`` the schedule's second sigma replaces ``s`` in
    the denominator), ``mu = x + (v + std^2 / (2 s) * (x + (1 - s) v)) dt``,
    ``x' = mu + std * sqrt(-dt) * z``.  With ``a = 0`` this is the Euler step.

    ``noise_pool = f > 1`` confines the noise to the subspace of functions constant on ``f x f``
    blocks of the latent (projector ``P``: block mean, repeated): ``x' = mu + std sqrt(-dt) U z``
    with ``U`` the orthonormal block basis and ``z`` of the pooled size, and the score correction
    acts in that subspace only, ``mu = x + (v + std^2 / (2 s) P(x + (1 - s) v)) dt``.  An SDE whose
    diffusion matrix ``D`` is any PSD matrix keeps the ODE's marginals when its drift adds
    ``D / 2`` times the score (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
    eq. 6 with a matrix-valued ``G``); here ``D = std^2 P``, Euler-discretised like the original.
    The log-prob is the Gaussian density of ``U^T (x' - mu)`` (averaged over its ``k`` dims): the
    policy explores only low-frequency directions, so a REINFORCE estimate carries ``f^2`` fewer
    noise dimensions that do not change the layout.  ``f = 1`` is Flow-GRPO's step exactly.

    ``kl_std`` is ``a sqrt(s / (1 - s))`` (the reference's ``std_dev_t``, without ``sqrt(-dt)``):
    the scale published KL weights assume.

    Args:
        noise_level (`float`, *optional*, defaults to 0.7): ``a`` in the paper (reference default).
        noise_pool (`int`, *optional*, defaults to 1): block size ``f`` of the exploration noise.
    """
    xf, v = x.float(), pred.float()
    s, s_next = schedule.sigma(i, xf), schedule.sigma(i + 1, xf)
    dt = s_next - s  # negative
    s_den = torch.where(s >= 1.0, schedule.sigma(1, xf), s)
    std = noise_level * torch.sqrt(s / (1 - s_den))
    step_std = std * torch.sqrt(-dt)
    x0 = xf - s * v
    f = int(noise_pool)
    if f < 1:
        raise ValueError(f"noise_pool must be a positive integer, got {noise_pool}")
    score_term = xf + (1 - s) * v  # = -s * score (E[eps | x] = x + (1 - s) v); projected when pooled
    if f > 1:
        score_term = _unpool(_pool(score_term, f), f)
    mean = xf + (v + std**2 / (2 * s) * score_term) * dt
    if noise_level == 0:
        return _finish(mean, mean, 0.0, x0, stochastic=False)
    kl_std = std.reshape(())
    if f == 1:
        prev = _sample_or_score(mean, step_std, generator, prev_sample)
        return _finish(prev, mean, step_std.reshape(()), x0, stochastic=True, kl_std=kl_std)
    step_std = step_std.reshape(())
    if prev_sample is None:
        z = _randn_like(_pool(mean, f), generator)
        prev = mean + step_std * _unpool(z, f) / f
    else:
        prev = prev_sample.float()
    y = _pool(prev - mean, f) * f  # U^T (x' - mu)
    log_prob = gaussian_log_prob(y, torch.zeros_like(y), step_std)
    return StepOutput(prev_sample=prev.float().contiguous(), mean=mean, std=step_std, log_prob=log_prob, x0=x0, kl_std=kl_std)


def flow_cps_step(
    pred, x, schedule: "Schedule", i: int, *, generator=None, prev_sample=None, noise_level: float = 0.8,
    log_prob_type: str = "mse",
) -> StepOutput:
    """Coefficient-preserving sampling step (Flow-GRPO CPS variant; Wang & Yu 2025).

    ``s_noise = s' sin(a pi / 2)``, ``x0 = x - s v``, ``x1 = x + (1 - s) v``,
    ``mu = (1 - s') x0 + sqrt(s'^2 - s_noise^2) x1``, ``x' = mu + s_noise z``.

    The log-prob is the reference implementation's by default, ``log_prob_type="mse"``:
    ``-mean((x' - mu)^2)``, no division by ``2 s_noise^2`` and no constants, so late steps with a
    tiny ``s_noise`` do not blow up the PPO ratio; published CPS clip ranges assume it.  At the
    last step (``s' = 0``) the noise vanishes, ``x' = mu``, and this log-prob is still defined
    (0 on-policy, with a gradient when a stored transition is rescored).  ``"gaussian"`` is the
    exact density ``log N(x'; mu, s_noise^2)`` (averaged), with the last step deterministic
    (``log_prob`` ``None``).  ``kl_std`` is ``s_noise`` (the reference's ``std_dev_t``).

    Args:
        noise_level (`float`, *optional*, defaults to 0.8): ``a`` (reference default).
        log_prob_type (`str`, *optional*, defaults to ``"mse"``): ``"mse"`` or ``"gaussian"``.
    """
    if log_prob_type not in ("mse", "gaussian"):
        raise ValueError(f"flow_cps log_prob_type must be 'mse' (the reference's) or 'gaussian', got {log_prob_type!r}")
    xf, v = x.float(), pred.float()
    s, s_next = schedule.sigma(i, xf), schedule.sigma(i + 1, xf)
    s_noise = s_next * math.sin(noise_level * math.pi / 2)
    x0 = xf - s * v
    x1 = xf + (1 - s) * v
    mean = (1 - s_next) * x0 + torch.sqrt(s_next**2 - s_noise**2) * x1
    last = float(s_noise.reshape(-1)[0]) == 0.0
    if log_prob_type == "gaussian":
        if last:
            return _finish(mean, mean, 0.0, x0, stochastic=False)
        prev = _sample_or_score(mean, s_noise, generator, prev_sample)
        return _finish(prev, mean, s_noise.reshape(()), x0, stochastic=True)
    prev = mean if (last and prev_sample is None) else _sample_or_score(mean, s_noise, generator, prev_sample)
    log_prob = -_mean_over_sample((prev.float() - mean) ** 2)
    std = s_noise.reshape(())
    return StepOutput(prev_sample=prev.float().contiguous(), mean=mean, std=std, log_prob=log_prob, x0=x0, kl_std=std)


def ddim_step(
    pred, x, schedule: "Schedule", i: int, *, generator=None, prev_sample=None, eta: float = 1.0
) -> StepOutput:
    """DDIM step with eta and its log-prob (Song et al. 2021 eq. 12; Black et al. 2023, "DDPO").

    ``var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)``, ``std = eta * sqrt(var)``,
    ``mu = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - std^2) eps_hat``, ``x' = mu + std z``.

    Args:
        eta (`float`, *optional*, defaults to 1.0): DDPO uses 1.0 for RL rollouts.
    """
    xf, pf = x.float(), pred.float()
    ab_t, ab_prev = schedule.alpha_cumprod(i, xf), schedule.alpha_cumprod_prev(i, xf)
    x0, eps = _ddpm_x0_eps(pf, xf, ab_t, schedule.parameterization, schedule.clip_sample_range)
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * var.sqrt()
    mean = ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).clamp_min(0).sqrt() * eps
    if eta == 0 or float(std) == 0.0:  # e.g. the last step when ab_prev == 1 (set_alpha_to_one)
        return _finish(mean, mean, 0.0, x0, stochastic=False)
    prev = _sample_or_score(mean, std, generator, prev_sample)
    return _finish(prev, mean, std.reshape(()), x0, stochastic=True)


Kernel = Callable[..., StepOutput]

KERNELS: dict[str, Kernel] = {
    "ode": ode_step,
    "flow_sde": flow_sde_step,
    "flow_cps": flow_cps_step,
    "ddim": ddim_step,
}

_FLOW_ONLY = {"flow_sde", "flow_cps"}
_DDPM_ONLY = {"ddim"}


def get_kernel(name: str, parameterization: str) -> Kernel:
    """Look up a kernel by name and check it fits the model's parameterisation."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(KERNELS)}")
    if parameterization == "flow" and name in _DDPM_ONLY:
        raise ValueError(f"kernel {name!r} is for eps/v models; this flow model takes 'flow_sde' or 'flow_cps'")
    if parameterization != "flow" and name in _FLOW_ONLY:
        raise ValueError(
            f"kernel {name!r} is for rectified-flow models; this {parameterization}-prediction model takes 'ddim'"
        )
    return KERNELS[name]
