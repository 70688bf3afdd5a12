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

from .common import Compute, CountingDenoiser, Steered, SteerResult

__all__ = ["SearchConfig", "noise_search"]


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


def noise_search(sampler, prompts: Sequence[str], reward: Callable, config: SearchConfig | None = None, *,
                 candidates: int = 4, metadata: Sequence[dict | None] | None = None, num_steps: int | None = None,
                 guidance_scale: float | None = None, kernel: str = "ode", kernel_options: dict | None = None,
                 seed: int = 0, prompts_per_batch: int | None = None, keep_history: bool = False,
                 keep_particles: bool = False, on_item: Callable[[int, Steered], None] | None = None,
                 progress: bool | str = False, size: dict | None = None) -> SteerResult:
    """Zero-order noise search for each entry of ``prompts`` (module docstring).

    Image ``j`` draws its pivot and perturbations from ``torch.Generator().manual_seed(seed + j)``.
    Other arguments as in :func:`~visalign.steering.best_of_n.best_of_n`.
    """
    from visalign.samplers import collect

    config = config or SearchConfig()
    n = int(candidates)
    if n < 1:
        raise ValueError(f"noise search needs candidates (particles) >= 1, got {candidates}")
    prompts = list(prompts)
    meta = list(metadata) if metadata is not None else [None] * len(prompts)
    steps = num_steps or sampler.default_steps
    guidance = sampler.default_guidance if guidance_scale is None else float(guidance_scale)
    size = dict(size or {})
    compute = Compute()
    base = CountingDenoiser(sampler, guidance)
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

        rows = [p for p in prompts for _ in range(n)]
        collect(sampler, rows, {"reward": reward}, metadata=[m for m in meta for _ in range(n)], num_steps=steps,
                guidance_scale=guidance, kernel=kernel, kernel_options=kernel_options, latents=latents,
                seeds=[seed + r * len(rows) + i for i in range(len(rows))],
                batch_size=(prompts_per_batch or len(prompts)) * n, denoiser=base, keep_images=False, on_batch=take,
                progress=f"search round {r + 1}" if progress else False, size=size)
        compute.reward_calls += latents.shape[0]
    items = []
    for j in range(len(prompts)):
        item = Steered(prompt=prompts[j], metadata=meta[j], image=best_images[j],
                       reward=float(best[j]) if math.isfinite(float(best[j])) else float("nan"),
                       chosen=found[j]["chosen"], particle_rewards=found[j]["scores"], seeds=[seed + j],
                       lineage=rounds[j], particles=keep[j], history=history[j] if keep_history else None,
                       extra={"best_round": found[j]["round"]})
        if on_item is not None:
            on_item(j, item)
        else:
            items.append(item)
    compute.denoiser_calls = base.calls
    settings = {"particles": n, "num_steps": steps, "guidance_scale": guidance, "kernel": kernel,
                "kernel_options": dict(kernel_options or {}), "seed": seed, "search": asdict(config)}
    return SteerResult("search", items, compute.per_image(len(prompts)), settings)
