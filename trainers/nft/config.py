"""``NFTConfig``: DiffusionNFT's hyperparameters (rollout geometry and optimiser shared with GRPO)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.groups import GroupConfig

__all__ = ["NFTConfig"]


@dataclass
class NFTConfig(GroupConfig):
    #: strength beta of the implicit positive / negative policies (DiffusionNFT: 1.0)
    beta: float = 1.0
    #: noise levels (steps of the rollout schedule) trained per sample and iteration
    timesteps: int = 2
    #: "nft" (DiffusionNFT's positive and negative implicit policies) or "positive" (flow matching
    #: on the better-than-group samples only, weighted by their advantage: online reward-weighted
    #: regression, Peng et al. 2019 / RAFT, Dong et al. 2023)
    weighting: str = "nft"
    #: weight of the velocity anchor kl_beta |v - v_ref|^2 to the reference model (visalign's
    #: addition, Flow-GRPO's step KL carried over; 0 = DiffusionNFT's objective alone)
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.timesteps <= self.num_steps:
            raise ValueError(f"timesteps must be in 1..num_steps ({self.num_steps}), got {self.timesteps}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.weighting not in ("nft", "positive"):
            raise ValueError(f"weighting must be nft or positive, got {self.weighting!r}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
