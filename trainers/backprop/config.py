"""``RewardBackpropConfig``: the hyperparameters of reward back-propagation (DRaFT-K, DRaFT-LV,
AlignProp, ReFL), grouped by concern.

Defaults are the DRaFT / AlignProp setting on Stable Diffusion 1.x where they carry over (50 DDIM
steps, CFG 7.5, K = 1); docs/reward_backprop.md lists every default with its source.  The recipes
in ``configs/`` set the per-model values.  The optimiser is :class:`OptimConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import OptimConfig

__all__ = ["RewardBackpropConfig", "METHODS", "REFL_PREFIXES"]

#: the methods and what carries the gradient in each
METHODS = {
    "draft": "the last grad_steps (K) sampling steps (DRaFT-K; Clark et al. 2023)",
    "draft_lv": "the last step, on lv_samples re-noisings of the final sample (DRaFT-LV; Clark et al. 2023)",
    "alignprop": "the last K steps with K drawn per rollout in [min_grad_steps, grad_steps] (AlignProp; Prabhudesai et al. 2023)",
    "refl": "one step at a random late step, scored on its x0-prediction with relu(refl_target - r) (ReFL; Xu et al. 2023)",
}

#: ReFL's steps before the trained one: stochastic (the reference's DDPM ancestral steps) or ode
REFL_PREFIXES = ("stochastic", "ode")


@dataclass
class RewardBackpropConfig(OptimConfig):
    # ---- method -----------------------------------------------------------------------------------
    #: "draft" (DRaFT-K), "draft_lv" (DRaFT-LV), "alignprop" (randomised truncation) or "refl"
    method: str = "draft"
    #: DRaFT-K's K: the sampling steps the gradient flows through (the last K); AlignProp's largest K
    grad_steps: int = 1
    #: AlignProp's smallest K (K is drawn uniformly in [min_grad_steps, grad_steps] for each rollout)
    min_grad_steps: int = 1
    #: DRaFT-LV's n: re-noisings of the final sample whose one-step denoisings are scored (DRaFT: 2)
    lv_samples: int = 2
    #: ReFL: the step that carries the gradient is drawn uniformly in [refl_first_step, refl_last_step]
    #: (0-based step indices); null = the last quarter of the steps (ReFL: 30..39 of 40)
    refl_first_step: int | None = None
    refl_last_step: int | None = None
    #: ReFL's target: loss = reward_weight * relu(refl_target - r); 2.0 on ImageReward's scale
    refl_target: float = 2.0
    #: ReFL's steps before m (no gradient): "stochastic" (the reference's DDPM ancestral steps: the
    #: ddim kernel, eta = 1 being DDPM's step exactly, for eps / v models; Flow-GRPO's SDE flow_sde
    #: for flow models) or "ode" (DDIM eta = 0 / Euler: deterministic)
    refl_prefix: str = "stochastic"
    #: the stochastic prefix's noise: DDIM's eta (eps / v) or flow_sde's a (flow); null = 1.0 / 0.7
    refl_noise_level: float | None = None
    # ---- rollout ----------------------------------------------------------------------------------
    #: sampling steps of a training rollout (ODE: Euler for flow models, DDIM eta = 0 otherwise;
    #: ReFL's steps before m: refl_prefix)
    num_steps: int = 50
    #: CFG scale of the rollout; the gradient goes through the guided prediction, so the model is
    #: trained at the scale it samples with (evaluation uses it too unless run.eval_guidance_scale)
    guidance_scale: float = 7.5
    #: stop the gradient through the unconditional CFG branch (only the conditional branch trains);
    #: false = both branches, as DRaFT and AlignProp
    detach_uncond: bool = False
    #: samples per micro-batch, per process (one prompt each, drawn without replacement)
    batch_size: int = 4
    #: micro-batches per optimizer step
    gradient_accumulation: int = 1
    #: gradient checkpointing on each denoiser call that carries gradients (memory nearly flat in K)
    checkpoint: bool = True
    #: gradient checkpointing on the decoder (VAE) call too
    checkpoint_decode: bool = True
    # ---- objective --------------------------------------------------------------------------------
    #: lambda: the reward term's scale, loss = -reward_weight * r (ReFL: reward_weight * relu(target - r));
    #: AlignProp's loss_coeff 0.01, ReFL's grad_scale 1e-3
    reward_weight: float = 1.0
    #: weight of the prediction anchor kl_beta * |pred - pred_ref|^2 (mean over the latent) on every
    #: prediction that carries gradient, pred_ref from sampler.reference() at the same input; for
    #: Gaussian steps that share their noise it is the KL of the step up to a per-step constant; 0 = off
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        need(1 <= self.grad_steps <= self.num_steps,
             f"grad_steps (K) must be in 1..num_steps ({self.num_steps}), got {self.grad_steps}")
        if self.method == "alignprop":
            need(1 <= self.min_grad_steps <= self.grad_steps,
                 f"min_grad_steps must be in 1..grad_steps ({self.grad_steps}) for alignprop, got {self.min_grad_steps}")
        need(self.lv_samples >= 1, f"lv_samples must be >= 1, got {self.lv_samples}")
        first, last = self.refl_steps()
        need(0 <= first <= last <= self.num_steps - 1,
             f"refl_first_step / refl_last_step must satisfy 0 <= first <= last <= num_steps - 1 "
             f"({self.num_steps - 1}); got {self.refl_first_step} / {self.refl_last_step} (resolved {first} / {last})")
        need(self.refl_prefix in REFL_PREFIXES,
             f"refl_prefix must be one of {', '.join(REFL_PREFIXES)}, got {self.refl_prefix!r}")
        need(self.refl_noise_level is None or self.refl_noise_level >= 0,
             f"refl_noise_level must be >= 0 or null (the kernel's default), got {self.refl_noise_level}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.gradient_accumulation >= 1, f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}")
        need(self.reward_weight > 0, f"reward_weight must be > 0, got {self.reward_weight}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")

    def refl_steps(self) -> tuple[int, int]:
        """ReFL's range of the gradient step, defaults resolved: the last quarter of the steps."""
        n = self.num_steps
        first = n - max(1, n // 4) if self.refl_first_step is None else int(self.refl_first_step)
        last = n - 1 if self.refl_last_step is None else int(self.refl_last_step)
        return first, last
