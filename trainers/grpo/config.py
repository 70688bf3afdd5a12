"""``GRPOConfig``: the hyperparameters of one GRPO run (Flow-GRPO / DDPO), grouped by concern.

Defaults are Flow-GRPO's for SD3.5-M where they carry over (docs/grpo.md lists them with their
sources); the toy recipe overrides the sizes.  Every field is a serialisable scalar; models and
rewards go to the trainer.  The rollout geometry and advantages are :class:`GroupConfig`'s and the
optimiser's :class:`OptimConfig`'s, shared with the other algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..group import GroupConfig

__all__ = ["GRPOConfig"]


@dataclass
class GRPOConfig(GroupConfig):
    # ---- stochastic rollout ----------------------------------------------------------------------
    #: "flow_sde" or "flow_cps" for flow models, "ddim" for eps / v models
    kernel: str = "flow_sde"
    #: noise level a (flow_sde 0.7, flow_cps 0.8) or DDIM eta (1.0); None = the kernel's default
    noise_level: float | None = None
    #: flow_sde only: explore with noise constant on f x f latent blocks (see
    #: visalign.samplers.kernels.flow_sde_step); 1 = Flow-GRPO's isotropic noise
    noise_pool: int = 1
    #: flow_cps only: "mse" (the reference's -mean((x' - mu)^2), default) or "gaussian" (the exact
    #: density; its ratio is 1 / (2 s_noise^2) times more sensitive, so clip ranges differ)
    cps_log_prob: str = "mse"
    #: which steps are stochastic: "all", "window" (fixed, sde_window_start), "random" (a random
    #: window per iteration, Flow-GRPO-Fast) or "sliding" (MixGRPO: moves one step every
    #: sde_window_shift_every iterations)
    sde_mode: str = "all"
    sde_window_size: int = 2
    #: first step of the window ("window", "sliding"); lowest start of a "random" window
    sde_window_start: int = 0
    #: a "random" window lies inside steps [sde_window_start, sde_window_end); None = num_steps
    sde_window_end: int | None = None
    sde_window_shift_every: int = 25
    #: the G samples of a prompt start from the same initial noise (DanceGRPO, Xue et al. 2025), so
    #: with ODE steps before the window every difference within a group comes from the trained
    #: stochastic steps (sharp credit assignment, as in TempFlow-GRPO's branching); False draws
    #: independent noise per sample (Flow-GRPO)
    shared_noise: bool = False
    # ---- objective -----------------------------------------------------------------------------
    #: PPO clip range on the ratio of step log-probs (Flow-GRPO: 1e-4)
    clip_range: float = 1e-4
    #: KL weight beta on the step mean, ||mu - mu_ref||^2 / (2 kl_std^2) with kl_std the reference's
    #: std_dev_t (0.04 GenEval/OCR, 0.01 PickScore; DDPO: 0)
    kl_beta: float = 0.04
    #: when log-probs are recomputed for training, stop the gradient through the unconditional CFG
    #: branch (only the conditional branch trains); null = each reference's choice: true for the
    #: flow kernels (flow_grpo detaches it), false for ddim (ddpo-pytorch trains both branches)
    detach_uncond: bool | None = None
    #: fraction of the stochastic steps trained each iteration (DDPO's timestep_fraction)
    train_step_fraction: float = 1.0
    #: the last (near-clean) step is not trained (Flow-GRPO)
    skip_last_step: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.kernel in ("flow_sde", "flow_cps", "ddim"),
             f"kernel must be flow_sde or flow_cps (flow models) or ddim (eps / v models), got {self.kernel!r}")
        need(self.noise_pool >= 1, f"noise_pool must be >= 1, got {self.noise_pool}")
        need(self.noise_pool == 1 or self.kernel == "flow_sde",
             f"noise_pool > 1 is a flow_sde option; kernel is {self.kernel!r}: set noise_pool: 1 or kernel: flow_sde")
        need(self.cps_log_prob in ("mse", "gaussian"), f"cps_log_prob must be mse or gaussian, got {self.cps_log_prob!r}")
        need(self.sde_mode in ("all", "window", "random", "sliding"),
             f"sde_mode must be all, window, random or sliding, got {self.sde_mode!r}")
        if self.sde_mode != "all":
            need(1 <= self.sde_window_size <= self.num_steps,
                 f"sde_window_size must be in 1..num_steps ({self.num_steps}), got {self.sde_window_size}")
            need(0 <= self.sde_window_start <= self.num_steps - self.sde_window_size,
                 f"sde_window_start must be in 0..{self.num_steps - self.sde_window_size}, got {self.sde_window_start}")
            end = self.num_steps if self.sde_window_end is None else self.sde_window_end
            need(self.sde_window_start + self.sde_window_size <= end <= self.num_steps,
                 f"sde_window_end must be in {self.sde_window_start + self.sde_window_size}..{self.num_steps} "
                 f"(sde_window_start + sde_window_size .. num_steps), got {self.sde_window_end}")
        if self.detach_uncond is None:
            self.detach_uncond = self.kernel != "ddim"
        need(0 < self.train_step_fraction <= 1, f"train_step_fraction must be in (0, 1], got {self.train_step_fraction}")
        need(self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")

    def kernel_options(self) -> dict:
        opts: dict = {}
        if self.noise_level is not None:
            opts["eta" if self.kernel == "ddim" else "noise_level"] = self.noise_level
        if self.noise_pool != 1:
            opts["noise_pool"] = self.noise_pool
        if self.kernel == "flow_cps":
            opts["log_prob_type"] = self.cps_log_prob
        return opts
