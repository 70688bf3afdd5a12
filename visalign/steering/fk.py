"""Feynman-Kac steering (Singhal et al. 2025, "A General Framework for Inference-time Scaling and
Steering of Diffusion Models"): ``k`` particles per prompt run a stochastic sampler; at resampling
steps each particle's x0-prediction is scored by a reward ``r_t`` and the particles are resampled
by a potential ``G_t``; a final weight makes the target ``p(x0) exp(lambda r(x0))``.

Potentials (the particle's own history of scores ``r_s`` at the resampling steps ``s <= t``):

- ``difference``: ``G_t = exp(lambda (r_t - r_prev))`` (``r_prev`` = 0 before the first);
- ``max``: ``G_t = exp(lambda max_{s<=t} r_s)``;
- ``sum``: ``G_t = exp(lambda sum_{s<=t} r_s)``;
- ``immediate``: ``G_t = exp(lambda r_t)``.

The running max starts from ``max_start`` (the reference's ``reward_min_value``, 0), so ``max`` is
``exp(lambda max(0, r_1, ..., r_t))`` by default.

Final step: ``G_T = exp(lambda S_T) / prod_t G_t`` over the potentials the particle's ancestry
received.  By default (``final_numerator="potential"``, the reference implementation's
``fkd_class.py``) ``S_T`` is the potential's own statistic with the final reward ``r_T = r(x0)``
included: the running max ``max(max_start, r_1, ..., r_T)`` for ``max``, the running sum
``r_1 + ... + r_T`` for ``sum``, ``r_T`` for ``difference`` and ``immediate``.  With
``final_numerator="reward"``, ``S_T = r(x0)`` for every potential, so that the product of all
potentials along any path is ``exp(lambda r(x0))`` and the weighted particles target
``p(x0) exp(lambda r(x0))`` exactly (for ``difference`` and ``immediate`` the two coincide).

This is standard sequential Monte Carlo: each particle carries a log-weight; potentials add to it;
resampling (multinomial, stratified or systematic) draws ancestors by the normalised weights and
resets them.  ``adaptive=True`` resamples only where the effective sample size ``1 / sum w^2`` is
below ``ess_threshold * k``; the carried weights keep the estimate exact in between.  A guided
proposal (reward-gradient guidance, ``guidance.py``) adds ``log p(x'|x) - log q(x'|x)`` of each
stochastic step to the weight, so the target stays the same.

The method is a rollout hook (:class:`FKHook`): it works on every family and kernel; the batch is
``prompts x k`` particles, the groups of ``k`` consecutive rows never mix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .common import Compute, CountingDenoiser, SteerCall, Steered, SteerResult, lookahead_x0, nan_invalid, score_latents
from .guidance import GuidanceConfig, RewardGuidance, needs_gradient
from .resampling import SCHEMES, ess, normalise, resample

__all__ = ["FKConfig", "FKHook", "fk_steer", "run_fk", "POTENTIALS", "default_kernel"]

POTENTIALS = ("difference", "max", "sum", "immediate")
SELECT = ("best", "weighted")
FINAL_NUMERATORS = ("potential", "reward")


@dataclass
class FKConfig:
    """FK steering settings (``fk:`` in a steering recipe).  Defaults are the reference
    implementation's run script (100 DDIM steps: resample every 5 steps in [5, 30] and at the end)."""

    #: lambda: inverse temperature of the target p(x0) exp(lambda r(x0))
    lam: float = 10.0
    #: difference, max, sum or immediate (module docstring)
    potential: str = "difference"
    #: the max potential's running max starts from this value (the reference's reward_min_value, 0);
    #: null starts it from the particle's first score (no floor, for rewards that are often negative)
    max_start: float | None = 0.0
    #: multinomial, stratified or systematic
    resampling: str = "multinomial"
    #: resample at steps start, start + every, ... <= end (step indices, 0-based), then at the end
    resample_every: int = 5
    resample_start: int = 5
    resample_end: int | None = 30
    #: resample only where ESS < ess_threshold * k (weights are carried otherwise)
    adaptive: bool = False
    ess_threshold: float = 0.5
    #: apply the final weight exp(lambda S_T) / prod G_t and resample if ESS < ess_threshold * k
    final_resample: bool = True
    #: S_T of the final weight: potential (the reference's: the potential's statistic with r(x0)
    #: included, the running max for max, the running sum for sum) or reward (S_T = r(x0) for every
    #: potential: the exact target p(x0) exp(lambda r(x0))); difference and immediate: the same
    final_numerator: str = "potential"
    #: score a few-step ODE look-ahead (this many denoiser calls per particle) instead of the
    #: one-step x0-prediction (0)
    lookahead: int = 0
    #: the returned image: best (highest final reward, the reference's choice) or weighted (one
    #: particle drawn by the final weights: a sample of the tilted target)
    select: str = "best"
    #: particles decoded and scored per reward call (None = all of a batch); bounds memory for video
    score_batch_size: int | None = None
    #: with a guided proposal, weight by the base over the guided transition density (exact target)
    proposal_correction: bool = True
    #: take the last step with the ODE (no noise in the returned image, as DDIM's last step with
    #: alpha_prev = 1 in the reference); false keeps the kernel's noise on the last step too
    ode_last_step: bool = True

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise ValueError(f"fk.potential must be one of {list(POTENTIALS)}, got {self.potential!r}")
        if self.resampling not in SCHEMES:
            raise ValueError(f"fk.resampling must be one of {sorted(SCHEMES)}, got {self.resampling!r}")
        if self.select not in SELECT:
            raise ValueError(f"fk.select must be one of {list(SELECT)}, got {self.select!r}")
        if self.final_numerator not in FINAL_NUMERATORS:
            raise ValueError(f"fk.final_numerator must be one of {list(FINAL_NUMERATORS)}, got {self.final_numerator!r}")
        if self.resample_every < 1:
            raise ValueError(f"fk.resample_every must be >= 1 (steps between resamplings), got {self.resample_every}")
        if self.resample_start < 0 or (self.resample_end is not None and self.resample_end < self.resample_start):
            raise ValueError(f"fk: resample window [{self.resample_start}, {self.resample_end}] is empty; "
                             "set resample_end >= resample_start (or null for the last step)")
        if not 0 < self.ess_threshold <= 1:
            raise ValueError(f"fk.ess_threshold is a fraction of k in (0, 1], got {self.ess_threshold}")
        if self.lookahead < 0:
            raise ValueError(f"fk.lookahead is a number of ODE steps >= 0, got {self.lookahead}")
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise ValueError(f"fk.score_batch_size must be >= 1 or null, got {self.score_batch_size}")

    def resample_steps(self, num_steps: int) -> list[int]:
        """Intermediate resampling steps (after step ``i``, 0-based) for a ``num_steps`` rollout; the
        final step is handled by the final weight."""
        end = num_steps - 2 if self.resample_end is None else min(self.resample_end, num_steps - 2)
        return list(range(self.resample_start, end + 1, self.resample_every))


def default_kernel(sampler) -> str:
    """FK's stochastic kernel by default: Flow-GRPO's SDE for flow models, DDIM eta = 1 for eps / v."""
    return "flow_sde" if sampler.parameterization == "flow" else "ddim"


def _gaussian_dims(kernel: str, kernel_options: dict, latents_shape) -> int:
    """Dimensions over which the kernel's log-prob is averaged (it is a mean; the ratio needs a sum)."""
    n = 1
    for d in latents_shape[1:]:
        n *= int(d)
    if kernel == "flow_sde" and int(kernel_options.get("noise_pool", 1)) != 1:
        f = int(kernel_options["noise_pool"])
        return n // (f * f)
    return n


def _check_correctable(kernel: str, kernel_options: dict) -> None:
    if kernel == "flow_cps" and kernel_options.get("log_prob_type", "mse") != "gaussian":
        raise ValueError("fk.proposal_correction needs transition densities; flow_cps scores with the reference's "
                         "mse surrogate by default: set kernel_options {log_prob_type: gaussian}, use flow_sde, or "
                         "set fk.proposal_correction: false")
    if kernel == "ode":
        raise ValueError("FK steering needs a stochastic kernel (flow_sde / flow_cps for flow models, ddim for eps / v); "
                         "got kernel 'ode'")


class FKHook:
    """The rollout hook that scores, weights and resamples particles (module docstring).

    One instance serves every batch of a :func:`~visalign.samplers.collect` call: a batch starts at
    step 0, and batches come in order, so row ``b`` of a batch is particle ``b % k`` of job
    ``(start + b) // k``.  After the rollout, :meth:`finalize` applies the final weight.
    """

    def __init__(self, sampler, reward: Callable, config: FKConfig, k: int, num_steps: int, *,
                 metadata: Sequence[dict | None], denoiser: Callable, compute: Compute, seed: int = 0,
                 proposal: RewardGuidance | None = None, kernel: str = "flow_sde", kernel_options: dict | None = None,
                 keep_history: bool = False) -> None:
        self.sampler, self.reward, self.config, self.k = sampler, reward, config, int(k)
        self.num_steps = num_steps
        self.steps = set(config.resample_steps(num_steps))
        self.metadata = list(metadata)
        self.denoiser, self.compute, self.seed = denoiser, compute, int(seed)
        self.proposal = proposal
        self.kernel, self.kernel_options = kernel, dict(kernel_options or {})
        self.keep_history = keep_history
        self._next = 0

    # ---- per batch state ---------------------------------------------------------------------
    def _reset(self, b: int) -> None:
        if b % self.k:
            raise ValueError(f"FK: a batch of {b} rows is not a whole number of groups of k = {self.k} particles")
        self.start, self._next = self._next, self._next + b
        g = b // self.k
        self.log_w = torch.zeros(g, self.k, dtype=torch.float64)
        self.log_applied = torch.zeros(b, dtype=torch.float64)
        self.r_prev = torch.zeros(b, dtype=torch.float64)
        start = -torch.inf if self.config.max_start is None else float(self.config.max_start)
        self.r_max = torch.full((b,), start, dtype=torch.float64)
        self.r_sum = torch.zeros(b, dtype=torch.float64)
        self.events: list[dict] = []
        self.history: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
        self.gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + (self.start // self.k) + j) for j in range(g)]

    @property
    def groups(self) -> int:
        return self.log_w.shape[0]

    @staticmethod
    def _clean(r: torch.Tensor) -> torch.Tensor:
        """Invalid scores (NaN) count as the lowest valid score of the batch (0 when none is valid)."""
        r = r.to(torch.float64)
        bad = ~torch.isfinite(r)
        if bad.any():
            floor = r[~bad].min() if (~bad).any() else torch.tensor(0.0, dtype=torch.float64)
            r = torch.where(bad, floor, r)
        return r

    def _log_potential(self, r: torch.Tensor) -> torch.Tensor:
        lam, p = float(self.config.lam), self.config.potential
        if p == "difference":
            out = lam * (r - self.r_prev)
        elif p == "max":
            self.r_max = torch.maximum(self.r_max, r)
            out = lam * self.r_max
        elif p == "sum":
            self.r_sum = self.r_sum + r
            out = lam * self.r_sum
        else:
            out = lam * r
        self.r_prev = r
        return out

    def _final_statistic(self, r: torch.Tensor) -> torch.Tensor:
        """``S_T`` of the final weight ``exp(lambda S_T) / prod G_t`` for final rewards ``r``."""
        p = self.config.potential
        if self.config.final_numerator == "reward" or p in ("difference", "immediate"):
            return r
        if p == "max":
            return torch.maximum(self.r_max, r)
        return self.r_sum + r

    def _proposal_log_ratio(self, state) -> torch.Tensor:
        """``log p(x_{i+1} | x_i) - log q(x_{i+1} | x_i)`` per row: base over guided transition."""
        from visalign.samplers.kernels import get_kernel

        i, x_prev, base_pred = self.proposal.last
        if i != state.i:
            raise RuntimeError("FK: the guided proposal's record is not from this step")
        kern = get_kernel(self.kernel, self.sampler.parameterization)
        base = kern(base_pred, x_prev, state.schedule, i, prev_sample=state.latents, **self.kernel_options)
        dims = _gaussian_dims(self.kernel, self.kernel_options, state.latents.shape)
        return ((base.log_prob.double() - state.step.log_prob.double()) * dims).cpu()

    def _reorder(self, idx: torch.Tensor) -> None:
        for name in ("log_applied", "r_prev", "r_max", "r_sum"):
            setattr(self, name, getattr(self, name)[idx])
        self.history = [(label, None if im is None else im[idx], sc[idx]) for label, im, sc in self.history]

    def _resample(self, step: int | str, final: bool = False) -> torch.Tensor | None:
        """Resample the groups that need it; returns the global row indices or None (no change)."""
        w = normalise(self.log_w)
        e = ess(w)
        k = self.k
        do = e < self.config.ess_threshold * k if (self.config.adaptive or final) else torch.ones_like(e, dtype=torch.bool)
        local = torch.arange(k).expand(self.groups, k).clone()
        for j in torch.nonzero(do).flatten().tolist():
            local[j] = resample(w[j], self.config.resampling, self.gens[j])
        self.events.append({"step": step, "ess": e.tolist(), "parents": local.tolist(), "resampled": do.tolist()})
        if not do.any():
            return None
        self.log_w[do] = 0.0
        idx = (local + torch.arange(self.groups).unsqueeze(1) * k).flatten()
        self._reorder(idx)
        return idx

    # ---- the hook ----------------------------------------------------------------------------
    def after_step(self, state):
        from visalign.samplers import HookResult

        b = state.latents.shape[0]
        if state.i == 0:
            self._reset(b)
        if self.proposal is not None and self.config.proposal_correction and state.step.log_prob is not None:
            self.log_w += self._proposal_log_ratio(state).view(self.groups, self.k)
        if state.i not in self.steps:
            return None
        if self.config.lookahead:
            x0 = lookahead_x0(self.denoiser, state.latents, state.schedule, state.i + 1, self.config.lookahead, state.cond)
        else:
            x0 = state.step.x0
        meta = self.metadata[self.start:self.start + b]
        r, images = score_latents(self.sampler, self.reward, x0, state.prompts, meta, self.config.score_batch_size,
                                  keep=self.keep_history)
        self.compute.reward_calls += b
        r = self._clean(r)
        if self.keep_history:
            self.history.append((f"step {state.i + 1}", images, r.float()))
        idx = self.weigh(r, state.i)
        return None if idx is None else HookResult(indices=idx.to(state.latents.device))

    def weigh(self, r: torch.Tensor, step: int) -> torch.Tensor | None:
        """Multiply the potential of the scores ``r (B,)`` after step ``step`` into the weights and
        resample; returns the row indices of the new particles, or None (no change)."""
        log_g = self._log_potential(r.to(torch.float64))
        self.log_w += log_g.view(self.groups, self.k)
        self.log_applied += log_g
        return self._resample(step)

    def finalize(self, scores: torch.Tensor, images: torch.Tensor | None) -> dict:
        """The final weight and selection for the batch that just finished.

        Returns ``order (B,)`` (final row order after the final resampling), ``chosen (G,)`` (index
        within each group), ``rewards (B,)`` and ``weights (G, k)`` in that order."""
        r = self._clean(scores)
        log_final = float(self.config.lam) * self._final_statistic(r) - self.log_applied
        self.log_w += log_final.view(self.groups, self.k)
        if self.keep_history:
            self.history.append(("final", images, r.float()))
        order = torch.arange(r.shape[0])
        if self.config.final_resample:
            idx = self._resample("final", final=True)
            if idx is not None:
                order, r = idx, r[idx]
        w = normalise(self.log_w)
        if self.config.select == "best":
            chosen = r.view(self.groups, self.k).argmax(1)
        else:
            chosen = torch.stack([torch.multinomial(w[j], 1, generator=self.gens[j])[0] for j in range(self.groups)])
        return {"order": order, "chosen": chosen, "rewards": r.float(), "weights": w.float()}

    def lineage(self, group: int) -> tuple[list[dict], list[int]]:
        """The resampling events of one group, and each final particle's initial particle."""
        events = [{"step": ev["step"], "ess": round(float(ev["ess"][group]), 4), "resampled": bool(ev["resampled"][group]),
                   "parents": ev["parents"][group]} for ev in self.events]
        origin = list(range(self.k))
        for ev in reversed(events):
            origin = [ev["parents"][o] for o in origin]
        return events, origin


def run_fk(sampler, reward: Callable, config: FKConfig | None, call: SteerCall, *, proposal: GuidanceConfig | None = None,
           proposal_reward: Callable | None = None) -> SteerResult:
    """FK steering of one image per prompt of ``call``, ``call.particles`` particles each.

    ``call.kernel`` must be stochastic (:func:`default_kernel` is FK's default); resampling draws
    from its own generator per image.

    Args:
        reward (`Callable`): the potential's reward, ``reward(images, prompts, metadata=...)``; any
            reward (no gradient needed), batched.
        config (`FKConfig`, *optional*): potential, lambda, resampling schedule (defaults: the reference's).
        proposal (`GuidanceConfig`, *optional*): reward-gradient guidance as the proposal ("FK + guidance");
            its reward is ``proposal_reward`` (defaults to ``reward``; it must be differentiable).
    """
    from visalign.samplers import collect

    config = config or FKConfig()
    k, prompts, meta, seed, steps = call.particles, call.prompts, call.metadata, call.seed, call.num_steps
    keep_history, keep_particles = call.keep_history, call.keep_particles
    kernel, kernel_options = call.kernel, call.kernel_options
    _check_correctable(kernel, kernel_options if (proposal is not None and config.proposal_correction) else {"log_prob_type": "gaussian"})
    compute = Compute()
    base = CountingDenoiser(sampler, call.guidance_scale)
    wrapper = None
    if proposal is not None:
        g_reward = proposal_reward or reward
        needs_gradient(g_reward, "FK + guidance (the guided proposal)")
        wrapper = RewardGuidance(base, sampler, g_reward, proposal)
    rows_meta = call.rows_metadata
    hook = FKHook(sampler, reward, config, k, steps, metadata=rows_meta, denoiser=base, compute=compute, seed=seed,
                  proposal=wrapper, kernel=kernel, kernel_options=kernel_options, keep_history=keep_history)
    items: list[Steered] = []
    done = [0]

    def finish(start: int, batch) -> None:
        scores = nan_invalid(batch.outputs["reward"])
        images = batch.images.float().cpu()
        res = hook.finalize(scores, images if keep_history else None)
        images = images[res["order"]]
        compute.reward_calls += scores.shape[0]
        for g in range(images.shape[0] // k):
            j = start // k + g
            events, origin = hook.lineage(g)
            c = int(res["chosen"][g])
            rows = slice(g * k, (g + 1) * k)
            rw = res["rewards"][rows]
            item = Steered(
                prompt=prompts[j], metadata=meta[j], image=images[g * k + c], reward=float(rw[c]), chosen=c,
                particle_rewards=[float(v) for v in rw], seeds=[seed + j * k + q for q in range(k)],
                lineage=events, particles=images[rows].clone() if keep_particles else None,
                history=[(lab, None if im is None else im[rows], sc[rows]) for lab, im, sc in hook.history] if keep_history else None,
                extra={"origin": origin, "final_weights": [round(float(v), 6) for v in res["weights"][g]]},
            )
            done[0] += 1
            call.deliver(items, j, item)

    rows = call.rows
    seeds = [seed + j * k + q for j in range(len(prompts)) for q in range(k)]
    sde_steps = list(range(steps - 1)) if config.ode_last_step else "all"
    collect(sampler, rows, {"reward": _Scorer(reward, config.score_batch_size)}, metadata=rows_meta, num_steps=steps,
            guidance_scale=call.guidance_scale, kernel=kernel, kernel_options=kernel_options, sde_steps=sde_steps,
            seeds=seeds, batch_size=call.batch_size, hooks=[hook], denoiser=wrapper or base, keep_images=False,
            on_batch=finish, progress="fk" if call.progress is True else call.progress, size=call.size)
    compute.denoiser_calls = base.calls
    if wrapper is not None:
        compute.grad_calls = wrapper.grad_calls
        compute.reward_calls += wrapper.reward_calls
    settings = {**call.settings(), "fk": asdict(config), "resample_steps": sorted(hook.steps),
                "reward_guidance": None if proposal is None else asdict(proposal)}
    return SteerResult("fk" if proposal is None else "fk+guidance", items, compute.per_image(done[0]), settings)


def fk_steer(sampler, prompts: Sequence[str], reward: Callable, config: FKConfig | None = None, *, particles: int = 4,
             proposal: GuidanceConfig | None = None, proposal_reward: Callable | None = None,
             **shared) -> SteerResult:
    """FK steering of one image per entry of ``prompts`` (repeat a prompt for several).

    Args:
        sampler (`Sampler`): any family.
        prompts (`Sequence[str]`): one steered image per entry.
        reward (`Callable`): the potential's reward, ``reward(images, prompts, metadata=...)``; any
            reward (no gradient needed), batched.
        config (`FKConfig`, *optional*): potential, lambda, resampling schedule (defaults: the reference's).
        particles (`int`, *optional*, defaults to 4): ``k``.
        proposal / proposal_reward: as in :func:`run_fk`.
        shared: the settings every method shares, :meth:`~visalign.steering.common.SteerCall.resolve`'s:
            ``metadata`` (per-prompt task metadata handed to the reward, e.g. GenEval's ``include``),
            ``num_steps`` / ``guidance_scale`` (default to the model card's), ``kernel`` (a stochastic
            kernel; defaults to ``flow_sde`` (flow) or ``ddim`` (eps / v)), ``kernel_options``,
            ``seed`` (particle ``q`` of image ``j`` draws its noise from seed ``seed + j * k + q``, the
            seeds best-of-N uses for its candidates), ``prompts_per_batch`` (images steered per
            rollout; the batch is this times ``k``), ``keep_history`` / ``keep_particles`` (keep the
            decoded particles at each resampling step / at the end), ``on_item`` (``on_item(j,
            Steered)`` as each image is done; the result's ``items`` then stay empty), ``progress``,
            ``size`` (``height`` / ``width`` / ``num_frames``).
    """
    call = SteerCall.resolve(sampler, prompts, particles=particles, default_kernel=default_kernel(sampler), **shared)
    return run_fk(sampler, reward, config, call, proposal=proposal, proposal_reward=proposal_reward)


class _Scorer:
    """A reward called in chunks of ``chunk`` images by collect's final scoring (bounded memory)."""

    def __init__(self, reward: Callable, chunk: int | None) -> None:
        self.reward, self.chunk = reward, chunk

    def __call__(self, images, prompts, metadata=None):
        if not self.chunk or images.shape[0] <= self.chunk:
            return self.reward(images, prompts, metadata=metadata)
        outs = [self.reward(images[s:s + self.chunk], prompts[s:s + self.chunk],
                            metadata=None if metadata is None else metadata[s:s + self.chunk])
                for s in range(0, images.shape[0], self.chunk)]
        return type(outs[0])(scores=torch.cat([o.scores.detach() for o in outs]),
                             valid=torch.cat([o.valid for o in outs]))
