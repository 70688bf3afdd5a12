"""``NFTConfig``: DiffusionNFT's hyperparameters (rollout geometry and optimiser shared with GRPO).

Defaults are the reference implementation's (NVlabs/DiffusionNFT, ``config/base.py`` and
``config/nft.py``, SD3.5-M GenEval / PickScore runs); docs/nft.md lists them with their sources and
the options that reach other objectives.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..group import GroupConfig

__all__ = ["NFTConfig"]


@dataclass
class NFTConfig(GroupConfig):
    #: CFG scale of the rollouts (and of training): DiffusionNFT is CFG-free (1.0)
    guidance_scale: float = 1.0
    #: samples per prompt (the reference: 8 images per prompt, 48 prompts per epoch)
    group_size: int = 8
    # ---- objective -----------------------------------------------------------------------------
    #: strength beta of the implicit positive / negative policies (reference: 1.0; 0.1 for OCR and
    #: multi-reward runs)
    beta: float = 1.0
    #: "nft" (DiffusionNFT's positive and negative implicit policies) or "positive" (flow matching
    #: on the better-than-group samples only, weighted by their advantage: online reward-weighted
    #: regression, Peng et al. 2019 / RAFT, Dong et al. 2023)
    weighting: str = "nft"
    #: the reference's adaptive weighting: each implicit policy's loss in x0 space, divided by its
    #: detached mean absolute x0 error; False = plain velocity MSE, r |v+ - u|^2 + (1 - r) |v- - u|^2
    adaptive_weighting: bool = True
    #: factor on the NFT loss; None = the reference's advantage_clip / beta (its loss is divided by
    #: beta and multiplied by adv_clip_max)
    loss_scale: float | None = None
    #: weight of the velocity anchor kl_beta |v - v_ref|^2 to the reference model (reference's
    #: train.beta: 1e-4; 0 = none).  The optimality r = 0.5 + clip(A, -c, c) / (2 c) takes its
    #: c from GroupConfig.advantage_clip (the reference's adv_clip_max, 5)
    kl_beta: float = 1e-4
    # ---- noise levels --------------------------------------------------------------------------
    #: rollout-schedule levels trained per sample and iteration; None = int(0.99 num_steps), the
    #: reference's timestep_fraction 0.99 (9 of 10)
    timesteps: int | None = None
    #: "per_sample" (the reference: each sample its own random permutation of the levels) or
    #: "shared" (one draw of levels for the whole iteration)
    level_sampling: str = "per_sample"
    # ---- the "old" (sampling) policy -----------------------------------------------------------
    #: the old policy samples the rollouts and gives v_old; after each iteration it is soft-updated,
    #: old <- d old + (1 - d) theta, with d = min(old_decay_rate (steps - old_decay_flat), old_decay_max)
    #: and 0 during the first old_decay_flat optimizer steps.  Reference default: 0.001 / 0.5 / 0
    #: ("decay_type 1"); its OCR runs: 0.0075 / 0.999 / 75.  old_decay_rate 0 samples with the
    #: current weights (old = theta)
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    old_decay_flat: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        if self.timesteps is not None:
            need(1 <= self.timesteps <= self.num_steps,
                 f"timesteps must be in 1..num_steps ({self.num_steps}), got {self.timesteps}; null takes the "
                 "reference's 99% of the levels")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.weighting in ("nft", "positive"), f"weighting must be nft or positive, got {self.weighting!r}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")
        need(self.loss_scale is None or self.loss_scale > 0, f"loss_scale must be > 0 or null, got {self.loss_scale}")
        need(self.advantage_clip > 0, f"advantage_clip (the optimality's c) must be > 0, got {self.advantage_clip}")
        need(self.level_sampling in ("per_sample", "shared"),
             f"level_sampling must be per_sample or shared, got {self.level_sampling!r}")
        need(self.old_decay_rate >= 0, f"old_decay_rate must be >= 0, got {self.old_decay_rate}")
        need(0 <= self.old_decay_max < 1, f"old_decay_max must be in [0, 1), got {self.old_decay_max}")
        need(self.old_decay_flat >= 0, f"old_decay_flat must be >= 0, got {self.old_decay_flat}")

    @property
    def trained_levels(self) -> int:
        """Noise levels trained per sample and iteration."""
        return self.timesteps if self.timesteps is not None else max(1, int(self.num_steps * 0.99))

    @property
    def scale(self) -> float:
        """The factor on the NFT loss (``loss_scale``, or the reference's ``advantage_clip / beta``)."""
        return self.loss_scale if self.loss_scale is not None else self.advantage_clip / self.beta

    def old_decay(self, optimizer_steps: int) -> float:
        """The old policy's decay after ``optimizer_steps`` steps (the reference's ``return_decay``)."""
        if optimizer_steps < self.old_decay_flat:
            return 0.0
        return min((optimizer_steps - self.old_decay_flat) * self.old_decay_rate, self.old_decay_max)
