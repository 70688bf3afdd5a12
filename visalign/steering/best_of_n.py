"""Best-of-N: ``N`` independent samples per prompt, the one with the highest reward kept.

The simplest inference-time scaling baseline (e.g. the "random search" of Ma et al. 2025 and the
best-of-N baseline of Singhal et al. 2025).  Any reward works (no gradient, batched); every
candidate's score is reported.  Candidate ``q`` of image ``j`` uses seed ``seed + j * N + q``, the
seeds FK steering gives its particles, so best-of-N on FK's kernel is FK with ``lambda = 0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .common import Compute, CountingDenoiser, grid_steps, HistoryHook, nan_invalid, Steered, SteerResult

__all__ = ["best_of_n"]


def _argmax(scores: torch.Tensor) -> int:
    s = torch.nan_to_num(scores.float(), nan=-torch.inf)
    return int(s.argmax())


def best_of_n(sampler, prompts: Sequence[str], reward: Callable, *, n: int = 4,
              metadata: Sequence[dict | None] | None = None, num_steps: int | None = None,
              guidance_scale: float | None = None, kernel: str = "ode", kernel_options: dict | None = None,
              seed: int = 0, prompts_per_batch: int | None = None, keep_history: bool = False,
              keep_particles: bool = False, on_item: Callable[[int, Steered], None] | None = None,
              progress: bool | str = False, size: dict | None = None, denoiser: Callable | None = None,
              sde_steps="all") -> SteerResult:
    """Best of ``n`` samples for each entry of ``prompts`` (repeat a prompt for several images).

    Args:
        kernel (`str`, *optional*, defaults to ``"ode"``): the model's own sampler; pass FK's
            stochastic kernel to compare with FK at ``lambda = 0``.
        denoiser (`Callable`, *optional*): a denoiser wrapper (e.g. reward guidance) for every candidate.
        sde_steps: the stochastic steps of a stochastic ``kernel`` (see ``Sampler.rollout``).
        Others as in :func:`~visalign.steering.fk.fk_steer`.
    """
    from visalign.samplers import collect

    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1 samples per prompt, got {n}")
    prompts = list(prompts)
    meta = list(metadata) if metadata is not None else [None] * len(prompts)
    steps = num_steps or sampler.default_steps
    guidance = sampler.default_guidance if guidance_scale is None else float(guidance_scale)
    compute = Compute()
    base = CountingDenoiser(sampler, guidance)
    history = HistoryHook(sampler, grid_steps(steps)) if keep_history else None
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
            if on_item is not None:
                on_item(j, item)
            else:
                items.append(item)

    rows = [p for p in prompts for _ in range(n)]
    rows_meta = [m for m in meta for _ in range(n)]
    wrapped = denoiser(base) if denoiser is not None else base
    collect(sampler, rows, {"reward": reward}, metadata=rows_meta, num_steps=steps, guidance_scale=guidance,
            kernel=kernel, kernel_options=kernel_options, sde_steps=sde_steps, seeds=[seed + i for i in range(len(rows))],
            batch_size=(prompts_per_batch or len(prompts)) * n, hooks=[history] if history else (), denoiser=wrapped,
            keep_images=False, on_batch=finish, progress="best-of-n" if progress is True else progress, size=size)
    compute.denoiser_calls = base.calls
    compute.grad_calls = getattr(wrapped, "grad_calls", 0)
    compute.reward_calls += getattr(wrapped, "reward_calls", 0)
    settings = {"particles": n, "num_steps": steps, "guidance_scale": guidance, "kernel": kernel,
                "kernel_options": dict(kernel_options or {}), "seed": seed}
    return SteerResult("bon", items, compute.per_image(done[0]), settings)
