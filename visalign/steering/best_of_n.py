"""Best-of-N: ``N`` independent samples per prompt, the one with the highest reward kept.

The simplest inference-time scaling baseline (e.g. the "random search" of Ma et al. 2025 and the
best-of-N baseline of Singhal et al. 2025).  Any reward works (no gradient, batched); every
candidate's score is reported.  Candidate ``q`` of image ``j`` uses seed ``seed + j * N + q``, the
seeds FK steering gives its particles, so best-of-N on FK's kernel is FK with ``lambda = 0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .common import Compute, CountingDenoiser, HistoryHook, SteerCall, Steered, SteerResult, grid_steps, nan_invalid

__all__ = ["best_of_n", "run_best_of_n"]


def _argmax(scores: torch.Tensor) -> int:
    s = torch.nan_to_num(scores.float(), nan=-torch.inf)
    return int(s.argmax())


def run_best_of_n(sampler, reward: Callable, config: None, call: SteerCall, *, denoiser: Callable | None = None,
                  sde_steps="all") -> SteerResult:
    """Best of ``call.particles`` samples for each prompt of ``call`` (best-of-N has no settings of
    its own: ``config`` is None).

    Args:
        denoiser (`Callable`, *optional*): ``denoiser(base)`` wraps the counting CFG denoiser of
            every candidate (e.g. reward guidance).
        sde_steps: the stochastic steps of a stochastic ``call.kernel`` (see ``Sampler.rollout``).
    """
    from visalign.samplers import collect

    n, prompts, meta, seed = call.particles, call.prompts, call.metadata, call.seed
    keep_history, keep_particles = call.keep_history, call.keep_particles
    compute = Compute()
    base = CountingDenoiser(sampler, call.guidance_scale)
    history = HistoryHook(sampler, grid_steps(call.num_steps)) if keep_history else None
    items: list[Steered] = []
    done = [0]

    def finish(start: int, batch) -> None:
        scores = nan_invalid(batch.outputs["reward"])
        images = batch.images.float().cpu()
        compute.reward_calls += scores.shape[0]
        cols = history.batches[-1] if history is not None else []
        for g in range(scores.shape[0] // n):
            j = start // n + g
            rows = slice(g * n, (g + 1) * n)
            c = _argmax(scores[rows])
            item = Steered(
                prompt=prompts[j], metadata=meta[j], image=images[g * n + c], reward=float(scores[g * n + c]), chosen=c,
                particle_rewards=[float(v) for v in scores[rows]], seeds=[seed + j * n + q for q in range(n)],
                particles=images[rows].clone() if keep_particles else None,
                history=([(lab, im[rows], torch.full((n,), float("nan"))) for lab, im in cols]
                         + [("final", images[rows], scores[rows])]) if keep_history else None,
            )
            done[0] += 1
            call.deliver(items, j, item)

    rows = call.rows
    wrapped = denoiser(base) if denoiser is not None else base
    collect(sampler, rows, {"reward": reward}, metadata=call.rows_metadata, num_steps=call.num_steps,
            guidance_scale=call.guidance_scale, kernel=call.kernel, kernel_options=call.kernel_options,
            sde_steps=sde_steps, seeds=[seed + i for i in range(len(rows))], batch_size=call.batch_size,
            hooks=[history] if history else (), denoiser=wrapped, keep_images=False, on_batch=finish,
            progress="best-of-n" if call.progress is True else call.progress, size=call.size)
    compute.denoiser_calls = base.calls
    compute.grad_calls = getattr(wrapped, "grad_calls", 0)
    compute.reward_calls += getattr(wrapped, "reward_calls", 0)
    return SteerResult("bon", items, compute.per_image(done[0]), call.settings())


def best_of_n(sampler, prompts: Sequence[str], reward: Callable, *, n: int = 4, denoiser: Callable | None = None,
              sde_steps="all", **shared) -> SteerResult:
    """Best of ``n`` samples for each entry of ``prompts`` (repeat a prompt for several images).

    Args:
        n (`int`, *optional*, defaults to 4): candidates per image.
        denoiser / sde_steps: as in :func:`run_best_of_n`.
        shared: the settings every method shares, :meth:`~visalign.steering.common.SteerCall.resolve`'s
            (``metadata``, ``num_steps``, ``guidance_scale``, ``kernel`` (defaults to ``"ode"``, the
            model's own sampler; pass FK's stochastic kernel to compare with FK at ``lambda = 0``),
            ``kernel_options``, ``seed``, ``prompts_per_batch``, ``keep_history``, ``keep_particles``,
            ``on_item``, ``progress``, ``size``).
    """
    call = SteerCall.resolve(sampler, prompts, particles=n, what="best-of-N's n (samples per prompt)", **shared)
    return run_best_of_n(sampler, reward, None, call, denoiser=denoiser, sde_steps=sde_steps)
