"""``GRPOConfig``: the hyperparameters of one GRPO run, grouped by concern.

Defaults are Flow-GRPO's for SD3.5-M where they carry over (shared/REFERENCE.md); the toy recipe
overrides the sizes.  Every field is a serialisable scalar; models and rewards go to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GRPOConfig:
    # ---- rollout -----------------------------------------------------------------------------
    #: samples per prompt (G); Flow-GRPO uses 24 on SD3.5-M
    group_size: int = 24
    #: prompts per iteration, over all processes (each process takes an equal share of whole groups)
    prompts_per_iteration: int = 2
    #: denoising steps of a training rollout (Flow-GRPO: 10)
    num_steps: int = 10
    #: CFG scale used in rollout AND in training (the same, so the ratio is on-policy)
    guidance_scale: float = 4.5
    #: train the model to be good without CFG: rollout and training both use guidance 1
    train_without_cfg: bool = False
    #: "flow_sde" or "flow_cps" for flow models, "ddim" for eps / v models
    kernel: str = "flow_sde"
    #: noise level a (flow_sde 0.7, flow_cps 0.8) or DDIM eta (1.0); None = the kernel's default
    noise_level: float | None = None
    #: which steps are stochastic: "all", "window" (fixed, sde_window_start), "random" (a random
    #: window per iteration, Flow-GRPO-Fast) or "sliding" (MixGRPO: moves one step every
    #: sde_window_shift_every iterations)
    sde_mode: str = "all"
    sde_window_size: int = 2
    sde_window_start: int = 0
    sde_window_shift_every: int = 25
    # ---- advantages ----------------------------------------------------------------------------
    #: "group": std per group; "global": std over the whole gathered batch (Flow-GRPO's default);
    #: "per_prompt": DDPO's running statistics over the last per_prompt_buffer rewards of a prompt
    advantage_std: str = "global"
    per_prompt_buffer: int = 16
    advantage_clip: float = 5.0
    #: with several rewards: "reward" (combine the rewards, then normalise) or "advantage"
    #: (normalise each reward within its group, then weight)
    multi_reward: str = "reward"
    # ---- objective -----------------------------------------------------------------------------
    clip_range: float = 1e-4
    #: KL weight beta on the step mean (0.04 GenEval/OCR, 0.01 PickScore; DDPO: 0)
    kl_beta: float = 0.04
    #: fraction of the stochastic steps trained each iteration (DDPO's timestep_fraction)
    train_step_fraction: float = 1.0
    #: the last (near-clean) step is not trained (Flow-GRPO)
    skip_last_step: bool = True
    # ---- optimisation --------------------------------------------------------------------------
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    #: "constant" or "cosine" (over `iterations`), after `warmup_iterations` of linear warm-up
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    #: passes over each iteration's samples
    inner_epochs: int = 1
    #: samples per micro-batch (per process)
    train_batch_size: int = 8
    #: micro-batches per optimizer step
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    #: EMA of the trainable weights; 0 disables
    ema_decay: float = 0.9
    #: stop after this many consecutive skipped (NaN-loss) optimizer steps
    max_nan_steps: int = 3

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.group_size >= 2, f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        need(self.prompts_per_iteration >= 1, f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        need(self.num_steps >= 2, f"num_steps must be >= 2, got {self.num_steps}")
        need(self.kernel in ("flow_sde", "flow_cps", "ddim"),
             f"kernel must be flow_sde or flow_cps (flow models) or ddim (eps / v models), got {self.kernel!r}")
        need(self.sde_mode in ("all", "window", "random", "sliding"),
             f"sde_mode must be all, window, random or sliding, got {self.sde_mode!r}")
        if self.sde_mode != "all":
            need(1 <= self.sde_window_size <= self.num_steps,
                 f"sde_window_size must be in 1..num_steps ({self.num_steps}), got {self.sde_window_size}")
            need(0 <= self.sde_window_start <= self.num_steps - self.sde_window_size,
                 f"sde_window_start must be in 0..{self.num_steps - self.sde_window_size}, got {self.sde_window_start}")
        need(self.advantage_std in ("group", "global", "per_prompt"),
             f"advantage_std must be group, global or per_prompt, got {self.advantage_std!r}")
        need(self.multi_reward in ("reward", "advantage"), f"multi_reward must be reward or advantage, got {self.multi_reward!r}")
        need(0 < self.train_step_fraction <= 1, f"train_step_fraction must be in (0, 1], got {self.train_step_fraction}")
        need(self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")
        need(self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        need(self.train_batch_size >= 1 and self.gradient_accumulation >= 1 and self.inner_epochs >= 1,
             "train_batch_size, gradient_accumulation and inner_epochs must be >= 1")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def kernel_options(self) -> dict:
        if self.noise_level is None:
            return {}
        return {"eta": self.noise_level} if self.kernel == "ddim" else {"noise_level": self.noise_level}

    def check_geometry(self, num_processes: int) -> None:
        """Batch-geometry checks that need the number of processes; errors say what to change."""
        if self.prompts_per_iteration % num_processes:
            raise ValueError(
                f"prompts_per_iteration ({self.prompts_per_iteration}) must be a multiple of the number of "
                f"processes ({num_processes}) so each process holds whole groups; set prompts_per_iteration to "
                f"{max(num_processes, self.prompts_per_iteration // num_processes * num_processes)}"
            )
        per_process = self.prompts_per_iteration // num_processes * self.group_size
        per_step = self.train_batch_size * self.gradient_accumulation
        if per_process % per_step:
            raise ValueError(
                f"each process holds {per_process} samples per iteration (prompts_per_iteration / processes x "
                f"group_size) but one optimizer step takes train_batch_size x gradient_accumulation = {per_step}; "
                f"choose train_batch_size and gradient_accumulation whose product divides {per_process}"
            )
