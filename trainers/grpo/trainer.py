"""``GRPOTrainer``: Flow-GRPO (Liu et al. 2025) for flow models and DDPO (Black et al. 2023) for
eps / v models, one trainer on the Sampler contract.

One iteration:

1. **rollout**: ``G`` samples per prompt on the SDE kernel (``flow_sde`` / ``flow_cps`` /
   ``ddim``), stochastic on the chosen steps; latents and log-probs recorded, no gradient;
2. **reward**: decode and score; invalid / NaN samples are masked out;
3. **advantages**: group-relative, ``(r - mean_group) / (std + 1e-4)`` clamped;
4. **update**: for each inner epoch and micro-batch, for each trained step ``t``:
   ``ratio = exp(logp_theta - logp_old)``, ``loss = mean(max(-A ratio, -A clip(ratio, 1 - eps,
   1 + eps))) + beta KL``, ``KL = ||mu_theta - mu_ref||^2 / (2 std_t^2)`` with the reference under
   ``sampler.reference()``; gradients accumulate over steps and micro-batches, then one clipped
   AdamW step and an EMA update.

The equations, every deviation from the papers and the logged metrics are in docs/grpo.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch

from visalign.io import atomic_write_json, read_jsonl
from visalign.samplers import Conditioning, RandomWindow, Trajectory

from ..common.checkpoint import (
    checkpoint_iteration,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ..common.data import PromptSampler
from ..common.ema import EMA
from ..common.evaluate import evaluate, save_grid
from ..common.metrics import MetricsLog, masked_stats, plot_metrics
from ..common.run import RunSettings
from .advantages import PerPromptStats, group_advantages
from .config import GRPOConfig

__all__ = ["GRPOTrainer", "TrainingStopped"]


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many NaN steps); a checkpoint was written first."""


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class GRPOTrainer:
    """Group-relative policy optimisation on any Sampler.

    Args:
        sampler: the model (``visalign.samplers.load(...)``).
        rewards: ``{name: (reward, weight)}`` trained on.  With ``multi_reward="reward"`` they are
            combined (``visalign.rewards.combine``) before the advantages; with ``"advantage"``
            each is group-normalised and the advantages are weighted.
        config: :class:`GRPOConfig`.
        train_prompts / eval_prompts: prompt records ``{"prompt", "metadata"}``.
        eval_rewards: ``{name: reward}`` for evaluation (may include rewards not trained on).
        run: :class:`RunSettings`.
        trainable: the parameters to train (LoRA parameters from ``add_lora``); ``None`` trains
            the whole denoiser (a frozen reference copy is kept for the KL term).
        accelerator: an ``accelerate.Accelerator``; one is made from ``run`` when omitted.
    """

    def __init__(self, sampler, rewards: Mapping[str, tuple], config: GRPOConfig, *, train_prompts, eval_prompts=None,
                 eval_rewards: Mapping | None = None, run: RunSettings | None = None, trainable=None,
                 accelerator=None, log_config: dict | None = None, size: dict | None = None) -> None:
        from accelerate import Accelerator

        from visalign.rewards.compose import CombinedReward

        self.sampler, self.config, self.run = sampler, config, run or RunSettings()
        if accelerator is None:
            accelerator = Accelerator(cpu=sampler.device.type == "cpu", mixed_precision={"fp32": "no"}.get(self.run.mixed_precision, self.run.mixed_precision),
                                      log_with=self._available_trackers() or None, project_dir=self.run.run_dir)
        self.acc = accelerator
        config.check_geometry(self.acc.num_processes)
        if sampler.parameterization == "flow" and config.kernel == "ddim":
            raise ValueError(f"{sampler.family} is a flow model: set kernel to flow_sde or flow_cps")
        if sampler.parameterization != "flow" and config.kernel != "ddim":
            raise ValueError(f"{sampler.family} is an {sampler.parameterization}-prediction model: set kernel: ddim")
        self.reward_weights = {name: float(w) for name, (_, w) in rewards.items()}
        self.reward_objs = {name: r for name, (r, _) in rewards.items()}
        if len(rewards) > 1:  # components keep each reward's native score under its name
            self.reward = CombinedReward([(n, r, float(w)) for n, (r, w) in rewards.items()], "none", None, "sum", None)
        else:
            self.reward = next(iter(rewards.values()))[0]
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts or [])
        self.eval_rewards = dict(eval_rewards or {})
        if trainable is None:
            sampler.keep_reference_copy()
            sampler.denoiser.requires_grad_(True)
            trainable = [p for p in sampler.denoiser.parameters()]
        self.params = [p for p in trainable if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad")
        if self.acc.num_processes > 1:  # every process starts from rank 0's weights
            import torch.distributed as dist

            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)
        sampler.denoiser.eval()  # no dropout: the same network samples and is trained (ratio 1 on-policy)
        c = config
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                           weight_decay=c.weight_decay, eps=c.adam_eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.ema = EMA(self.params, c.ema_decay) if c.ema_decay > 0 else None
        self.prompt_sampler = PromptSampler(self.train_prompts, seed=self.run.seed)
        self.per_prompt = PerPromptStats(c.per_prompt_buffer) if c.advantage_std == "per_prompt" else None
        self.iteration = 0
        self.nan_steps = 0
        self.run_dir = Path(self.run.run_dir)
        self.metrics = MetricsLog(self.run_dir, self.acc, enabled=self.acc.is_main_process)
        self._cond_cache: dict[str, Conditioning] = {}
        self.log_config = log_config or {}
        self.size = dict(size or {})  # {"height": ..., "width": ..., "num_frames": ...} for rollouts

    # ------------------------------------------------------------------------------------------
    def _available_trackers(self) -> list[str]:
        import importlib.util

        names = {"tensorboard": "tensorboard", "wandb": "wandb"}
        return [t for t in self.run.trackers if importlib.util.find_spec(names.get(t, t)) is not None]

    def _lr_lambda(self, step: int) -> float:
        c = self.config
        per_iter = max(1, c.inner_epochs)  # nominal; cosine uses iterations as its clock
        warm = c.warmup_iterations * per_iter
        if warm and step < warm:
            return (step + 1) / warm
        if c.lr_schedule == "cosine":
            total = max(1, self.run.iterations * per_iter - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
        return 1.0

    @property
    def guidance(self) -> float:
        return 1.0 if self.config.train_without_cfg else self.config.guidance_scale

    def _encode(self, prompts: list[str]) -> Conditioning:
        if not self.run.cache_prompt_embeddings:
            with torch.no_grad():
                return self.sampler.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cond_cache))
        if missing:
            with torch.no_grad():
                cond = self.sampler.encode(missing)
            for j, p in enumerate(missing):
                self._cond_cache[p] = cond[j]
        return Conditioning.cat([self._cond_cache[p] for p in prompts])

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

    # ---- 1-3: rollout, reward, advantages ----------------------------------------------------
    def collect(self, it: int) -> dict:
        """Roll out this process's groups, score them and compute advantages."""
        c, acc = self.config, self.acc
        records = self.prompt_sampler.next(c.prompts_per_iteration)
        per_proc = c.prompts_per_iteration // acc.num_processes
        mine = records[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]
        prompts = [r["prompt"] for r in mine for _ in range(c.group_size)]
        metadata = [r["metadata"] for r in mine for _ in range(c.group_size)]
        metadata = metadata if all(m for m in metadata) else None
        gen = torch.Generator().manual_seed(_seed(self.run.seed, it, acc.process_index, 1))
        t0 = time.perf_counter()
        cond = self._encode(prompts).to(self.sampler.device)
        latents = None
        if c.shared_noise:  # one draw per prompt, repeated over its group
            latents = self.sampler.noise(len(mine), gen, **self.size).repeat_interleave(c.group_size, 0)
        nft = c.objective == "nft"  # DiffusionNFT samples with the ODE: the eval-time sampler
        with torch.no_grad(), acc.autocast():
            traj = self.sampler.rollout(cond, num_steps=c.num_steps, guidance_scale=self.guidance,
                                        kernel="ode" if nft else c.kernel, kernel_options={} if nft else c.kernel_options(),
                                        sde_steps="none" if nft else self._sde_steps(it), generator=gen,
                                        latents=latents, record_means=not nft, **self.size)
            images = self.sampler.decode(traj.final).float()
        t1 = time.perf_counter()
        with torch.no_grad():
            out = self.reward(images, prompts, metadata=metadata)
        t2 = time.perf_counter()
        scores = out.scores.detach().float().cpu()
        valid = out.valid.cpu() & torch.isfinite(scores)
        # advantages over the gathered batch (groups never straddle processes)
        all_scores, all_valid = acc.gather(scores.to(acc.device)).cpu(), acc.gather(valid.to(acc.device)).cpu()
        if c.multi_reward == "advantage" and len(self.reward_weights) > 1:
            adv = torch.zeros_like(all_scores)
            keep = all_valid.clone()
            for name, w in self.reward_weights.items():
                comp = acc.gather(out.components[name].detach().float().to(acc.device)).cpu()
                a, k = group_advantages(comp, all_valid, c.group_size, std="group", clip=c.advantage_clip)
                adv += w * a
                keep &= all_valid
            informative = (adv.view(-1, c.group_size).abs().sum(1, keepdim=True) > 0).expand(-1, c.group_size).flatten()
            keep &= informative
        elif c.advantage_std == "per_prompt":
            all_prompts = [r["prompt"] for r in records for _ in range(c.group_size)]
            adv, keep = self.per_prompt.advantages(all_prompts, all_scores, all_valid, c.advantage_clip)
        else:
            adv, keep = group_advantages(all_scores, all_valid, c.group_size, std=c.advantage_std, clip=c.advantage_clip)
        n = scores.shape[0]
        lo = acc.process_index * n
        stats = {"time/rollout": t1 - t0, "time/reward": t2 - t1}
        return dict(traj=traj, prompts=prompts, scores=scores, valid=valid, out=out,
                    advantages=adv[lo : lo + n], keep=keep[lo : lo + n], all_scores=all_scores,
                    all_valid=all_valid, all_keep=keep, stats=stats, gen=gen)

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

    def _step_loss(self, sub: Trajectory, t: int, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-sample loss ``(b,)`` at step ``t`` and its statistics."""
        c = self.config
        with self.acc.autocast():
            new = self.sampler.log_prob(sub, steps=[t])
        logp = new.log_prob[:, 0]
        ratio = torch.exp(logp - sub.log_probs[:, t])
        clipped = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        kl = torch.zeros_like(pg)
        if c.kl_beta > 0:
            with torch.no_grad(), self.sampler.reference(), self.acc.autocast():
                ref = self.sampler.log_prob(sub, steps=[t])
            diff = (new.mean[:, 0] - ref.mean[:, 0]) ** 2
            kl = diff.flatten(1).mean(1) / (2 * new.std[0].float() ** 2)
        loss = pg + c.kl_beta * kl
        stats = {"ratio": ratio.detach(), "kl": kl.detach(), "pg": pg.detach(),
                 "clipped": ((ratio - 1).abs() > c.clip_range).detach().float()}
        return loss, stats

    def _nft_targets(self, traj: Trajectory, trained: torch.Tensor, gen: torch.Generator, single_step: bool) -> dict:
        """DiffusionNFT's forward-process draws for this iteration: the noise levels (steps of the
        rollout schedule), fresh noise per sample and level, and, when the iteration takes more
        than one optimizer step, the sampling policy's velocity ``v_old`` of the ``trained``
        samples computed up front."""
        c = self.config
        steps = torch.randperm(c.num_steps, generator=gen)[: c.nft_timesteps].sort().values.tolist()
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
                        v_old[rows, k] = self._nft_velocity(sub, t, x0[rows], eps[rows, k]).float()
        return {"steps": steps, "x0": x0, "eps": eps, "v_old": v_old}

    def _nft_velocity(self, sub: Trajectory, t: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        s = sub.schedule.sigma(t, x0)
        x_t = ((1 - s) * x0 + s * eps).to(sub.latents.dtype)
        # the velocity that sampled: CFG-guided when the rollout was (then the guided field is fitted
        # to its own reward-weighted samples); train_without_cfg gives DiffusionNFT's CFG-free setting
        return self.sampler.denoise(x_t, t, sub.schedule, sub.cond, sub.guidance_scale)

    def _nft_loss(self, sub: Trajectory, k: int, t: int, adv: torch.Tensor, draws: dict, rows: torch.Tensor):
        """DiffusionNFT (Zheng et al. 2025, eq. 7): with ``r = 0.5 + 0.5 clip(A, -1, 1)``,
        ``v+ = (1 - b) v_old + b v``, ``v- = (1 + b) v_old - b v``, the loss is
        ``r |v+ - (eps - x0)|^2 + (1 - r) |v- - (eps - x0)|^2`` (means over the latent).

        With ``kl_beta > 0`` it adds ``kl_beta |v - v_ref|^2`` at the same ``x_s``, the reference
        under ``sampler.reference()``: for the SDE policies of the two velocity fields the KL of
        a step is proportional to this distance (Flow-GRPO's KL on the step mean), so it anchors
        the fine-tuned field to the base where the objective alone would drift."""
        c = self.config
        x0, eps = draws["x0"][rows], draws["eps"][rows, k]
        with self.acc.autocast():
            v = self._nft_velocity(sub, t, x0, eps).float()
        kl = None
        if c.kl_beta > 0:
            with torch.no_grad(), self.sampler.reference(), self.acc.autocast():
                v_ref = self._nft_velocity(sub, t, x0, eps).float()
            kl = ((v - v_ref) ** 2).flatten(1).mean(1)
        v_old = v.detach() if draws["v_old"] is None else draws["v_old"][rows, k]
        target = eps - x0
        shape = (-1, *([1] * (v.ndim - 1)))
        if c.nft_weighting == "positive":
            loss = (adv.clamp_min(0).view(shape) * (v - target) ** 2).flatten(1).mean(1)
        else:
            b = c.nft_beta
            r = (0.5 + 0.5 * adv.clamp(-1, 1)).view(shape)
            pos = ((1 - b) * v_old + b * v - target) ** 2
            neg = ((1 + b) * v_old - b * v - target) ** 2
            loss = (r * pos + (1 - r) * neg).flatten(1).mean(1)
        pg = loss.detach()
        if kl is None:  # without the anchor, "kl" logs the drift from the sampling policy
            kl = ((v.detach() - v_old) ** 2).flatten(1).mean(1)
        else:
            loss = loss + c.kl_beta * kl
        nan = torch.full_like(loss, float("nan"))
        return loss, {"ratio": nan, "kl": kl.detach(), "pg": pg, "clipped": torch.zeros_like(loss)}

    def update(self, batch: dict, it: int) -> dict:
        c = self.config
        traj, adv, keep, gen = batch["traj"], batch["advantages"], batch["keep"], batch["gen"]
        nft = c.objective == "nft"
        if nft and c.nft_weighting == "positive":
            keep = keep & (adv > 0)  # the rest have weight 0: skip their compute
        idx_all = torch.nonzero(keep).flatten()
        per_step = c.train_batch_size * c.gradient_accumulation
        if nft:
            single = c.inner_epochs == 1 and idx_all.numel() <= per_step
            draws = self._nft_targets(traj, idx_all, gen, single)
            steps = draws["steps"]
        else:
            steps = self._trained_steps(traj, gen)
        acc_stats: dict[str, list[torch.Tensor]] = {"ratio": [], "kl": [], "pg": [], "clipped": []}
        losses, grad_norms, skipped, opt_steps = [], [], 0, 0
        t0 = time.perf_counter()
        for _epoch in range(c.inner_epochs):
            order = idx_all[torch.randperm(idx_all.numel(), generator=gen)]
            for g0 in range(0, order.numel(), per_step):
                group = order[g0 : g0 + per_step]
                denom = group.numel() * len(steps)
                self.optimizer.zero_grad(set_to_none=True)
                total, bad = 0.0, False
                for m0 in range(0, group.numel(), c.train_batch_size):
                    mb = group[m0 : m0 + c.train_batch_size]
                    sub = traj[mb.to(traj.latents.device)]
                    a = adv[mb].to(self.sampler.device)
                    for k, t in enumerate(steps):
                        if nft:
                            loss, st = self._nft_loss(sub, k, t, a, draws, mb)
                        else:
                            loss, st = self._step_loss(sub, t, a)
                        scaled = loss.sum() / denom
                        if not torch.isfinite(scaled):
                            bad = True
                            break
                        scaled.backward()
                        total += float(scaled.detach())
                        for name, val in st.items():
                            acc_stats[name].append(val.cpu())
                    if bad:
                        break
                if not bad:
                    self._all_reduce_grads()
                    norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                    bad = not torch.isfinite(norm)
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.nan_steps += 1
                    if self.nan_steps >= c.max_nan_steps:
                        path = self.save_checkpoint()
                        raise TrainingStopped(
                            f"{self.nan_steps} optimizer steps in a row had a NaN/inf loss or gradient (iteration "
                            f"{it}); stopped with a checkpoint at {path}. Lower learning_rate, raise clip_range "
                            "only with care, or check the reward for NaNs.")
                    continue
                self.nan_steps = 0
                self.optimizer.step()
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.update()
                losses.append(total)
                grad_norms.append(float(norm))
                opt_steps += 1
        cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in acc_stats.items()}
        ratio = cat["ratio"]
        return {
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "ratio/mean": float(ratio.mean()) if ratio.numel() else float("nan"),
            "ratio/min": float(ratio.min()) if ratio.numel() else float("nan"),
            "ratio/max": float(ratio.max()) if ratio.numel() else float("nan"),
            "clip_fraction": float(cat["clipped"].mean()) if ratio.numel() else float("nan"),
            "kl": float(cat["kl"].mean()) if ratio.numel() else float("nan"),
            "policy_loss": float(cat["pg"].mean()) if ratio.numel() else float("nan"),
            "optimizer_steps": opt_steps,
            "skipped_steps": skipped,
            "trained_steps": len(steps),
            "time/train": time.perf_counter() - t0,
        }

    def _all_reduce_grads(self) -> None:
        """Average gradients over processes (LoRA-sized, so one all-reduce per parameter is cheap)."""
        if self.acc.num_processes == 1:
            return
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.acc.reduce(g, reduction="mean")

    # ---- iteration, evaluation, checkpoints -------------------------------------------------------
    def step(self) -> dict:
        """One iteration; returns (and logs) its metrics."""
        it = self.iteration
        t0 = time.perf_counter()
        batch = self.collect(it)
        train = self.update(batch, it)
        row = {"iteration": it + 1}
        mean, std = masked_stats(batch["all_scores"], batch["all_valid"])
        row.update({"reward/mean": mean, "reward/std": std,
                    "reward/valid_fraction": float(batch["all_valid"].float().mean())})
        out = batch["out"]
        for name, comp in out.components.items():
            m, s = masked_stats(comp.cpu(), batch["valid"])
            row[f"reward/{name}/mean"], row[f"reward/{name}/std"] = m, s
        adv = batch["advantages"][batch["keep"]]
        row.update({"advantage/mean": float(adv.mean()) if adv.numel() else 0.0,
                    "advantage/std": float(adv.std(unbiased=False)) if adv.numel() > 1 else 0.0,
                    "advantage/abs_max": float(adv.abs().max()) if adv.numel() else 0.0,
                    "groups/kept_fraction": float(batch["all_keep"].float().mean())})
        row.update(train)
        row.update(batch["stats"])
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["time/iteration"] = time.perf_counter() - t0
        self.iteration += 1
        self.metrics.log(row)
        return row

    def _ema_context(self):
        if self.ema is not None and self.run.eval_with_ema:
            return self.ema.swapped()
        return contextlib.nullcontext()

    def evaluate(self) -> dict:
        if not self.eval_prompts or not self.eval_rewards:
            return {}
        with self._ema_context():
            metrics, images = evaluate(
                self.sampler, self.eval_prompts, self.eval_rewards, num_steps=self.run.eval_num_steps,
                guidance_scale=self.run.eval_guidance_scale if self.run.eval_guidance_scale is not None else self.config.guidance_scale,
                samples_per_prompt=self.run.eval_samples_per_prompt, seed=_seed(self.run.seed, 7) % (1 << 31),
                autocast=self.acc.autocast, keep_images=32 if self.run.save_sample_grid else 0, size=self.size,
            )
        metrics = {"iteration": self.iteration, **metrics}
        if self.acc.is_main_process:
            from visalign.io import JsonlAppender

            with JsonlAppender(self.run_dir / "eval.jsonl") as w:
                w.write([metrics])
            if images is not None:
                save_grid(images, self.run_dir / "samples" / f"iter_{self.iteration:06d}.png")
        return metrics

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "trainable": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "per_prompt": self.per_prompt.state_dict() if self.per_prompt is not None else None,
            "nan_steps": self.nan_steps,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state["trainable"]):
                p.copy_(v.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if self.per_prompt is not None and state.get("per_prompt") is not None:
            self.per_prompt.load_state_dict(state["per_prompt"])
        self.nan_steps = int(state["nan_steps"])
        self.iteration = int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        return save_checkpoint(self.run_dir, self.iteration, self.state_dict(), keep=self.run.keep_checkpoints)

    def resume(self, run_dir: str | Path | None = None) -> bool:
        """Continue from the newest checkpoint in ``run_dir``; False if there is none."""
        path = latest_checkpoint(run_dir or self.run_dir)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        if self.acc.is_main_process:
            self.metrics.truncate_after(self.iteration)
            from visalign.io import atomic_write_text
            import json

            evals = [r for r in read_jsonl(self.run_dir / "eval.jsonl") if int(r["iteration"]) <= self.iteration]
            atomic_write_text(self.run_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))
        return True

    def export(self, iteration: int | None = None) -> Path:
        """Write the LoRA (EMA weights when kept) of a kept checkpoint, the newest by default, to
        ``run_dir/export/iter_NNNNNN`` in diffusers' format, like ``final/``; for evaluating an
        intermediate or interrupted run (``visalign toy eval --lora DIR``)."""
        path = latest_checkpoint(self.run_dir) if iteration is None else checkpoint_path(self.run_dir, iteration)
        if path is None or not path.is_file():
            have = ", ".join(str(checkpoint_iteration(p)) for p in list_checkpoints(self.run_dir)) or "none"
            raise FileNotFoundError(f"no checkpoint {'' if iteration is None else f'for iteration {iteration} '}in "
                                    f"{self.run_dir / 'checkpoints'} (kept: {have}); run.keep_checkpoints sets how "
                                    "many are kept")
        self.load_state_dict(load_checkpoint(path))
        return self.save_final(self.run_dir / "export" / path.stem)

    def save_final(self, out: str | Path | None = None) -> Path | None:
        """LoRA (EMA weights when kept) to ``out`` (default ``run_dir/final``) in diffusers' format."""
        if not self.acc.is_main_process:
            return None
        from ..common.lora import save_lora

        out = self.run_dir / "final" if out is None else Path(out)
        if not getattr(self.sampler.denoiser, "peft_config", None):
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            with self._ema_context():
                save_file({k: v.contiguous().cpu() for k, v in self.sampler.denoiser.state_dict().items()},
                          str(out / "denoiser.safetensors"))
            return out
        with self._ema_context():
            return save_lora(self.sampler, out)

    def train(self, iterations: int | None = None) -> dict:
        """Run to ``iterations`` (default ``run.iterations``); evaluates, checkpoints, plots."""
        from tqdm.auto import tqdm

        total = self.run.iterations if iterations is None else iterations
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            atomic_write_json(self.run_dir / "config.json", {**self.log_config, "grpo": asdict(self.config),
                                                             "run": asdict(self.run)})
        if self.acc.trackers == [] and self._available_trackers():
            self.acc.init_trackers("visalign")
        first_eval = self.evaluate() if self.iteration == 0 else {}
        bar = tqdm(total=total, initial=self.iteration, desc="grpo", disable=not (self.run.progress and self.acc.is_main_process))
        last = {}
        while self.iteration < total:
            last = self.step()
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", kl=f"{last['kl']:.2e}")
            if self.run.eval_every and self.iteration % self.run.eval_every == 0 and self.iteration < total:
                self.evaluate()
            if self.run.checkpoint_every and self.iteration % self.run.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        final_eval = self.evaluate()
        self.save_checkpoint()
        self.save_final()
        summary = {}
        if self.acc.is_main_process:
            evals = read_jsonl(self.run_dir / "eval.jsonl")
            summary = {"initial": evals[0] if evals else first_eval, "final": final_eval, "iterations": self.iteration}
            atomic_write_json(self.run_dir / "eval.json", summary)
            keys = [k for k in (last or {}) if k.startswith("reward/") and k.endswith("/mean")] or ["reward/mean"]
            eval_keys = [k for k in final_eval if k.startswith("eval/") and k.count("/") == 1]
            plot_metrics(self.run_dir, ["reward/mean"] + keys[:4], eval_keys, self.run_dir / "metrics.png")
        self.metrics.close()
        self.acc.end_training()
        return summary
