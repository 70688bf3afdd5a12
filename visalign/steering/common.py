"""Pieces shared by the steering methods: the settings every method takes (:class:`SteerCall`),
compute accounting, chunked scoring, results.

Every method reports its compute the way inference-time scaling papers count it (Ma et al. 2025,
"Inference-time scaling for diffusion models beyond scaling denoising steps"): network evaluations
of the denoiser (NFE; classifier-free guidance's two branches count as two) plus calls of the
verifier (images scored), per steered image, and the wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

__all__ = ["SteerCall", "CountingDenoiser", "Steered", "SteerResult", "score_images", "score_latents", "sub_schedule",
           "lookahead_x0", "Compute", "load_reward"]


def load_reward(spec: str, options: dict):
    """The reward of a spec string (``visalign rewards``), given only the shared ``options``
    (device, dtype, model paths...) its factory takes: how ``visalign steer`` and the toy
    evaluation load the steering and guidance rewards."""
    import visalign.rewards as vr

    return vr.load(spec, shared=options)


@dataclass
class SteerCall:
    """The settings every steering method shares, resolved once against the sampler
    (:meth:`resolve`); each method adds its own config to them.

    Every method has one signature, ``method(sampler, reward, config, call, **extras) ->
    SteerResult`` (:func:`~visalign.steering.best_of_n.run_best_of_n`,
    :func:`~visalign.steering.fk.run_fk`, :func:`~visalign.steering.guidance.run_guidance`,
    :func:`~visalign.steering.search.run_search`), as k-diffusion's samplers share
    ``sampler(model, x, sigmas, ...)``.  :func:`~visalign.steering.config.steer` and the
    convenience functions (``best_of_n``, ``fk_steer``, ``guided``, ``noise_search``) build the
    ``call`` and run one.

    Args:
        prompts: one steered image per entry (repeat a prompt for several).
        metadata: per-prompt task metadata handed to the reward (e.g. GenEval's ``include``), or None each.
        particles: ``k``: FK particles, best-of-N candidates, noise-search candidates per round,
            guided samples per image.
        num_steps / guidance_scale: the rollout's denoising steps and classifier-free guidance scale.
        kernel / kernel_options: the sampling kernel and its options.
        seed: particle ``q`` of image ``j`` draws its noise from seed ``seed + j * k + q``.
        prompts_per_batch: images steered per rollout (the batch is this times ``k``).
        keep_history / keep_particles: keep the decoded particles over time / at the end.
        on_item: ``on_item(j, Steered)`` as each image is done; the result's ``items`` then stay
            empty (large jobs).
        progress: a progress bar (``True``, or its label).
        size: ``height`` / ``width`` / ``num_frames`` of the samples.
    """

    prompts: list[str]
    metadata: list[dict | None]
    particles: int
    num_steps: int
    guidance_scale: float
    kernel: str
    kernel_options: dict[str, Any]
    seed: int = 0
    prompts_per_batch: int | None = None
    keep_history: bool = False
    keep_particles: bool = False
    on_item: Callable[[int, "Steered"], None] | None = None
    progress: bool | str = False
    size: dict[str, int] = field(default_factory=dict)

    @classmethod
    def resolve(cls, sampler, prompts: Sequence[str], *, particles: int = 4, what: str = "particles",
                metadata: Sequence[dict | None] | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, kernel: str | None = None, default_kernel: str = "ode",
                kernel_options: dict | None = None, seed: int = 0, prompts_per_batch: int | None = None,
                keep_history: bool = False, keep_particles: bool = False,
                on_item: Callable[[int, "Steered"], None] | None = None, progress: bool | str = False,
                size: dict | None = None) -> "SteerCall":
        """The call's settings with the defaults filled in: ``num_steps`` and ``guidance_scale``
        from the model card (``sampler.default_steps`` / ``default_guidance``), ``kernel`` from
        ``default_kernel``, ``prompts_per_batch`` all the prompts.  ``what`` names ``particles``
        in the error when it is below 1."""
        k = int(particles)
        if k < 1:
            raise ValueError(f"{what} must be >= 1, got {particles}")
        prompts = list(prompts)
        return cls(
            prompts=prompts, metadata=list(metadata) if metadata is not None else [None] * len(prompts), particles=k,
            num_steps=num_steps or sampler.default_steps,
            guidance_scale=sampler.default_guidance if guidance_scale is None else float(guidance_scale),
            kernel=kernel or default_kernel, kernel_options=dict(kernel_options or {}), seed=seed,
            prompts_per_batch=prompts_per_batch or len(prompts), keep_history=keep_history,
            keep_particles=keep_particles, on_item=on_item, progress=progress, size=dict(size or {}))

    @property
    def rows(self) -> list[str]:
        """The prompts of the particles: each prompt ``k`` times in a row."""
        return [p for p in self.prompts for _ in range(self.particles)]

    @property
    def rows_metadata(self) -> list[dict | None]:
        return [m for m in self.metadata for _ in range(self.particles)]

    @property
    def batch_size(self) -> int:
        """Particles per rollout."""
        return self.prompts_per_batch * self.particles

    def settings(self) -> dict[str, Any]:
        """The settings a result reports (the method adds its own)."""
        return {"particles": self.particles, "num_steps": self.num_steps, "guidance_scale": self.guidance_scale,
                "kernel": self.kernel, "kernel_options": dict(self.kernel_options), "seed": self.seed}

    def deliver(self, items: list, j: int, item: "Steered") -> None:
        """Hand image ``j`` to ``on_item``, or keep it in ``items``."""
        if self.on_item is not None:
            self.on_item(j, item)
        else:
            items.append(item)


def _cfg_factor(sampler, guidance_scale: float, cond) -> int:
    return 2 if sampler.guidance == "cfg" and guidance_scale > 1.0 and cond.neg is not None else 1


class CountingDenoiser:
    """``CFGDenoiser(sampler, guidance_scale)`` that counts network evaluations: each call adds
    its batch size (times two under classifier-free guidance) to :attr:`calls`."""

    def __init__(self, sampler, guidance_scale: float) -> None:
        from visalign.samplers import CFGDenoiser

        self.sampler = sampler
        self.guidance_scale = float(guidance_scale)
        self.inner = CFGDenoiser(sampler, self.guidance_scale)
        self.calls = 0

    def __call__(self, x: torch.Tensor, i: int, schedule, cond) -> torch.Tensor:
        self.calls += x.shape[0] * _cfg_factor(self.sampler, self.guidance_scale, cond)
        return self.inner(x, i, schedule, cond)


@dataclass
class Compute:
    """Running totals of one steering run (all samples, not per image)."""

    denoiser_calls: int = 0
    grad_calls: int = 0
    reward_calls: int = 0
    started: float = field(default_factory=time.perf_counter)

    def per_image(self, images: int) -> dict[str, float]:
        n = max(images, 1)
        seconds = time.perf_counter() - self.started
        return {"denoiser_calls": self.denoiser_calls / n, "denoiser_grad_calls": self.grad_calls / n,
                "reward_calls": self.reward_calls / n, "seconds": seconds / n, "total_seconds": seconds,
                "images": images}


def _chunks(n: int, size: int | None):
    size = n if not size else int(size)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def nan_invalid(output) -> torch.Tensor:
    """``(B,)`` float32 CPU scores of a reward output, NaN where the reward marks a sample invalid."""
    s = output.scores.detach().float().cpu().clone()
    s[~output.valid.cpu()] = float("nan")
    return s


def score_images(reward: Callable, images: torch.Tensor, prompts: Sequence[str], metadata=None,
                 chunk: int | None = None) -> torch.Tensor:
    """``(B,)`` float32 CPU scores of ``reward`` on ``images``, ``chunk`` samples per call; a sample
    the reward marks invalid scores NaN."""
    out = []
    for sl in _chunks(images.shape[0], chunk):
        meta = None if metadata is None or all(m is None for m in metadata[sl]) else list(metadata[sl])
        out.append(nan_invalid(reward(images[sl], list(prompts[sl]), metadata=meta)))
    return torch.cat(out)


def score_latents(sampler, reward: Callable, latents: torch.Tensor, prompts: Sequence[str], metadata=None,
                  chunk: int | None = None, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode ``latents`` and score them, ``chunk`` samples at a time so that memory stays bounded
    (video).  Returns ``(scores (B,), images on the CPU or None)``."""
    scores, kept = [], []
    for sl in _chunks(latents.shape[0], chunk):
        images = sampler.decode(latents[sl]).float()
        meta = None if metadata is None else list(metadata[sl])
        scores.append(score_images(reward, images, list(prompts[sl]), meta))
        if keep:
            kept.append(images.cpu())
    return torch.cat(scores), (torch.cat(kept) if keep else None)


def sub_schedule(schedule, start: int, steps: int):
    """The schedule from step ``start`` to the end, coarsened to ``steps`` steps (a few-step ODE
    look-ahead): boundaries spread evenly over the remaining steps, the numbers taken from
    ``schedule`` so that the look-ahead lands on the same final noise level."""
    n = len(schedule)
    steps = max(1, min(int(steps), n - start))
    bounds = torch.linspace(start, n, steps + 1).round().long().unique()
    head, tail = bounds[:-1], bounds[1:]
    if schedule.parameterization == "flow":
        return replace(schedule, timesteps=schedule.timesteps[head], sigmas=schedule.sigmas[bounds])
    ac, acp = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    prev = torch.stack([ac[b] if b < n else acp[n - 1] for b in tail.tolist()])
    return replace(schedule, timesteps=schedule.timesteps[head], alphas_cumprod=ac[head], alphas_cumprod_prev=prev)


def lookahead_x0(denoiser: Callable, x: torch.Tensor, schedule, start: int, steps: int, cond) -> torch.Tensor:
    """The end point of a ``steps``-step ODE from ``x`` (the sample entering step ``start``):
    a sharper clean-sample estimate than the one-step x0-prediction, at ``steps`` denoiser calls."""
    from visalign.samplers.kernels import ode_step

    sub = sub_schedule(schedule, start, steps)
    for j in range(len(sub)):
        x = ode_step(denoiser(x, j, sub, cond), x, sub, j).prev_sample
    return x


@dataclass
class Steered:
    """One steered image and how it was found.

    Args:
        prompt / metadata: what was asked (task metadata as handed to the reward).
        image: the chosen image ``(3, H, W)`` or video ``(F, 3, H, W)`` in ``[0, 1]`` (CPU).
        reward: the steering reward of the chosen image (NaN if the reward could not judge it).
        chosen: index of the chosen one among the final particles / candidates.
        particle_rewards: the steering reward of every final particle (candidate).
        seeds: the seed of each particle's (candidate's) own generator.
        lineage: resampling events, ``{"step", "ess", "parents", "resampled"}`` (FK), or the
            search rounds (noise search); empty for best-of-N and guidance.
        particles: the final particles' images ``(k, ...)`` when kept.
        history: ``[(label, images (k, ...), scores (k,))]`` for the grid (particles over time,
            each row the ancestry of one final particle), when kept.
    """

    prompt: str
    metadata: dict | None
    image: torch.Tensor | None
    reward: float
    chosen: int
    particle_rewards: list[float]
    seeds: list[int]
    lineage: list[dict] = field(default_factory=list)
    particles: torch.Tensor | None = None
    history: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SteerResult:
    """What a steering method returns: the steered images (``items``, empty when they were handed to
    ``on_item`` as they came), the method and its settings, and the compute per image."""

    method: str
    items: list[Steered]
    compute: dict[str, float]
    settings: dict[str, Any]

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([it.reward for it in self.items], dtype=torch.float32)

    @property
    def images(self) -> torch.Tensor:
        return torch.stack([it.image for it in self.items])


class HistoryHook:
    """Keeps the decoded x0-prediction of every sample after the steps ``steps`` (for the grid of
    samples over time); rows follow any reordering done by earlier hooks."""

    def __init__(self, sampler, steps: Sequence[int]) -> None:
        self.sampler, self.steps = sampler, set(int(s) for s in steps)
        self.batches: list[list[tuple[str, torch.Tensor]]] = []

    def after_step(self, state):
        if state.i == 0:
            self.batches.append([])
        if state.i in self.steps:
            self.batches[-1].append((f"step {state.i + 1}", self.sampler.decode(state.step.x0).float().cpu()))
        return None


def grid_steps(num_steps: int, columns: int = 4) -> list[int]:
    """``columns`` steps spread over a rollout (the last excluded: the final image is its own column)."""
    if num_steps <= 1:
        return []
    return sorted({int(round(v)) for v in torch.linspace(0, num_steps - 2, min(columns, num_steps - 1)).tolist()})
