"""The plain types of the Sampler contract: what a rollout carries and what a kernel returns.

:class:`Conditioning`, :class:`Schedule`, :class:`StepOutput`, :class:`Trajectory`, the hook
state and answer, the stochastic-step choice (:class:`RandomWindow`, :func:`resolve_sde_steps`)
and the :class:`Denoiser` protocol.  They depend on torch alone, so the kernels
(:mod:`visalign.samplers.kernels`) and the :class:`~visalign.samplers.contract.Sampler` both stand
on them; every name is also importable from :mod:`visalign.samplers.contract` and
:mod:`visalign.samplers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from .contract import Sampler

__all__ = [
    "Conditioning",
    "Schedule",
    "StepOutput",
    "Trajectory",
    "HookState",
    "HookResult",
    "RandomWindow",
    "Denoiser",
    "resolve_sde_steps",
]


# --------------------------------------------------------------------------------------------
# Small data carriers
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Per-sample conditioning tensors, opaque to trainers.

    ``pos`` holds the prompt's tensors and ``neg`` the negative / unconditional ones (``None``
    when the family has no classifier-free guidance).  Every tensor has the batch on dim 0, so
    indexing, ``repeat_interleave`` and ``to`` work without knowing what is inside.
    """

    pos: dict[str, torch.Tensor]
    neg: dict[str, torch.Tensor] | None = None
    prompts: list[str] = field(default_factory=list)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], prompts: list[str]) -> "Conditioning":
        neg = None if self.neg is None else {k: fn(v) for k, v in self.neg.items()}
        return Conditioning({k: fn(v) for k, v in self.pos.items()}, neg, prompts)

    def __len__(self) -> int:
        return next(iter(self.pos.values())).shape[0]

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1)
        idx_list = list(range(len(self)))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        prompts = [self.prompts[j] for j in idx_list] if self.prompts else []
        return self._map(lambda t: t[index], prompts)

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        prompts = [p for p in self.prompts for _ in range(repeats)]
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0), prompts)

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return self._map(move, list(self.prompts))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0]
        pos = {k: torch.cat([c.pos[k] for c in items]) for k in first.pos}
        neg = None if first.neg is None else {k: torch.cat([c.neg[k] for c in items]) for k in first.neg}
        return Conditioning(pos, neg, [p for c in items for p in c.prompts])


@dataclass
class Schedule:
    """The numbers of one rollout; the same ones the diffusers pipeline would use.

    Args:
        parameterization: ``"flow"``, ``"eps"`` or ``"v"``.
        timesteps: ``(N,)`` the model's time input at each step.
        sigmas: flow models: ``(N + 1,)`` noise levels from ~1 down to 0.
        alphas_cumprod / alphas_cumprod_prev: DDPM models: ``(N,)`` ``ab_t`` and ``ab_prev``.
        clip_sample_range: DDPM models whose scheduler clips the x0-estimate.
    """

    parameterization: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    alphas_cumprod_prev: torch.Tensor | None = None
    #: DDIM's ``clip_sample``: clamp the x0-estimate to ``[-r, r]`` (eps is kept unclipped, as diffusers)
    clip_sample_range: float | None = None

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    @staticmethod
    def _at(values: torch.Tensor | None, i: int, like: torch.Tensor, what: str) -> torch.Tensor:
        if values is None:
            raise ValueError(f"this schedule has no {what} (parameterization mismatch)")
        return values[i].to(device=like.device, dtype=torch.float32)

    def sigma(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self._at(self.sigmas, i, like, "sigmas")

    def alpha_cumprod(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self._at(self.alphas_cumprod, i, like, "alphas_cumprod")

    def alpha_cumprod_prev(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self._at(self.alphas_cumprod_prev, i, like, "alphas_cumprod_prev")

    def to(self, device) -> "Schedule":
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)},
        )


@dataclass
class StepOutput:
    """What a kernel returns (and ``Sampler.log_prob`` stacks over steps).

    ``prev_sample (B, ...)`` float32 (the sample that was scored), ``mean (B, ...)`` float32,
    ``std`` scalar float32: the step's noise standard deviation (0 for ODE steps), ``log_prob
    (B,)`` float32 or ``None`` for deterministic steps, ``x0 (B, ...)``.  ``kl_std`` is the scale
    that normalises a KL term on the step mean, ``|mu - mu_ref|^2 / (2 kl_std^2)``: the reference
    implementations' ``std_dev_t`` (Flow-GRPO's SDE: ``a sqrt(s / (1 - s))`` without the step's
    ``sqrt(-dt)``; CPS and DDIM: the step's std); ``None`` for ODE steps.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None
    x0: torch.Tensor | None = None
    kl_std: torch.Tensor | None = None


@dataclass
class Trajectory:
    """A recorded rollout.

    Args:
        latents: ``(B, N + 1, *latent_shape)``: ``x_0`` (noise) ... ``x_N`` (final), float32
            whatever the model's dtype: the samples the kernels scored, so a recomputed
            log-prob of a stored transition is exact in bf16 too (as the Flow-GRPO reference
            stores them).
        log_probs: ``(B, N)`` float32; 0 on ODE steps (see ``sde_mask``).
        means: ``(B, N, *latent_shape)`` float32 kernel means, or ``None`` if not recorded.
        stds: ``(N,)`` float32 per-step standard deviations (0 on ODE steps).
        x0: ``(B, N, *latent_shape)`` x0-predictions when ``record_x0=True``.
        sde_mask: ``(N,)`` bool, which steps were stochastic (these carry log-probs).
        cond / schedule / guidance_scale / kernel / kernel_options: what is needed to recompute
            the log-probs of the stored transitions.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor | None
    stds: torch.Tensor
    sde_mask: torch.Tensor
    cond: Conditioning
    schedule: Schedule
    guidance_scale: float
    kernel: str
    kernel_options: dict[str, Any]
    x0: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def sde_steps(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.sde_mask).flatten()]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(items: Sequence["Trajectory"]) -> "Trajectory":
        """Join trajectories of the same rollout settings along the batch (e.g. the batches of
        one collect step)."""
        first = items[0]
        for t in items[1:]:
            if not torch.equal(t.sde_mask, first.sde_mask) or t.kernel != first.kernel:
                raise ValueError("Trajectory.cat: the rollouts differ in kernel or stochastic steps (a random SDE "
                                 "window drawn per batch?); collect them in one batch")

        def join(name):
            values = [getattr(t, name) for t in items]
            return None if values[0] is None else torch.cat(values)

        return replace(first, latents=join("latents"), log_probs=join("log_probs"), means=join("means"),
                       x0=join("x0"), cond=Conditioning.cat([t.cond for t in items]))

    def __getitem__(self, index) -> "Trajectory":
        """Select samples (batch rows); steps and schedule stay whole."""
        if isinstance(index, int):
            index = slice(index, index + 1)

        def sel(t):
            return None if t is None else t[index]

        return replace(
            self, latents=self.latents[index], log_probs=self.log_probs[index], means=sel(self.means),
            x0=sel(self.x0), cond=self.cond[index],
        )


@dataclass
class HookState:
    """Live batch state handed to hooks after step ``i`` (latents are ``x_{i+1}``)."""

    sampler: "Sampler"
    i: int
    latents: torch.Tensor
    step: StepOutput
    schedule: Schedule
    cond: Conditioning
    prompts: list[str]


@dataclass
class HookResult:
    """A hook's answer: new latents, and optionally how batch rows were reordered (resampling).

    ``indices (B,)``: row ``j`` of the new batch descends from row ``indices[j]``; the recorded
    history and the conditioning are reordered the same way.
    """

    latents: torch.Tensor | None = None
    indices: torch.Tensor | None = None


@dataclass(frozen=True)
class RandomWindow:
    """A window of ``size`` consecutive stochastic steps, drawn anew for each rollout in
    ``[low, high)`` (Flow-GRPO-Fast / MixGRPO).  ``high`` defaults to the number of steps."""

    size: int
    low: int = 0
    high: int | None = None


def resolve_sde_steps(sde_steps, num_steps: int, generator=None) -> torch.Tensor:
    """Which steps are stochastic, as a ``(num_steps,)`` bool mask.

    ``sde_steps``: ``"all"`` (default), ``"none"``, a sequence of step indices (a fixed window),
    or a :class:`RandomWindow` (drawn with ``generator``, one draw per rollout).
    """
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if sde_steps is None or (isinstance(sde_steps, str) and sde_steps == "all"):
        mask[:] = True
    elif isinstance(sde_steps, str) and sde_steps == "none":
        pass
    elif isinstance(sde_steps, RandomWindow):
        high = num_steps if sde_steps.high is None else min(sde_steps.high, num_steps)
        last_start = high - sde_steps.size
        if sde_steps.size < 1 or last_start < sde_steps.low:
            raise ValueError(
                f"RandomWindow(size={sde_steps.size}, low={sde_steps.low}, high={sde_steps.high}) does not fit "
                f"{num_steps} steps: need low + size <= high <= num_steps"
            )
        gen = generator[0] if isinstance(generator, list) else generator
        start = int(torch.randint(sde_steps.low, last_start + 1, (1,), generator=gen))
        mask[start : start + sde_steps.size] = True
    elif isinstance(sde_steps, str):
        raise ValueError(f"sde_steps must be 'all', 'none', a list of step indices or a RandomWindow; got {sde_steps!r}")
    else:
        for i in sde_steps:
            if not 0 <= int(i) < num_steps:
                raise ValueError(f"sde_steps index {i} is outside 0..{num_steps - 1}")
            mask[int(i)] = True
    return mask


# --------------------------------------------------------------------------------------------
# The denoiser protocol
# --------------------------------------------------------------------------------------------


class Denoiser(Protocol):
    """``denoiser(x, i, schedule, cond) -> prediction`` at step ``i`` of ``schedule``, in the
    sampler's parameterisation (velocity, eps or v).  Wrappers take a denoiser and return one."""

    def __call__(self, x: torch.Tensor, i: int, schedule: Schedule, cond: Conditioning) -> torch.Tensor: ...
