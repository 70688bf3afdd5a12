"""DPO configs: :class:`OfflineDPOConfig` (preference pairs from a dataset) and
:class:`OnlineDPOConfig` (pairs ranked by a reward from the model's own groups), sharing
:class:`DPOObjective`; :class:`DPOConfig` builds the one that a recipe's ``dpo.mode`` names.

Defaults follow the Diffusion-DPO reference training script (Wallace et al. 2023) where they carry
over; ``beta`` defaults per family (``DEFAULT_BETA``); docs/dpo.md lists every default with its
source and the deviations.  The rollout geometry of the online mode is :class:`GroupConfig`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..base import OptimConfig
from ..group import GroupConfig
from .loss import DEFAULT_BETA, LOSS_TYPES, default_beta

__all__ = ["DPOConfig", "DPOObjective", "OfflineDPOConfig", "OnlineDPOConfig", "DEFAULT_BETA", "default_beta"]

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class DPOObjective:
    """The pair objective both modes share (mixed into each mode's config)."""

    # ---- objective -------------------------------------------------------------------------------
    #: KL strength beta of the margin inside = -beta/2 ((e_w - e_l) - (e_w_ref - e_l_ref)); None =
    #: the family's default (DEFAULT_BETA: 5000 SD1.x/SDXL, 100 flow models)
    beta: float | None = None
    #: the loss of the margin: "sigmoid" (Diffusion-DPO, -log sigmoid(inside)), "ipo" ((inside - 1/2)^2,
    #: Azar et al. 2023) or "hinge" (max(0, 1 - inside), SLiC, Zhao et al. 2023); docs/dpo.md
    loss_type: str = "sigmoid"
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
    #: the reference becomes the current weights every N iterations; 0 = never (the base)
    ref_refresh_every: int = 0

    def check_objective(self) -> None:
        _need(self.beta is None or self.beta > 0, f"beta must be > 0 (or null for the family default), got {self.beta}")
        _need(self.loss_type in LOSS_TYPES,
              f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r} (docs/dpo.md compares them)")
        _need(self.sft_weight >= 0, f"sft_weight must be >= 0, got {self.sft_weight}")
        _need(self.time_distribution in (None, "uniform", "logit_normal"),
              f"time_distribution must be uniform, logit_normal or null, got {self.time_distribution!r}")
        _need(self.time_shift > 0, f"time_shift must be > 0, got {self.time_shift}")
        _need(self.timesteps_per_pair >= 1, f"timesteps_per_pair must be >= 1, got {self.timesteps_per_pair}")
        _need(self.train_guidance_scale >= 1, f"train_guidance_scale must be >= 1, got {self.train_guidance_scale}")
        _need(self.ref_refresh_every >= 0, f"ref_refresh_every must be >= 0, got {self.ref_refresh_every}")


@dataclass
class OfflineDPOConfig(DPOObjective, OptimConfig):
    """Diffusion-DPO (eps / v models) and Flow-DPO (flow models) on labelled pairs from a dataset.

    One iteration is one optimizer step on ``train_batch_size x gradient_accumulation`` pairs per
    process, drawn from the dataset in seeded epochs (through a VAE-latent cache).
    """

    #: always "offline" here (OnlineDPOConfig holds the online settings)
    mode: str = "offline"
    # ---- data -------------------------------------------------------------------------------------
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
    # ---- update geometry ---------------------------------------------------------------------------
    #: pairs per micro-batch (per process)
    train_batch_size: int = 8
    #: micro-batches per optimizer step (one optimizer step per iteration)
    gradient_accumulation: int = 1
    #: CFG scale of the evaluations (training uses train_guidance_scale)
    guidance_scale: float = 4.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_objective()
        _need(self.mode == "offline", f"OfflineDPOConfig.mode is offline, got {self.mode!r}: use OnlineDPOConfig "
              "(or DPOConfig(mode=...), which picks the class)")
        _need(self.pairs is not None, "dpo.pairs is required offline: a parquet / arrow folder, a folder with "
              "pairs.jsonl, a hub dataset id or toy:DIR (or set dpo.mode: online to rank the model's own samples)")
        _need(0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        _need(self.cache_dtype in ("float16", "bfloat16", "float32"),
              f"cache_dtype must be float16, bfloat16 or float32, got {self.cache_dtype!r}")
        _need(self.resolution is None or self.resolution >= 8, f"resolution must be >= 8 pixels, got {self.resolution}")
        _need(self.max_pairs is None or self.max_pairs >= 1, f"max_pairs must be >= 1 or null, got {self.max_pairs}")
        _need(self.num_workers >= 0 and self.encode_batch_size >= 1,
              "num_workers must be >= 0 and encode_batch_size >= 1")
        _need(self.train_batch_size >= 1 and self.gradient_accumulation >= 1,
              "train_batch_size and gradient_accumulation must be >= 1")


@dataclass
class OnlineDPOConfig(DPOObjective, GroupConfig):
    """DPO on the model's own samples (D3PO, Flow-GRPO's online DPO): each iteration rolls out
    ``group_size`` samples of each of ``prompts_per_iteration`` prompts (the collect step), ranks each
    group with the recipe's rewards and trains ``inner_epochs`` passes over its pairs in optimizer
    steps of ``train_batch_size x gradient_accumulation`` pairs per process.
    """

    #: always "online" here (OfflineDPOConfig holds the offline settings)
    mode: str = "online"
    # ---- pairs -------------------------------------------------------------------------------------
    #: "best_worst": one pair per group (its best and worst sample, D3PO / Flow-GRPO's online DPO);
    #: "all": every ordered pair of the group
    pairing: str = "best_worst"
    #: pairs whose reward difference is <= this are dropped (ties)
    min_reward_gap: float = 0.0
    # ---- rollouts ----------------------------------------------------------------------------------
    #: "ode" or a stochastic kernel ("flow_sde", "flow_cps", "ddim")
    rollout_kernel: str = "ode"
    #: noise level (flow_sde / flow_cps) or DDIM eta of a stochastic rollout; None = the kernel's
    noise_level: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_objective()
        _need(self.mode == "online", f"OnlineDPOConfig.mode is online, got {self.mode!r}: use OfflineDPOConfig "
              "(or DPOConfig(mode=...), which picks the class)")
        _need(self.pairing in ("best_worst", "all"), f"pairing must be best_worst or all, got {self.pairing!r}")
        _need(self.min_reward_gap >= 0, f"min_reward_gap must be >= 0, got {self.min_reward_gap}")
        _need(self.rollout_kernel in ("ode", "flow_sde", "flow_cps", "ddim"),
              f"rollout_kernel must be ode, flow_sde, flow_cps or ddim, got {self.rollout_kernel!r}")

    def check_geometry(self, num_processes: int) -> None:
        """Groups never straddle processes; pair counts vary, so any step size fits them."""
        if self.prompts_per_iteration % num_processes:
            raise ValueError(
                f"prompts_per_iteration ({self.prompts_per_iteration}) must be a multiple of the number of "
                f"processes ({num_processes}) so each process holds whole groups; set prompts_per_iteration to "
                f"{max(num_processes, self.prompts_per_iteration // num_processes * num_processes)}")


_MODES = {"offline": OfflineDPOConfig, "online": OnlineDPOConfig}
_WHAT = {"offline": "labelled pairs from dpo.pairs", "online": "groups of its own samples ranked by the rewards"}


def _config_class(mode, keys, where: str) -> type:
    """The config class of ``mode``; a key that only the other mode has is refused, by name."""
    if mode not in _MODES:
        raise ValueError(f"{where}.mode must be offline or online, got {mode!r}")
    cls = _MODES[mode]
    other = "online" if mode == "offline" else "offline"
    mine = {f.name for f in dataclasses.fields(cls)}
    theirs = {f.name for f in dataclasses.fields(_MODES[other])}
    foreign = [k for k in keys if k not in mine and k in theirs]
    if foreign:
        raise ValueError(f"{where}.{foreign[0]} is a setting of {other} DPO ({_WHAT[other]}) and means nothing to "
                         f"{mode} DPO, which trains on {_WHAT[mode]}; remove "
                         f"{', '.join(f'{where}.{k}' for k in foreign)} or set {where}.mode: {other}")
    return cls


class DPOConfig:
    """The ``dpo:`` section of a recipe (``algorithm: dpo``): builds :class:`OfflineDPOConfig` for
    ``mode: offline`` (the default) or :class:`OnlineDPOConfig` for ``mode: online``.

    ``DPOConfig(mode=..., **settings)`` returns an instance of that class (not of ``DPOConfig``); a
    setting that only the other mode has is an error that names it.
    """

    def __new__(cls, mode: str = "offline", **settings) -> OfflineDPOConfig | OnlineDPOConfig:
        return _config_class(mode, settings, "dpo")(mode=mode, **settings)

    @classmethod
    def from_section(cls, section: dict, *, where: str = "dpo") -> OfflineDPOConfig | OnlineDPOConfig:
        """The config of a recipe's section (keys checked and values converted as for every algorithm)."""
        from visalign.config import ConfigError, from_dict

        if not isinstance(section, dict):  # from_dict's error says what a section must be
            return from_dict(OfflineDPOConfig, section, where=where)
        try:
            kind = _config_class(section.get("mode", "offline"), section, where)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return from_dict(kind, section, where=where)
