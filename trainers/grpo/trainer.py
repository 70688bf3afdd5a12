"""``GRPOTrainer``: Flow-GRPO (Liu et al. 2025) for flow models and DDPO (Black et al. 2023) for
eps / v models, one trainer on the Sampler contract and the trainer floor.

One iteration (:meth:`GRPOTrainer.train_step`):

1. **rollout**: ``G`` samples per prompt on the SDE kernel (``flow_sde`` / ``flow_cps`` /
   ``ddim``), stochastic on the chosen steps; latents (float32) and log-probs recorded;
2. **reward**: decode and score; invalid / NaN samples are masked out;
3. **advantages**: group-relative, ``(r - mean_group) / (std + 1e-4)`` clamped;
4. **update**: for each inner epoch and optimizer step, for each micro-batch and trained step ``t``:
   ``ratio = exp(logp_theta - logp_old)``, ``loss = mean(max(-A ratio, -A clip(ratio, 1 - eps,
   1 + eps))) + beta KL``, ``KL = ||mu_theta - mu_ref||^2 / (2 kl_std_t^2)`` with the reference
   under ``sampler.reference()`` and ``kl_std_t`` the reference implementation's ``std_dev_t``;
   the unconditional CFG branch is detached when recomputing (Flow-GRPO).

Steps 1-3 are :class:`~visalign.trainers.group.GroupTrainer`'s; the optimizer step,
EMA, evaluation and checkpoints are the base's.  The equations, every deviation from the
reference implementations and the logged metrics are in docs/grpo.md.
"""

from __future__ import annotations

import time

import torch

from visalign.samplers import RandomWindow, Trajectory

from ..base import TrainingStopped
from ..group import GroupBatch, GroupTrainer
from .config import GRPOConfig

__all__ = ["GRPOTrainer", "TrainingStopped"]


class GRPOTrainer(GroupTrainer):
    """Group-relative policy optimisation on any Sampler (see the module docstring).

    Args: as :class:`~visalign.trainers.group.GroupTrainer`, with a :class:`GRPOConfig`.
    """

    algorithm = "grpo"

    def __init__(self, sampler, rewards, config: GRPOConfig, **kwargs) -> None:
        if sampler.parameterization == "flow" and config.kernel == "ddim":
            raise ValueError(f"{sampler.family} is a flow model: set kernel to flow_sde or flow_cps")
        if sampler.parameterization != "flow" and config.kernel != "ddim":
            raise ValueError(f"{sampler.family} is an {sampler.parameterization}-prediction model: set kernel: ddim")
        super().__init__(sampler, rewards, config, **kwargs)

    @property
    def steps_per_iteration(self) -> int:  # the LR schedule's nominal clock
        return max(1, self.config.inner_epochs)

    # ---- 1-3: rollout, reward, advantages ----------------------------------------------------
    def _sde_steps(self, it: int):
        c = self.config
        if c.sde_mode == "all":
            return "all"
        if c.sde_mode == "window":
            return list(range(c.sde_window_start, c.sde_window_start + c.sde_window_size))
        if c.sde_mode == "random":
            return RandomWindow(c.sde_window_size, c.sde_window_start,
                                c.num_steps if c.sde_window_end is None else c.sde_window_end)
        span = c.num_steps - c.sde_window_size + 1
        start = (c.sde_window_start + it // c.sde_window_shift_every) % span
        return list(range(start, start + c.sde_window_size))

    def rollout_options(self, it: int, n_prompts: int, generator: torch.Generator) -> dict:
        c = self.config
        latents = None
        if c.shared_noise:  # one draw per prompt, repeated over its group
            latents = self.sampler.noise(n_prompts, generator, **self.size).repeat_interleave(c.group_size, 0)
        return {"kernel": c.kernel, "kernel_options": c.kernel_options(), "sde_steps": self._sde_steps(it),
                "latents": latents, "record_means": True}

    def collect(self, it: int) -> GroupBatch:
        """Steps 1-3 for iteration ``it`` (see :meth:`GroupTrainer.collect_groups`)."""
        return self.collect_groups(it)

    # ---- 4: update -----------------------------------------------------------------------------
    def _trained_steps(self, traj: Trajectory, gen: torch.Generator) -> list[int]:
        steps = traj.sde_steps
        if self.config.skip_last_step:
            steps = [s for s in steps if s != self.config.num_steps - 1]
        if not steps:
            raise ValueError("no trainable step: the SDE window holds only the last step; move sde_window_start "
                             "or set skip_last_step: false")
        k = max(1, round(self.config.train_step_fraction * len(steps)))
        if k < len(steps):
            pick = torch.randperm(len(steps), generator=gen)[:k].sort().values.tolist()
            steps = [steps[i] for i in pick]
        return steps

    def _step_loss(self, sub: Trajectory, t: int, adv: torch.Tensor,
                   kl_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-sample loss ``(b,)`` at step ``t`` and its statistics; ``kl_weight (b,)`` gates the KL
        term per sample (``guards.kl_gate_quantile``)."""
        c = self.config
        with self.acc.autocast():
            new = self.sampler.log_prob(sub, steps=[t], detach_uncond=c.detach_uncond)
        logp = new.log_prob[:, 0]
        ratio = torch.exp(logp - sub.log_probs[:, t])
        clipped = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        kl = torch.zeros_like(pg)
        if c.kl_beta > 0:
            kl_std = new.kl_std[0].float()
            if not float(kl_std) > 0:
                raise ValueError(f"step {t} has no noise (kl_std 0), so its KL to the reference is undefined; "
                                 "set skip_last_step: true or kl_beta: 0")
            with torch.no_grad(), self.sampler.reference(), self.acc.autocast():
                ref = self.sampler.log_prob(sub, steps=[t])
            diff = (new.mean[:, 0] - ref.mean[:, 0]) ** 2
            kl = diff.flatten(1).mean(1) / (2 * kl_std**2)
        if kl_weight is not None:
            kl = kl * kl_weight.to(kl.device)
        loss = pg + c.kl_beta * kl
        stats = {"ratio": ratio.detach(), "kl": kl.detach(), "pg": pg.detach(),
                 "clipped": ((ratio - 1).abs() > c.clip_range).detach().float()}
        return loss, stats

    def update(self, batch: GroupBatch, it: int) -> dict:
        traj, adv = batch.traj, batch.advantages
        steps = self._trained_steps(traj, batch.generator)

        def terms(mb):
            sub = traj[mb.to(traj.latents.device)]
            a = adv[mb].to(self.sampler.device)
            w = None if batch.kl_weight is None else batch.kl_weight[mb]
            for t in steps:
                yield self._step_loss(sub, t, a, w)

        t0 = time.perf_counter()
        out = self.minibatch_updates(torch.nonzero(batch.keep).flatten(), batch.generator, len(steps), terms)
        st = out.pop("stats")
        ratio = st.get("ratio", torch.zeros(0))
        mean = lambda k: float(st[k].mean()) if ratio.numel() else float("nan")  # noqa: E731
        return {
            "loss": out["loss"], "grad_norm": out["grad_norm"],
            "ratio/mean": mean("ratio"),
            "ratio/min": float(ratio.min()) if ratio.numel() else float("nan"),
            "ratio/max": float(ratio.max()) if ratio.numel() else float("nan"),
            "clip_fraction": mean("clipped"), "kl": mean("kl"), "policy_loss": mean("pg"),
            "optimizer_steps": out["optimizer_steps"], "skipped_steps": out["skipped_steps"],
            "trained_steps": len(steps), "time/train": time.perf_counter() - t0,
        }

    def train_step(self, it: int) -> dict:
        batch = self.collect(it)
        train = self.update(batch, it)
        return {**self.reward_metrics(batch), **train}
