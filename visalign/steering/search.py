"""Zero-order search over initial noises (Ma et al. 2025, "Inference-time scaling for diffusion
models beyond scaling denoising steps", sec. 3.2): a verifier scores candidates; each round
perturbs the best noise so far (the pivot) into ``N`` neighbours, generates them and keeps the best.

Neighbours are drawn variance-preserving, ``n' = sqrt(1 - rho^2) n + rho z`` with ``z ~ N(0, I)``,
so every candidate is itself a standard Gaussian draw and ``rho = 1`` is plain random search
(the paper samples on a sphere of radius ``lambda`` around the pivot; see docs/steering.md).
Round 1 evaluates the pivot and ``N - 1`` neighbours; later rounds ``N`` neighbours of the best so
far, so the compute is ``rounds x N`` rollouts plus as many verifier calls per image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .common import Compute, CountingDenoiser, SteerCall, Steered, SteerResult

__all__ = ["SearchConfig", "noise_search", "run_search"]


@dataclass
class SearchConfig:
    """Noise-search settings (``search:`` in a steering recipe); candidates per round = particles."""

    #: search rounds (round 1 includes the pivot itself)
    rounds: int = 2
    #: rho in (0, 1]: how far a neighbour is from the pivot (1 = an independent noise)
    radius: float = 0.5

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"search.rounds must be >= 1, got {self.rounds}")
        if not 0 < self.radius <= 1:
            raise ValueError(f"search.radius (rho) must be in (0, 1], got {self.radius}")


def run_search(sampler, reward: Callable, config: SearchConfig | None, call: SteerCall) -> SteerResult:
    """Zero-order noise search for each prompt of ``call`` (module docstring), ``call.particles``
    candidates per round.

    Image ``j`` draws its pivot and perturbations from ``torch.Generator().manual_seed(seed + j)``.
    """
    from visalign.samplers import collect

    config = config or SearchConfig()
    n, prompts, meta, seed, size = call.particles, call.prompts, call.metadata, call.seed, call.size
    keep_history, keep_particles = call.keep_history, call.keep_particles
    compute = Compute()
    base = CountingDenoiser(sampler, call.guidance_scale)
    gens = [torch.Generator().manual_seed(seed + j) for j in range(len(prompts))]
    pivots = torch.cat([sampler.noise(1, g, **size).float().cpu() for g in gens])  # (J, ...)
    best = torch.full((len(prompts),), -math.inf)
    best_images: list[torch.Tensor | None] = [None] * len(prompts)
    rounds: list[list[dict]] = [[] for _ in prompts]
    history: list[list] = [[] for _ in prompts]
    keep: list[torch.Tensor | None] = [None] * len(prompts)
    found: list[dict] = [{} for _ in prompts]  # where each image's best candidate was found
    a, b = math.sqrt(1 - config.radius ** 2), config.radius
    for r in range(config.rounds):
        cand = []
        for j, g in enumerate(gens):
            z = torch.cat([sampler.noise(1, g, **size).float().cpu() for _ in range(n)])
            c = a * pivots[j:j + 1] + b * z
            if r == 0:
                c[0] = pivots[j]
            cand.append(c)
        latents = torch.cat(cand)  # (J * n, ...)
        scores_all = torch.empty(latents.shape[0])

        def take(start: int, batch, latents=latents, scores_all=scores_all, r=r) -> None:
            out = batch.outputs["reward"]
            s = out.scores.detach().float().cpu().clone()
            s[~out.valid.cpu()] = float("nan")
            scores_all[start:start + s.shape[0]] = s
            images = batch.images.float().cpu()
            for gi in range(s.shape[0] // n):
                j = start // n + gi
                rows = slice(gi * n, (gi + 1) * n)
                sj = torch.nan_to_num(s[rows], nan=-math.inf)
                c = int(sj.argmax())
                improved = bool(sj[c] > best[j])
                rounds[j].append({"round": r + 1, "scores": [float(v) for v in s[rows]], "best": c, "improved": improved})
                if improved or best_images[j] is None:
                    best[j] = sj[c]
                    best_images[j] = images[gi * n + c]
                    pivots[j] = latents[j * n + c]
                    found[j] = {"round": r + 1, "chosen": c, "scores": [float(v) for v in s[rows]]}
                if keep_history:
                    history[j].append((f"round {r + 1}", images[rows], s[rows]))
                if keep_particles:
                    keep[j] = images[rows].clone()

        rows = call.rows
        collect(sampler, rows, {"reward": reward}, metadata=call.rows_metadata, num_steps=call.num_steps,
                guidance_scale=call.guidance_scale, kernel=call.kernel, kernel_options=call.kernel_options,
                latents=latents, seeds=[seed + r * len(rows) + i for i in range(len(rows))],
                batch_size=call.batch_size, denoiser=base, keep_images=False, on_batch=take,
                progress=f"search round {r + 1}" if call.progress else False, size=size)
        compute.reward_calls += latents.shape[0]
    items = []
    for j in range(len(prompts)):
        item = Steered(prompt=prompts[j], metadata=meta[j], image=best_images[j],
                       reward=float(best[j]) if math.isfinite(float(best[j])) else float("nan"),
                       chosen=found[j]["chosen"], particle_rewards=found[j]["scores"], seeds=[seed + j],
                       lineage=rounds[j], particles=keep[j], history=history[j] if keep_history else None,
                       extra={"best_round": found[j]["round"]})
        call.deliver(items, j, item)
    compute.denoiser_calls = base.calls
    settings = {**call.settings(), "search": asdict(config)}
    return SteerResult("search", items, compute.per_image(len(prompts)), settings)


def noise_search(sampler, prompts: Sequence[str], reward: Callable, config: SearchConfig | None = None, *,
                 candidates: int = 4, **shared) -> SteerResult:
    """Zero-order noise search for each entry of ``prompts`` (module docstring).

    Args:
        config (`SearchConfig`, *optional*): rounds and radius.
        candidates (`int`, *optional*, defaults to 4): candidates per round.
        shared: the settings every method shares, :meth:`~visalign.steering.common.SteerCall.resolve`'s
            (``kernel`` defaults to ``"ode"``).
    """
    call = SteerCall.resolve(sampler, prompts, particles=candidates, what="noise search's candidates (particles)",
                             **shared)
    return run_search(sampler, reward, config, call)
