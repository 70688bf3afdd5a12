"""Run-level settings shared by trainers (where, how long, how often to save and evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSettings:
    #: output folder: metrics.jsonl, eval.jsonl, eval.json, checkpoints/, samples/, final/
    run_dir: str = "runs/grpo"
    #: training iterations (one iteration = rollout + reward + inner epochs of updates)
    iterations: int = 100
    seed: int = 0
    #: save a resumable checkpoint every N iterations (and at the end); 0 = only at the end
    checkpoint_every: int = 10
    #: resumable checkpoints kept on disk (the newest N); `visalign train --export` writes the
    #: LoRA of any kept one
    keep_checkpoints: int = 2
    #: evaluate every N iterations (and at iteration 0 and at the end); 0 = only at 0 and the end
    eval_every: int = 10
    #: ODE steps and CFG for evaluation (None = the training guidance)
    eval_num_steps: int = 20
    eval_guidance_scale: float | None = None
    eval_samples_per_prompt: int = 1
    #: evaluate with the EMA weights when an EMA is kept (Flow-GRPO)
    eval_with_ema: bool = True
    #: write a grid of eval samples with every evaluation
    save_sample_grid: bool = True
    #: "fp32" (none), "bf16" or "fp16": accelerate's autocast; kernels still compute in float32
    mixed_precision: str = "fp32"
    #: accelerate trackers to log to when installed: "tensorboard", "wandb"
    trackers: list[str] = field(default_factory=list)
    #: encode each prompt once and reuse it (text encoders are frozen)
    cache_prompt_embeddings: bool = True
    #: show progress bars
    progress: bool = True
    #: torch CPU threads; null = auto in `visalign train` (the cores other processes leave free at
    #: the start: beside a busy process more threads run up to 2x slower, docs/benchmarks.md) and
    #: torch's own setting when the trainer is built from Python; `--threads N` sets it
    threads: int | None = None
    #: wall-clock budget: stop once the iterations of this run (resumed runs included; evaluations
    #: and checkpoints not counted) have taken this many minutes; null = no budget, only `iterations`
    max_minutes: float | None = None
    #: recompute the denoiser's activations in the backward pass instead of keeping them (diffusers'
    #: enable_gradient_checkpointing; less memory, more compute); docs/scaling.md
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"run.iterations must be >= 0, got {self.iterations}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.mixed_precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"run.mixed_precision must be fp32, bf16 or fp16, got {self.mixed_precision!r}")
        if self.eval_samples_per_prompt < 1:
            raise ValueError("run.eval_samples_per_prompt must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"run.threads must be >= 1 or null (auto), got {self.threads}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"run.max_minutes must be > 0 or null (no wall-clock budget), got {self.max_minutes}")
