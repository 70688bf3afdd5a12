"""The one collect step: seeded, batched rollout -> decode -> score, returning a typed :class:`Rollout`.

Every place that generates with a Sampler goes through :func:`collect`: the trainers' rollouts,
evaluation on held-out prompts, ``visalign sample``, the toy world's evaluation and sample pools,
and steering.  It lives beside the samplers (not in ``trainers/``) so that the toy world and the
command line can use it without importing trainers; rewards are plain callables here
(``reward(images, prompts, metadata=...) -> RewardOutput``), so nothing above this layer is imported.

Randomness: either ``seeds`` (one per sample: sample ``j`` uses ``torch.Generator().manual_seed(
seeds[j])`` for its initial noise and every stochastic step, so a sample does not depend on the
batch it falls in) or one ``generator`` consumed batch after batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .contract import Conditioning, Trajectory

__all__ = ["Rollout", "collect", "nanmean"]


def nanmean(values: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Mean of the finite (and valid) entries; NaN when there are none."""
    v = values.detach().float().flatten().cpu()
    keep = torch.isfinite(v)
    if valid is not None:
        keep &= valid.flatten().bool().cpu()
    return float(v[keep].mean()) if keep.any() else float("nan")


@dataclass
class Rollout:
    """The result of :func:`collect`, one row per sample.

    Args:
        prompts: ``(B,)`` the prompt of each sample.
        metadata: ``(B,)`` each sample's task metadata (or ``None``), as handed to the rewards.
        seeds: ``(B,)`` per-sample seeds when sampling was seeded per sample, else ``None``.
        images: decoded samples in ``[0, 1]`` (``(B, 3, H, W)``, video ``(B, F, 3, H, W)``) on the
            CPU, or only the first ``keep_images`` of them, or ``None``.
        trajectory: the recorded :class:`Trajectory` (``keep_trajectory=True``).
        outputs: ``{reward name: RewardOutput}`` over all samples (CPU tensors).
        timings: seconds spent in ``rollout`` (denoising), ``decode`` and ``reward``.
        denoiser_calls: network evaluations per sample (CFG's two branches count as two).
    """

    prompts: list[str]
    metadata: list[dict | None]
    seeds: list[int] | None = None
    images: torch.Tensor | None = None
    trajectory: Trajectory | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    denoiser_calls: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def scores(self, name: str | None = None) -> torch.Tensor:
        """``(B,)`` scores of reward ``name`` (the only one when omitted)."""
        return self._output(name).scores

    def valid(self, name: str | None = None) -> torch.Tensor:
        """``(B,)`` bool: the reward judged the sample and its score is finite."""
        out = self._output(name)
        return out.valid & torch.isfinite(out.scores)

    def _output(self, name: str | None):
        if name is None:
            if len(self.outputs) != 1:
                raise ValueError(f"this rollout was scored by {sorted(self.outputs)}: name the reward")
            return next(iter(self.outputs.values()))
        return self.outputs[name]

    def means(self, prefix: str = "") -> dict[str, float]:
        """Mean of every reward and of each of its components over the valid samples, keyed
        ``{prefix}{reward}`` and ``{prefix}{reward}/{component}``, plus ``{prefix}valid_fraction``
        of the first reward."""
        out: dict[str, float] = {}
        for name, o in self.outputs.items():
            out[f"{prefix}{name}"] = nanmean(o.scores, o.valid)
            for comp, values in o.components.items():
                if comp != name:
                    out[f"{prefix}{name}/{comp}"] = nanmean(values, o.valid)
        if self.outputs:
            out[f"{prefix}valid_fraction"] = float(self.valid(next(iter(self.outputs))).float().mean())
        return out


def _cat_outputs(parts: list) -> Any:
    """Concatenate per-batch reward outputs (tensors on dim 0, per-sample extras lists joined); the
    outputs' own class is reused, so this layer needs no import of the rewards package."""
    first = parts[0]
    extras: dict[str, Any] = {}
    for key, value in first.extras.items():
        if isinstance(value, list) and all(isinstance(p.extras.get(key), list) for p in parts):
            extras[key] = [x for p in parts for x in p.extras[key]]
        else:
            extras[key] = [p.extras.get(key) for p in parts]
    return type(first)(
        scores=torch.cat([p.scores.detach().float().cpu() for p in parts]),
        components={k: torch.cat([p.components[k].detach().float().cpu() for p in parts]) for k in first.components},
        valid=torch.cat([p.valid.cpu() for p in parts]),
        extras=extras,
    )


def _calls_per_step(sampler, guidance_scale: float, cond: Conditioning) -> int:
    return 2 if sampler.guidance == "cfg" and guidance_scale > 1.0 and cond.neg is not None else 1


@torch.no_grad()
def collect(
    sampler,
    prompts: Sequence[str],
    rewards: Mapping[str, Callable] | None = None,
    *,
    metadata: Sequence[dict | None] | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    kernel: str = "ode",
    kernel_options: dict | None = None,
    sde_steps: Any = "all",
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    batch_size: int | None = None,
    hooks: Sequence[Any] = (),
    denoiser: Callable | None = None,
    record_means: bool = False,
    record_x0: bool = False,
    keep_trajectory: bool = False,
    keep_images: bool | int = True,
    encode: Callable[[list[str]], Conditioning] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[int, "Rollout"], None] | None = None,
    progress: bool | str = False,
    size: Mapping[str, int] | None = None,
) -> Rollout:
    """Generate one sample per entry of ``prompts``, decode it and score it with every reward.

    Args:
        sampler: a :class:`~visalign.samplers.Sampler`.
        prompts: one prompt per sample (repeat a prompt for several samples of it).
        rewards: ``{name: reward}``; each is called as ``reward(images, prompts, metadata=...)``.
        metadata: per-sample task metadata handed to the rewards (e.g. GenEval's ``tag`` /
            ``include``); ``None`` entries mean "none for this sample".
        num_steps / guidance_scale: default to the model card's (``sampler.default_steps``,
            ``sampler.default_guidance``).
        kernel / kernel_options / sde_steps / hooks / denoiser / record_means / record_x0: as in
            :meth:`Sampler.rollout`.
        seeds: per-sample seeds (sample ``j`` gets its own generator), or
        generator: one generator for all samples, consumed batch after batch.
        latents: initial noise for all samples (e.g. shared within a group); drawn when omitted.
        batch_size: samples per rollout call (default: all at once).
        keep_trajectory: return the recorded trajectory (batches are concatenated).
        keep_images: ``True`` keeps every decoded sample on the CPU, an ``int`` the first N,
            ``False`` none (use ``on_batch`` to consume them as they come).
        encode: a conditioning provider ``encode(prompts) -> Conditioning`` (e.g. a cache);
            defaults to ``sampler.encode``.
        autocast: a context manager factory wrapped around rollout and decode (mixed precision).
        on_batch: ``on_batch(start, batch_rollout)`` after each batch, with that batch's images
            (for writing files as they come).
        progress: a tqdm bar over samples (its description when a string).
        size: ``height`` / ``width`` / ``num_frames`` of the samples.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("collect: no prompts given")
    meta = list(metadata) if metadata is not None else [None] * n
    if len(meta) != n:
        raise ValueError(f"collect: {n} prompts but {len(meta)} metadata entries")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"collect: {n} prompts but {len(seeds)} seeds")
    if seeds is not None and generator is not None:
        raise ValueError("collect: pass seeds (one per sample) or one generator, not both")
    if latents is not None and latents.shape[0] != n:
        raise ValueError(f"collect: {n} prompts but {latents.shape[0]} initial latents")
    steps = num_steps or sampler.default_steps
    guidance = sampler.default_guidance if guidance_scale is None else float(guidance_scale)
    rewards = dict(rewards or {})
    encode = encode or sampler.encode
    batch = batch_size or n
    limit = n if keep_images is True else int(keep_images)

    images: list[torch.Tensor] = []
    trajs: list[Trajectory] = []
    parts: dict[str, list] = {name: [] for name in rewards}
    timings = {"rollout": 0.0, "decode": 0.0, "reward": 0.0}
    calls = 0
    desc = progress if isinstance(progress, str) else "sampling"
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            bp, bm = prompts[start:stop], meta[start:stop]
            gen = [torch.Generator().manual_seed(int(s)) for s in seeds[start:stop]] if seeds is not None else generator
            t0 = time.perf_counter()
            cond = encode(bp)
            with autocast():
                traj = sampler.rollout(cond, num_steps=steps, guidance_scale=guidance, kernel=kernel,
                                       kernel_options=kernel_options, sde_steps=sde_steps, generator=gen,
                                       latents=None if latents is None else latents[start:stop], hooks=hooks,
                                       denoiser=denoiser, record_means=record_means, record_x0=record_x0,
                                       **dict(size or {}))
                t1 = time.perf_counter()
                decoded = sampler.decode(traj.final).float()
            t2 = time.perf_counter()
            calls = steps * _calls_per_step(sampler, guidance, cond)
            batch_meta = bm if any(m is not None for m in bm) else None
            outs = {name: reward(decoded, bp, metadata=batch_meta) for name, reward in rewards.items()}
            t3 = time.perf_counter()
            timings["rollout"] += t1 - t0
            timings["decode"] += t2 - t1
            timings["reward"] += t3 - t2
            for name, out in outs.items():
                parts[name].append(out)
            if keep_trajectory:
                trajs.append(traj)
            kept = sum(x.shape[0] for x in images)
            if kept < limit:
                images.append(decoded[: limit - kept].cpu())
            if on_batch is not None:
                on_batch(start, Rollout(bp, list(bm), None if seeds is None else list(seeds[start:stop]),
                                        decoded, traj if keep_trajectory else None,
                                        {k: v for k, v in outs.items()}, {}, calls))
            bar.update(stop - start)
    return Rollout(
        prompts=prompts,
        metadata=meta,
        seeds=None if seeds is None else [int(s) for s in seeds],
        images=torch.cat(images) if images else None,
        trajectory=(trajs[0] if len(trajs) == 1 else Trajectory.cat(trajs)) if trajs else None,
        outputs={name: _cat_outputs(p) for name, p in parts.items()},
        timings=timings,
        denoiser_calls=calls,
    )
