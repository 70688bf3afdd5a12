"""``DPOConfig``: Diffusion-DPO / Flow-DPO hyperparameters, offline (preference pairs) and online
(pairs ranked by a reward from the model's own groups).

Defaults follow the Diffusion-DPO reference training script (Wallace et al. 2023) where they carry
over; ``beta`` defaults per family (``DEFAULT_BETA``); docs/dpo.md lists every default with its
source and the deviations.  The rollout geometry of the online mode is :class:`GroupConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.groups import GroupConfig

__all__ = ["DPOConfig", "DEFAULT_BETA", "default_beta"]

#: beta per family: 5000 for the DDPM families (Diffusion-DPO's SD1.5 and SDXL runs), 100 for the
#: rectified-flow families (Flow-GRPO's SD3.5-M DPO configuration); docs/dpo.md gives the sources
DEFAULT_BETA = {"sd": 5000.0, "sdxl": 5000.0, "sd3": 100.0, "flux": 100.0, "wan": 100.0}
_BY_PARAMETERIZATION = {"eps": 5000.0, "v": 5000.0, "flow": 100.0}


def default_beta(family: str, parameterization: str) -> float:
    """The family's default beta (by parameterisation for a family not in :data:`DEFAULT_BETA`)."""
    return DEFAULT_BETA.get(family, _BY_PARAMETERIZATION.get(parameterization, 100.0))


@dataclass
class DPOConfig(GroupConfig):
    """Diffusion-DPO (eps / v models) and Flow-DPO (flow models) on the trainer floor.

    Geometry: an optimizer step takes ``train_batch_size x gradient_accumulation`` pairs per process.
    Offline, one iteration is one optimizer step on pairs drawn from the dataset in seeded epochs.
    Online, one iteration rolls out ``group_size`` samples of each of ``prompts_per_iteration``
    prompts (the collect step), ranks each group with the rewards and trains ``inner_epochs`` passes
    over its pairs.
    """

    #: "offline": labelled pairs from ``pairs``; "online": pairs ranked by the recipe's rewards
    mode: str = "offline"
    # ---- objective -------------------------------------------------------------------------------
    #: KL strength beta of loss = -log sigmoid(-beta/2 ((e_w - e_l) - (e_w_ref - e_l_ref))); None =
    #: the family's default (DEFAULT_BETA: 5000 SD1.x/SDXL, 100 flow models)
    beta: float | None = None
    #: weight of a supervised term on the winners, sft_weight * mse(pred(x_t^w), target^w)
    sft_weight: float = 0.0
    #: training times: "uniform" (DDPM timesteps; Diffusion-DPO) or "logit_normal" (flow; SD3's
    #: density); None = logit_normal for flow models, uniform otherwise
    time_distribution: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    #: flow models: shift the drawn noise level, s -> shift s / (1 + (shift - 1) s), as SD3's
    #: training schedule does (SD3.5: 3.0); 1 = none
    time_shift: float = 1.0
    #: (noise, time) draws per pair in one optimizer step, averaged (the same draw for w and l)
    timesteps_per_pair: int = 1
    #: CFG scale inside the loss's predictions; 1 = the conditional model alone (Diffusion-DPO)
    train_guidance_scale: float = 1.0
    # ---- offline data ---------------------------------------------------------------------------
    #: a local parquet / arrow file or folder with Pick-a-Pic v2 columns (caption, jpg_0, jpg_1,
    #: label_0), a folder (or .jsonl file) of pairs {prompt, chosen, rejected}, a hub dataset id
    #: (needs `pip install visalign[datasets]`), or a registered source such as toy:DIR
    pairs: str | None = None
    #: keyword options of a registered source, e.g. {samples_per_prompt: 16} for toy:DIR / toy-strict:DIR
    #: (used only when the source makes its data; an error for a plain file, folder or hub id)
    pairs_options: dict = field(default_factory=dict)
    #: the split of a hub dataset
    split: str = "train"
    #: use the first N pairs of the source (after ties are dropped); None = all
    max_pairs: int | None = None
    #: square side in pixels images are resized (shorter side, bilinear) and centre-cropped to;
    #: None = the recipe's model height / width or the model's default size
    resolution: int | None = None
    #: video pairs: frames kept from the start of each video (Wan: 4k + 1); None = the model's
    num_frames: int | None = None
    #: the caption is replaced by "" with this probability (Diffusion-DPO: 0.2)
    caption_dropout: float = 0.0
    #: also cache the mirrored images and use either at random (the reference's random flip)
    hflip: bool = False
    #: folder of the VAE-latent cache (one sub-folder per dataset, model and resolution); None =
    #: run_dir/latent_cache
    latent_cache: str | None = None
    #: dtype the cached latents are stored in: float16, bfloat16 or float32
    cache_dtype: str = "float16"
    #: worker processes decoding images while the cache is built; 0 = in the main process
    num_workers: int = 2
    #: images per VAE-encode batch while the cache is built
    encode_batch_size: int = 16
    # ---- online pairs ----------------------------------------------------------------------------
    #: "best_worst": one pair per group (its best and worst sample, D3PO / Flow-GRPO's online DPO);
    #: "all": every ordered pair of the group
    pairing: str = "best_worst"
    #: pairs whose reward difference is <= this are dropped (ties)
    min_reward_gap: float = 0.0
    #: online: the reference becomes the current weights every N iterations; 0 = never (the base)
    ref_refresh_every: int = 0
    #: online rollouts: "ode" or a stochastic kernel ("flow_sde", "flow_cps", "ddim")
    rollout_kernel: str = "ode"
    #: noise level (flow_sde / flow_cps) or DDIM eta of a stochastic rollout; None = the kernel's
    noise_level: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.mode in ("offline", "online"), f"mode must be offline or online, got {self.mode!r}")
        need(self.beta is None or self.beta > 0, f"beta must be > 0 (or null for the family default), got {self.beta}")
        need(self.sft_weight >= 0, f"sft_weight must be >= 0, got {self.sft_weight}")
        need(self.time_distribution in (None, "uniform", "logit_normal"),
             f"time_distribution must be uniform, logit_normal or null, got {self.time_distribution!r}")
        need(self.time_shift > 0, f"time_shift must be > 0, got {self.time_shift}")
        need(self.timesteps_per_pair >= 1, f"timesteps_per_pair must be >= 1, got {self.timesteps_per_pair}")
        need(self.train_guidance_scale >= 1, f"train_guidance_scale must be >= 1, got {self.train_guidance_scale}")
        need(0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        need(self.cache_dtype in ("float16", "bfloat16", "float32"),
             f"cache_dtype must be float16, bfloat16 or float32, got {self.cache_dtype!r}")
        need(self.resolution is None or self.resolution >= 8, f"resolution must be >= 8 pixels, got {self.resolution}")
        need(self.max_pairs is None or self.max_pairs >= 1, f"max_pairs must be >= 1 or null, got {self.max_pairs}")
        need(self.num_workers >= 0 and self.encode_batch_size >= 1,
             "num_workers must be >= 0 and encode_batch_size >= 1")
        need(self.pairing in ("best_worst", "all"), f"pairing must be best_worst or all, got {self.pairing!r}")
        need(self.min_reward_gap >= 0, f"min_reward_gap must be >= 0, got {self.min_reward_gap}")
        need(self.ref_refresh_every >= 0, f"ref_refresh_every must be >= 0, got {self.ref_refresh_every}")
        need(self.rollout_kernel in ("ode", "flow_sde", "flow_cps", "ddim"),
             f"rollout_kernel must be ode, flow_sde, flow_cps or ddim, got {self.rollout_kernel!r}")
        if self.mode == "offline":
            need(self.pairs is not None, "dpo.pairs is required offline: a parquet / arrow folder, a folder with "
                 "pairs.jsonl, a hub dataset id or toy:DIR (or set dpo.mode: online to rank the model's own samples)")
            need(self.inner_epochs == 1, f"offline DPO takes one optimizer step per iteration: inner_epochs must be 1, "
                 f"got {self.inner_epochs} (raise run.iterations instead)")

    def check_geometry(self, num_processes: int) -> None:
        """Online groups never straddle processes; pair counts vary, so any step size fits them."""
        if self.mode == "online" and self.prompts_per_iteration % num_processes:
            raise ValueError(
                f"prompts_per_iteration ({self.prompts_per_iteration}) must be a multiple of the number of "
                f"processes ({num_processes}) so each process holds whole groups; set prompts_per_iteration to "
                f"{max(num_processes, self.prompts_per_iteration // num_processes * num_processes)}")
