"""``RewardBackpropTrainer``: reward back-propagation through the sampling chain, on the trainer floor.

The reward is differentiated with respect to the denoiser's weights through the decoder and the
last sampling steps (docs/reward_backprop.md has the equations):

- **DRaFT-K** (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards", sec. 4): an ODE rollout whose first ``N - K`` steps run without gradient (the sample
  entering step ``N - K`` is detached), decode, ``loss = -lambda r(x_0)``.
- **AlignProp** (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward
  Backpropagation", sec. 4.3): DRaFT-K with ``K`` drawn anew for each rollout ("randomised
  truncated back-propagation").
- **DRaFT-LV** (Clark et al. 2023, sec. 4, K = 1): the rollout without gradient; the final sample
  ``x_0`` is re-noised to the last step's noise level ``n`` times and each is denoised in one step
  with gradient; ``loss = -lambda mean_j r(x_0^j)``.
- **ReFL** (Xu et al. 2023, "ImageReward", sec. 4.2): denoise without gradient to a random late step
  ``m``, one prediction with gradient, its x0-estimate decoded and scored,
  ``loss = lambda relu(target - r)``.  The steps before ``m`` are stochastic by default, as the
  reference's DDPM ancestral steps: DDIM with eta = 1 (DDPM's posterior step, Ho et al. 2020,
  eq. 6-7) for eps / v models, Flow-GRPO's SDE for flow models; ``refl_prefix="ode"`` makes them
  deterministic.

Every denoiser call that carries gradient is checkpointed (``checkpoint``), so memory stays nearly
flat in ``K``.  The rollout's CFG scale is the one the gradient goes through.  ``kl_beta`` adds an
anchor ``kl_beta |pred - pred_ref|^2`` on every prediction that carries gradient, with the
reference prediction from ``sampler.reference()`` at the same input.
"""

from __future__ import annotations

import time
from typing import Mapping

import torch

from visalign.samplers import CFGDenoiser, ode_step
from visalign.samplers.kernels import get_kernel, predict_x0

from ..base import Trainer, derive_seed
from .config import RewardBackpropConfig

__all__ = ["RewardBackpropTrainer", "check_differentiable"]


def check_differentiable(rewards: Mapping[str, tuple]) -> None:
    """Raise a ``ValueError`` naming every reward whose score has no gradient to the pixels."""
    bad = [name for name, (reward, _) in rewards.items() if not getattr(reward.info, "differentiable", False)]
    if bad:
        names = ", ".join(repr(b) for b in bad)
        raise ValueError(
            f"rewards: {names} {'is' if len(bad) == 1 else 'are'} not differentiable (no gradient reaches the pixels: "
            "JPEG sizes, the gold `shapes` verifier and VLM text judges are not); reward back-propagation needs a "
            "differentiable reward (`visalign rewards` lists which are). Train on it with policy gradient instead "
            "(algorithm: grpo, e.g. configs/toy/flow_grpo.yaml or configs/sd15/ddpo_aesthetic_jpeg.yaml), or "
            "optimise a differentiable stand-in such as shapes-proxy and keep the gold reward in eval_rewards.")


class _Anchor:
    """A rollout hook that collects the prediction anchor ``|pred - pred_ref|^2`` (per sample, mean
    over the latent) of every step whose prediction carries gradient."""

    def __init__(self, trainer: "RewardBackpropTrainer") -> None:
        self.trainer = trainer
        self.terms: list[torch.Tensor] = []

    def on_prediction(self, state, pred: torch.Tensor) -> None:
        if pred.requires_grad:
            self.terms.append(self.trainer.anchor(pred, state.latents, state.i, state.schedule, state.cond))
        return None

    def value(self) -> torch.Tensor | None:
        """``(B,)``: the mean of the collected terms over steps, or ``None`` when none were collected."""
        return torch.stack(self.terms).mean(0) if self.terms else None


class RewardBackpropTrainer(Trainer):
    """DRaFT-K / DRaFT-LV / AlignProp / ReFL on any Sampler (see the module docstring).

    Args:
        sampler: the model.
        rewards: ``{name: (reward, weight)}``, each differentiable; combined as ``sum_i w_i r_i``
            (:class:`visalign.rewards.compose.CombinedReward`, components keep each native score).
        config: :class:`RewardBackpropConfig`.
        The other arguments are :class:`~visalign.trainers.base.Trainer`'s (``eval_rewards`` may
        hold rewards that are not differentiable and are not trained on, e.g. a gold verifier).
    """

    algorithm = "backprop"
    progress_keys = ("reward/mean", "kl")
    needs_rewards = True

    @classmethod
    def from_parts(cls, sampler, config, *, rewards=None, **kwargs) -> "RewardBackpropTrainer":
        return cls(sampler, rewards, config, **kwargs)

    def __init__(self, sampler, rewards: Mapping[str, tuple], config: RewardBackpropConfig, **kwargs) -> None:
        from visalign.rewards.compose import CombinedReward

        if not rewards:
            raise ValueError("rewards: reward back-propagation trains on at least one differentiable reward, "
                             "e.g. {shapes-proxy: 1.0}")
        check_differentiable(rewards)
        super().__init__(sampler, config, **kwargs)
        self.reward_weights = {name: float(w) for name, (_, w) in rewards.items()}
        self.trained_reward_names = list(rewards)
        self.reward = CombinedReward([(n, r, float(w)) for n, (r, w) in rewards.items()], "none", None, "sum", None)
        #: in sharded runs, the generator of the draws that shape the computation (K, m), shared by processes
        self._shape_generator: torch.Generator | None = None

    # ---- pieces ------------------------------------------------------------------------------------
    @property
    def guidance(self) -> float:
        return float(self.config.guidance_scale)

    def denoiser(self) -> CFGDenoiser:
        """The guided prediction that samples and is trained through."""
        return CFGDenoiser(self.sampler, self.guidance, self.config.detach_uncond)

    def _call(self, x: torch.Tensor, i: int, schedule, cond) -> torch.Tensor:
        """One denoiser call with gradient, checkpointed when ``config.checkpoint``."""
        den = self.denoiser()
        if self.config.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(lambda inp: den(inp, i, schedule, cond), x, use_reentrant=False)
        return den(x, i, schedule, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]`` with gradient (the decoder checkpointed when ``checkpoint_decode``)."""
        if self.config.checkpoint_decode and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.sampler.decode, latents, use_reentrant=False).float()
        return self.sampler.decode(latents).float()

    def anchor(self, pred: torch.Tensor, x: torch.Tensor, i: int, schedule, cond) -> torch.Tensor:
        """``(B,)``: ``|pred - pred_ref|^2`` averaged over the latent, ``pred_ref`` the reference model's
        guided prediction at the same (detached) input."""
        with torch.no_grad(), self.sampler.reference():
            ref = self.denoiser()(x.detach(), i, schedule, cond).float()
        return ((pred.float() - ref) ** 2).flatten(1).mean(1)

    def _noise_level(self, schedule, i: int, n: int) -> torch.Tensor:
        """Step ``i``'s noise level as training times for ``sampler.add_noise``: the sigma (flow) or
        the integer timestep (DDPM)."""
        if self.sampler.parameterization == "flow":
            return schedule.sigmas[i].float().expand(n)
        return schedule.timesteps[i].long().expand(n)

    def grad_steps(self, generator: torch.Generator) -> int:
        """K of this rollout: ``grad_steps``, or a uniform draw in ``[min_grad_steps, grad_steps]``
        (AlignProp)."""
        c = self.config
        if c.method == "alignprop":
            return int(torch.randint(c.min_grad_steps, c.grad_steps + 1, (1,), generator=generator))
        return c.grad_steps

    # ---- the objective of one micro-batch ----------------------------------------------------------
    def micro_batch(self, records: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a scalar with gradient, already the mean over its valid
        samples) and its statistics (``scores``, ``valid``, ``components``, ``kl``, ``grad_steps``...)."""
        c = self.config
        prompts = [r["prompt"] for r in records]
        metadata = [r.get("metadata") for r in records]
        cond = self.encode(prompts).to(self.sampler.device)
        stats: dict = {}
        anchor = _Anchor(self)
        with self.acc.autocast():
            if c.method in ("draft", "alignprop"):
                k = self.grad_steps(self._shape_generator or generator)
                stats["grad_steps"] = k
                traj = self.sampler.rollout(
                    cond, num_steps=c.num_steps, guidance_scale=self.guidance, kernel="ode", generator=generator,
                    denoiser=self.denoiser(), grad_steps=k, checkpoint=c.checkpoint, record_means=False,
                    hooks=[anchor] if c.kl_beta > 0 else (), **self.size)
                images = self.decode(traj.final)
            elif c.method == "draft_lv":
                images, prompts, metadata = self._draft_lv(cond, prompts, metadata, generator, anchor)
            else:
                images, step = self._refl(cond, generator, anchor)
                stats["refl_step"] = step
        batch_meta = metadata if any(m is not None for m in metadata) else None
        out = self.reward(images, prompts, metadata=batch_meta)
        valid = out.valid & torch.isfinite(out.scores.detach())
        r = torch.where(valid, out.scores.float(), 0.0)
        if c.method == "refl":
            per_sample = c.reward_weight * torch.relu(c.refl_target - r)
        else:
            per_sample = -c.reward_weight * r
        kl = anchor.value()
        if kl is not None:  # one term per scored sample, gated by the reward's uncertainty when asked
            gate = self.kl_weights(out.components)
            if gate is not None:
                kl = kl * gate.to(kl.device)
                stats["kl_gate"] = gate
            per_sample = per_sample + c.kl_beta * kl.to(per_sample.device)
        loss = torch.where(valid, per_sample, 0.0).sum() / valid.sum().clamp_min(1)
        stats.update({"scores": out.scores.detach().float().cpu(), "valid": valid.cpu(),
                      "components": {k: v.detach().float().cpu() for k, v in out.components.items()
                                     if k in self.reward_weights},
                      "kl": None if kl is None else kl.detach().float().cpu()})
        return loss, stats

    def _draft_lv(self, cond, prompts, metadata, generator, anchor):
        """DRaFT-LV: the rollout without gradient, then ``lv_samples`` re-noisings of its final sample
        to the last step's noise level, each denoised in one step with gradient."""
        c = self.config
        with torch.no_grad():
            traj = self.sampler.rollout(cond, num_steps=c.num_steps, guidance_scale=self.guidance, kernel="ode",
                                        generator=generator, denoiser=self.denoiser(), record_means=False, **self.size)
        n, last = c.lv_samples, c.num_steps - 1
        x0 = traj.final.detach().repeat_interleave(n, 0)  # (B n, ...): sample b's copies are rows b n .. b n + n - 1
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = self.sampler.add_noise(x0, eps, self._noise_level(traj.schedule, last, x0.shape[0]))
        cond_n = traj.cond.repeat_interleave(n)
        pred = self._call(x, last, traj.schedule, cond_n)
        if c.kl_beta > 0:
            anchor.terms.append(self.anchor(pred, x, last, traj.schedule, cond_n))
        x_next = ode_step(pred, x, traj.schedule, last).prev_sample
        meta = [m for m in metadata for _ in range(n)]
        return self.decode(x_next), [p for p in prompts for _ in range(n)], meta

    def refl_prefix_kernel(self) -> tuple[str, dict]:
        """The kernel (name, options) of ReFL's steps before ``m``: ``refl_prefix="stochastic"`` is
        ``ddim`` (eta = ``refl_noise_level``, default 1: DDPM's ancestral step, as the reference's
        DDPMScheduler) for eps / v models and ``flow_sde`` (a = ``refl_noise_level``, default 0.7)
        for flow models; ``"ode"`` is the deterministic step."""
        c = self.config
        if c.refl_prefix == "ode":
            return "ode", {}
        if self.sampler.parameterization == "flow":
            return "flow_sde", {} if c.refl_noise_level is None else {"noise_level": float(c.refl_noise_level)}
        return "ddim", {} if c.refl_noise_level is None else {"eta": float(c.refl_noise_level)}

    def refl_prefix(self, x: torch.Tensor, m: int, schedule, cond, generator) -> torch.Tensor:
        """ReFL's steps ``0 .. m - 1`` from ``x``, without gradient, with :meth:`refl_prefix_kernel`
        (its noise drawn from ``generator``); returns ``x_m``."""
        name, options = self.refl_prefix_kernel()
        kernel = get_kernel(name, self.sampler.parameterization)
        den = self.denoiser()
        with torch.no_grad():
            for i in range(m):
                x = kernel(den(x, i, schedule, cond), x, schedule, i, generator=generator, **options).prev_sample
        return x

    def _refl(self, cond, generator, anchor):
        """ReFL: steps without gradient (stochastic by default, :meth:`refl_prefix`) up to a random
        late step ``m``, then one prediction with gradient and its x0-estimate."""
        c = self.config
        first, last = c.refl_steps()
        m = int(torch.randint(first, last + 1, (1,), generator=self._shape_generator or generator))
        with torch.no_grad():
            x = self.sampler.noise(len(cond), generator, **self.size).to(self.sampler.device, torch.float32)
            schedule = self.sampler.schedule(c.num_steps, x)
        x = self.refl_prefix(x, m, schedule, cond, generator)
        pred = self._call(x, m, schedule, cond)
        if c.kl_beta > 0:
            anchor.terms.append(self.anchor(pred, x, m, schedule, cond))
        return self.decode(predict_x0(pred, x, schedule, m)), m

    # ---- one iteration -------------------------------------------------------------------------------
    def _records(self) -> list[dict]:
        """This process's prompts of one micro-batch (every process draws the same global batch)."""
        c, acc = self.config, self.acc
        records = self.prompt_sampler.next(c.batch_size * acc.num_processes)
        return records[acc.process_index * c.batch_size : (acc.process_index + 1) * c.batch_size]

    def train_step(self, it: int) -> dict:
        c, acc = self.config, self.acc
        collected: list[dict] = []
        t0 = time.perf_counter()

        def losses():
            for mb in range(c.gradient_accumulation):
                gen = torch.Generator().manual_seed(derive_seed(self.run.seed, it, acc.process_index, mb, 3))
                if self.sharding is not None:  # K (AlignProp) and m (ReFL) set how many denoiser passes run:
                    # the same on every process, whose sharded denoiser gathers its weights in each
                    self._shape_generator = torch.Generator().manual_seed(derive_seed(self.run.seed, it, mb, 4))
                loss, stats = self.micro_batch(self._records(), gen)
                collected.append(stats)
                yield loss / c.gradient_accumulation

        step = self.optimizer_step(losses)
        row = self._metrics(collected)
        row.update({"loss": step.loss, "grad_norm": step.grad_norm, "optimizer_steps": int(not step.skipped),
                    "skipped_steps": int(step.skipped), "time/train": time.perf_counter() - t0})
        return row

    def _metrics(self, collected: list[dict]) -> dict:
        """Reward statistics over the iteration's samples, gathered over processes."""
        from ..common.metrics import masked_stats

        acc = self.acc
        scores = torch.cat([s["scores"] for s in collected])
        valid = torch.cat([s["valid"] for s in collected])
        all_scores = acc.gather(scores.to(acc.device)).cpu()
        all_valid = acc.gather(valid.to(acc.device)).cpu()
        mean, std = masked_stats(all_scores, all_valid)
        row: dict = {"reward/mean": mean, "reward/std": std, "reward/valid_fraction": float(all_valid.float().mean())}
        for name in self.reward_weights:
            comp = torch.cat([s["components"][name] for s in collected])
            m, s = masked_stats(acc.gather(comp.to(acc.device)).cpu(), all_valid)
            row[f"reward/{name}/mean"], row[f"reward/{name}/std"] = m, s
        kls = [s["kl"] for s in collected if s["kl"] is not None]
        row["kl"] = float(torch.cat(kls).mean()) if kls else float("nan")
        gates = [s["kl_gate"] for s in collected if "kl_gate" in s]
        if gates:
            row["kl/gated_fraction"] = float(torch.cat(gates).float().mean())
        for key in ("grad_steps", "refl_step"):
            if key in collected[0]:
                row[key] = sum(s[key] for s in collected) / len(collected)
        return row
