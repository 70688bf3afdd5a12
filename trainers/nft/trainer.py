"""``NFTTrainer``: DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement
with Forward Process") for rectified-flow models, on the trainer floor.

One iteration: ``G`` ODE samples per prompt (the eval-time sampler; no log-probs needed), scored
and group-normalised like GRPO; then flow matching on the forward process of those samples.  For
each trained sample ``x0`` and noise level ``s`` (a step of the rollout schedule) with fresh noise
``eps``: ``x_s = (1 - s) x0 + s eps`` (``sampler.add_noise``), target ``u = eps - x0``
(``sampler.training_target``), and with ``r = 0.5 + 0.5 clip(A, -1, 1)``,
``v+ = (1 - b) v_old + b v``, ``v- = (1 + b) v_old - b v`` (eq. 7):

    loss = r |v+ - u|^2 + (1 - r) |v- - u|^2        (means over the latent)

``v_old`` is the sampling policy's velocity (detached).  ``weighting="positive"`` is online
reward-weighted regression instead: ``max(A, 0) |v - u|^2``.  ``kl_beta`` adds a velocity anchor
``kl_beta |v - v_ref|^2`` to the reference under ``sampler.reference()``.  docs/grpo.md describes
the objective and what was measured with it on the toy world.
"""

from __future__ import annotations

import time

import torch

from visalign.samplers import Trajectory

from ..common.groups import GroupBatch, GroupTrainer
from .config import NFTConfig

__all__ = ["NFTTrainer"]


class NFTTrainer(GroupTrainer):
    """DiffusionNFT on any rectified-flow Sampler (see the module docstring)."""

    algorithm = "nft"

    def __init__(self, sampler, rewards, config: NFTConfig, **kwargs) -> None:
        if sampler.parameterization != "flow":
            raise ValueError(f"nft trains rectified-flow models; {sampler.family} is {sampler.parameterization}-"
                             "prediction: use algorithm grpo (DDPO, kernel ddim) or dpo")
        super().__init__(sampler, rewards, config, **kwargs)

    @property
    def steps_per_iteration(self) -> int:
        return max(1, self.config.inner_epochs)

    def _draws(self, traj: Trajectory, trained: torch.Tensor, gen: torch.Generator, single_step: bool) -> dict:
        """The iteration's forward-process draws: the noise levels (steps of the rollout schedule),
        fresh noise per sample and level, and, when the iteration takes more than one optimizer
        step, the sampling policy's velocity ``v_old`` of the ``trained`` samples computed up front."""
        c = self.config
        steps = torch.randperm(c.num_steps, generator=gen)[: c.timesteps].sort().values.tolist()
        x0 = traj.final.float()
        eps = torch.randn((x0.shape[0], len(steps), *x0.shape[1:]), generator=gen).to(x0.device)
        v_old = None
        if not single_step:
            v_old = torch.zeros_like(eps)
            with torch.no_grad(), self.acc.autocast():
                for m0 in range(0, trained.numel(), c.train_batch_size):
                    rows = trained[m0 : m0 + c.train_batch_size]
                    sub = traj[rows.to(traj.latents.device)]
                    for k, t in enumerate(steps):
                        v_old[rows, k] = self._velocity(sub, t, x0[rows], eps[rows, k]).float()
        return {"steps": steps, "x0": x0, "eps": eps, "v_old": v_old}

    def _sigma(self, sub: Trajectory, t: int, x0: torch.Tensor) -> torch.Tensor:
        return sub.schedule.sigmas[t].to(x0.device).float().expand(x0.shape[0])

    def _velocity(self, sub: Trajectory, t: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The velocity that sampled (CFG-guided when the rollout was; ``train_without_cfg`` gives
        DiffusionNFT's CFG-free setting) at ``x_s`` of step ``t``'s noise level."""
        x_t = self.sampler.add_noise(x0, eps, self._sigma(sub, t, x0))
        return self.sampler.denoise(x_t, t, sub.schedule, sub.cond, sub.guidance_scale)

    def _loss(self, sub: Trajectory, k: int, t: int, adv: torch.Tensor, draws: dict, rows: torch.Tensor,
              kl_weight: torch.Tensor | None = None):
        """Per-sample loss ``(b,)`` at the ``k``-th drawn level (step ``t``) and its statistics;
        ``kl_weight (b,)`` gates the velocity anchor per sample (``guards.kl_gate_quantile``)."""
        c = self.config
        x0, eps = draws["x0"][rows], draws["eps"][rows, k]
        with self.acc.autocast():
            v = self._velocity(sub, t, x0, eps).float()
        kl = None
        if c.kl_beta > 0:
            with torch.no_grad(), self.sampler.reference(), self.acc.autocast():
                v_ref = self._velocity(sub, t, x0, eps).float()
            kl = ((v - v_ref) ** 2).flatten(1).mean(1)
        v_old = v.detach() if draws["v_old"] is None else draws["v_old"][rows, k]
        target = self.sampler.training_target(x0, eps, self._sigma(sub, t, x0))
        shape = (-1, *([1] * (v.ndim - 1)))
        if c.weighting == "positive":
            loss = (adv.clamp_min(0).view(shape) * (v - target) ** 2).flatten(1).mean(1)
        else:
            b = c.beta
            r = (0.5 + 0.5 * adv.clamp(-1, 1)).view(shape)
            pos = ((1 - b) * v_old + b * v - target) ** 2
            neg = ((1 + b) * v_old - b * v - target) ** 2
            loss = (r * pos + (1 - r) * neg).flatten(1).mean(1)
        fm = loss.detach()
        if kl is None:  # without the anchor, "kl" logs the drift from the sampling policy
            kl = ((v.detach() - v_old) ** 2).flatten(1).mean(1)
        else:
            if kl_weight is not None:
                kl = kl * kl_weight.to(kl.device)
            loss = loss + c.kl_beta * kl
        return loss, {"kl": kl.detach(), "nft_loss": fm}

    def update(self, batch: GroupBatch, it: int) -> dict:
        c = self.config
        traj, adv, keep = batch.traj, batch.advantages, batch.keep
        if c.weighting == "positive":
            keep = keep & (adv > 0)  # the rest have weight 0: skip their compute
        idx_all = torch.nonzero(keep).flatten()
        single = c.inner_epochs == 1 and idx_all.numel() <= c.train_batch_size * c.gradient_accumulation
        draws = self._draws(traj, idx_all, batch.generator, single)

        def terms(mb):
            sub = traj[mb.to(traj.latents.device)]
            a = adv[mb].to(self.sampler.device)
            w = None if batch.kl_weight is None else batch.kl_weight[mb]
            for k, t in enumerate(draws["steps"]):
                yield self._loss(sub, k, t, a, draws, mb, w)

        t0 = time.perf_counter()
        out = self.minibatch_updates(idx_all, batch.generator, len(draws["steps"]), terms)
        st = out.pop("stats")
        have = "kl" in st
        return {
            **out,
            "kl": float(st["kl"].mean()) if have else float("nan"),
            "nft_loss": float(st["nft_loss"].mean()) if have else float("nan"),
            "trained_samples": int(idx_all.numel()),
            "time/train": time.perf_counter() - t0,
        }

    def train_step(self, it: int) -> dict:
        batch = self.collect_groups(it)
        return {**self.reward_metrics(batch), **self.update(batch, it)}
