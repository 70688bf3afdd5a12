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
    #: flow_sde only: explore with noise constant on f x f latent blocks (see
    #: visalign.samplers.kernels.flow_sde_step); 1 = Flow-GRPO's isotropic noise
    noise_pool: int = 1
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
    #: "policy_gradient" (Flow-GRPO / DDPO: clipped ratio of SDE transition log-probs) or "nft"
    #: (DiffusionNFT, Zheng et al. 2025: ODE rollouts, group-normalised rewards turned into an
    #: optimality probability, advantage-weighted flow matching on the forward process; flow models)
    objective: str = "policy_gradient"
    #: nft: strength beta of the implicit positive / negative policies (DiffusionNFT)
    nft_beta: float = 1.0
    #: nft: noise levels (steps of the rollout schedule) trained per sample and iteration
    nft_timesteps: int = 2
    #: nft: "nft" (DiffusionNFT's positive and negative implicit policies) or "positive" (flow
    #: matching on the better-than-group samples only, weighted by their advantage: online
    #: reward-weighted regression, Peng et al. 2019 / RAFT, Dong et al. 2023)
    nft_weighting: str = "nft"
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
        need(self.objective in ("policy_gradient", "nft"),
             f"objective must be policy_gradient or nft, got {self.objective!r}")
        if self.objective == "nft":
            need(self.kernel != "ddim", "objective nft is for rectified-flow models; set kernel: flow_sde (rollouts "
                 "are ODE) or objective: policy_gradient for eps / v models")
            need(not self.shared_noise, "objective nft rolls out with the ODE, so shared_noise would make every "
                 "sample of a group identical; set shared_noise: false")
            need(1 <= self.nft_timesteps <= self.num_steps, f"nft_timesteps must be in 1..num_steps, got {self.nft_timesteps}")
            need(self.nft_beta > 0, f"nft_beta must be > 0, got {self.nft_beta}")
            need(self.nft_weighting in ("nft", "positive"), f"nft_weighting must be nft or positive, got {self.nft_weighting!r}")
        need(self.noise_pool >= 1, f"noise_pool must be >= 1, got {self.noise_pool}")
        need(self.noise_pool == 1 or self.kernel == "flow_sde",
             f"noise_pool > 1 is a flow_sde option; kernel is {self.kernel!r}: set noise_pool: 1 or kernel: flow_sde")
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
        opts = {} if self.noise_level is None else (
            {"eta": self.noise_level} if self.kernel == "ddim" else {"noise_level": self.noise_level})
        if self.noise_pool != 1:
            opts["noise_pool"] = self.noise_pool
        return opts

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
