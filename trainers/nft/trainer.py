"""``NFTTrainer``: DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement
with Forward Process") for rectified-flow models, on the trainer floor.

One iteration, as the reference implementation (NVlabs/DiffusionNFT ``train_nft_sd3.py``) runs it:

1. the **old policy** (a soft-updated copy of the trained weights) draws ``G`` ODE samples per
   prompt (CFG-free by default), scored and turned into group advantages like GRPO;
2. for each sample ``x0`` and each of its trained noise levels ``s`` (``trained_levels`` steps of
   the rollout schedule, a random permutation per sample) with fresh noise ``eps``:
   ``x_s = (1 - s) x0 + s eps``, the old velocity ``v_old`` (no gradient) and the trained one ``v``
   at ``x_s``; with ``r = 0.5 + clip(A, -c, c) / (2 c)`` (``c = advantage_clip``),
   ``v+ = (1 - b) v_old + b v`` and ``v- = (1 + b) v_old - b v`` (eq. 7), in x0 space
   ``x0± = x_s - s v±`` with the adaptive weights ``w± = mean |x0±.detach() - x0|``:

       loss = c / b * (r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-) + kl_beta |v - v_ref|^2

   (means over the latent; ``adaptive_weighting: false`` uses ``|v± - u|^2`` with ``u = eps - x0``);
3. after the optimizer step(s), ``old <- d old + (1 - d) theta`` with the reference's decay
   schedule ``d = min(0.001 steps, 0.5)``.

``weighting="positive"`` is online reward-weighted regression instead: ``max(A, 0) |v - u|^2``.
docs/nft.md lists every option, the reference's defaults and the deviations.
"""

from __future__ import annotations

import contextlib
import time

import torch

from visalign.samplers import Trajectory

from ..common.ema import EMA
from ..group import GroupBatch, GroupTrainer
from .config import NFTConfig

__all__ = ["NFTTrainer", "nft_loss"]


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             r: torch.Tensor, beta: float, *, adaptive: bool = True) -> torch.Tensor:
    """DiffusionNFT's per-sample policy loss ``(B,)`` before its scale (Zheng et al. 2025, eq. 7-8).

    Args:
        v (`torch.Tensor`): the trained velocity at ``x_t``, ``(B, ...)`` (carries the gradient).
        v_old (`torch.Tensor`): the old (sampling) policy's velocity at ``x_t`` (detached here).
        x_t (`torch.Tensor`): ``(1 - s) x0 + s eps``.
        x0 (`torch.Tensor`): the clean sample.
        sigma (`torch.Tensor`): ``(B,)`` noise levels ``s``.
        r (`torch.Tensor`): ``(B,)`` optimality probabilities in ``[0, 1]``.
        beta (`float`): strength of the implicit policies.
        adaptive (`bool`, *optional*, defaults to ``True``): the reference's x0-space loss with
            adaptive weighting (each term divided by its detached mean absolute x0 error, in float64,
            floored at 1e-5); ``False``: plain velocity MSE against ``u = (x_t - x0) / s``.
    """
    v_old = v_old.detach()
    shape = (-1, *([1] * (v.ndim - 1)))
    s, r = sigma.to(v).view(shape), r.to(v).view(shape)
    pos_v = beta * v + (1 - beta) * v_old  # v+ (eq. 7)
    neg_v = (1 + beta) * v_old - beta * v  # v-
    dims = tuple(range(1, v.ndim))
    if adaptive:
        def term(pred_v):
            x0_hat = x_t - s * pred_v  # (B, ...)
            with torch.no_grad():
                w = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
            return ((x0_hat - x0) ** 2 / w).mean(dim=dims)
    else:
        u = (x_t - x0) / s  # eps - x0

        def term(pred_v):
            return ((pred_v - u) ** 2).mean(dim=dims)
    r = r.flatten()
    return (r * term(pos_v) + (1 - r) * term(neg_v)).float()


class NFTTrainer(GroupTrainer):
    """DiffusionNFT on any rectified-flow Sampler (see the module docstring)."""

    algorithm = "nft"

    def __init__(self, sampler, rewards, config: NFTConfig, **kwargs) -> None:
        if sampler.parameterization != "flow":
            raise ValueError(f"nft trains rectified-flow models; {sampler.family} is {sampler.parameterization}-"
                             "prediction: use algorithm grpo (DDPO, kernel ddim) or dpo")
        super().__init__(sampler, rewards, config, **kwargs)
        #: the old policy's weights (the reference's "old" adapter), soft-updated after each iteration
        self.old = EMA(self.params, 0.0, resync=self.resync_weights)
        #: optimizer steps taken: the clock of the old policy's decay (the reference's global_step)
        self.nft_steps = 0
        #: whether the old weights equal the live ones (then v_old is v.detach() in a one-step iteration)
        self.old_is_current = True
        self._single_step = False

    @property
    def steps_per_iteration(self) -> int:
        return max(1, self.config.inner_epochs)

    # ---- the old policy ------------------------------------------------------------------------
    def old_weights(self):
        """Inside this block the old policy's weights are live."""
        return contextlib.nullcontext() if self.old_is_current else self.old.swapped()

    def collect_groups(self, it: int) -> GroupBatch:
        """The old policy rolls out (the reference samples with its "old" adapter)."""
        with self.old_weights():
            return super().collect_groups(it)

    def update_old(self) -> float:
        """``old <- d old + (1 - d) theta`` with the decay of the steps taken so far; returns ``d``."""
        d = self.config.old_decay(self.nft_steps)
        self.old.decay = d
        self.old.update()
        self.old_is_current = d == 0.0
        return d

    # ---- the loss ----------------------------------------------------------------------------------
    def _draws(self, traj: Trajectory, gen: torch.Generator) -> dict:
        """The iteration's forward-process draws: ``levels (N, K)``, the rollout steps each sample
        trains on (a random permutation per sample, or one shared draw), and fresh noise per sample
        and level."""
        c = self.config
        n, k = len(traj), c.trained_levels
        if c.level_sampling == "per_sample":
            levels = torch.stack([torch.randperm(c.num_steps, generator=gen)[:k] for _ in range(n)])
        else:
            levels = torch.randperm(c.num_steps, generator=gen)[:k].sort().values.expand(n, k)
        x0 = traj.final.float()
        eps = torch.randn((n, k, *x0.shape[1:]), generator=gen).to(x0.device)
        return {"levels": levels, "x0": x0, "eps": eps}

    def _forward(self, sub: Trajectory, levels: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
        """``(x_s, sigma)`` at per-sample rollout steps ``levels (b,)``."""
        sched = sub.schedule
        sigma = sched.sigmas.to(x0.device).float()[levels.to(x0.device)]
        return self.sampler.add_noise(x0, eps, sigma), sigma

    def _velocity(self, sub: Trajectory, levels: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The velocity at ``x_t`` and per-sample steps ``levels`` (CFG-guided when the rollouts are;
        DiffusionNFT's default is CFG-free)."""
        t = sub.schedule.timesteps.to(x_t.device)[levels.to(x_t.device)]
        return self.sampler.predict(x_t, t, sub.cond, self.guidance)

    def _old_velocities(self, sub: Trajectory, levels: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
        """``v_old`` of a micro-batch at each of its levels ``(b, K, ...)`` under the old weights, or
        ``None`` when those are the live weights and ``v.detach()`` serves."""
        if self.old_is_current and self._single_step:
            return None
        out = []
        with torch.no_grad(), self.old_weights(), self.acc.autocast():
            for k in range(levels.shape[1]):
                x_t, _ = self._forward(sub, levels[:, k], x0, eps[:, k])
                out.append(self._velocity(sub, levels[:, k], x_t).float())
        return torch.stack(out, 1)

    def _loss(self, sub: Trajectory, levels: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, adv: torch.Tensor,
              v_old: torch.Tensor | None, kl_weight: torch.Tensor | None = None):
        """Per-sample loss ``(b,)`` at one level per sample (``levels (b,)``) and its statistics;
        ``kl_weight (b,)`` gates the velocity anchor per sample (``guards.kl_gate_quantile``)."""
        c = self.config
        x_t, sigma = self._forward(sub, levels, x0, eps)
        with self.acc.autocast():
            v = self._velocity(sub, levels, x_t).float()
        if v_old is None:
            v_old = v.detach()
        if c.weighting == "positive":
            u = self.sampler.training_target(x0, eps, sigma)
            shape = (-1, *([1] * (v.ndim - 1)))
            loss = (adv.clamp_min(0).view(shape) * (v - u) ** 2).flatten(1).mean(1)
        else:
            r = (0.5 + adv.clamp(-c.advantage_clip, c.advantage_clip) / (2 * c.advantage_clip)).clamp(0, 1)
            loss = c.scale * nft_loss(v, v_old, x_t, x0, sigma, r, c.beta, adaptive=c.adaptive_weighting)
        stats = {"nft_loss": loss.detach(), "old_drift": ((v.detach() - v_old) ** 2).flatten(1).mean(1)}
        if c.kl_beta > 0:
            with torch.no_grad(), self.sampler.reference(), self.acc.autocast():
                v_ref = self._velocity(sub, levels, x_t).float()
            kl = ((v - v_ref) ** 2).flatten(1).mean(1)
            if kl_weight is not None:
                kl = kl * kl_weight.to(kl.device)
            stats["kl"] = kl.detach()
            loss = loss + c.kl_beta * kl
        return loss, stats

    def update(self, batch: GroupBatch, it: int) -> dict:
        c = self.config
        traj, adv, keep = batch.traj, batch.advantages, batch.keep
        if c.weighting == "positive":
            keep = keep & (adv > 0)  # the rest have weight 0: skip their compute
        idx_all = torch.nonzero(keep).flatten()
        n_train = self.lockstep_count(idx_all.numel())  # every process takes as many steps (sharded runs)
        self._single_step = c.inner_epochs == 1 and n_train <= c.train_batch_size * c.gradient_accumulation
        draws = self._draws(traj, batch.generator)

        def terms(mb):
            sub = traj[mb.to(traj.latents.device)]
            a = adv[mb].to(self.sampler.device)
            w = None if batch.kl_weight is None else batch.kl_weight[mb]
            levels, x0, eps = draws["levels"][mb], draws["x0"][mb], draws["eps"][mb]
            v_old = self._old_velocities(sub, levels, x0, eps)
            for k in range(levels.shape[1]):
                yield self._loss(sub, levels[:, k], x0, eps[:, k], a, None if v_old is None else v_old[:, k], w)

        t0 = time.perf_counter()
        out = self.minibatch_updates(idx_all, batch.generator, c.trained_levels, terms)
        self.nft_steps += out["optimizer_steps"]
        decay = self.update_old()
        st = out.pop("stats")
        nan = float("nan")
        return {
            **out,
            "kl": float(st["kl"].mean()) if "kl" in st else nan,
            "nft_loss": float(st["nft_loss"].mean()) if "nft_loss" in st else nan,
            "old_drift": float(st["old_drift"].mean()) if "old_drift" in st else nan,
            "old/decay": decay,
            "trained_samples": int(idx_all.numel()),
            "time/train": time.perf_counter() - t0,
        }

    def train_step(self, it: int) -> dict:
        batch = self.collect_groups(it)
        return {**self.reward_metrics(batch), **self.update(batch, it)}

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["nft"] = {"old": self.old.state_dict(), "steps": self.nft_steps, "old_is_current": self.old_is_current}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        nft = state.get("nft")
        if nft is not None:
            self.old.load_state_dict(nft["old"])
            self.nft_steps = int(nft["steps"])
            self.old_is_current = bool(nft["old_is_current"])
