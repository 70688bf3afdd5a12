"""Memory planning: the GPU memory a training recipe needs per GPU, and whether it fits.

``visalign plan CONFIG [key=value ...] --gpus 8 --gpu-mem 80`` reads a training recipe and prints,
for each way of spreading the job over ``N`` GPUs (DDP, ZeRO-2, FSDP full shard, ZeRO-3), what one
GPU holds at the peak of a training step:

- **weights**: the trained parameters, the denoiser's frozen part (its base weights under LoRA, its
  buffers) and the text encoders and VAE the sampler keeps on the device, in the recipe's dtype;
- **gradients**: one per trained parameter, in its dtype;
- **optimizer**: AdamW's two states per trained parameter, in its dtype (``torch.optim.AdamW``
  keeps them like the parameter; its step counters stay on the CPU);
- **copies** the trainer keeps: the frozen reference model of full fine-tuning, the EMA of the
  trained weights (``ema_decay > 0``), DiffusionNFT's old policy, a refreshed reference adapter;
- **activations**: the bytes autograd keeps for backward in one micro-batch's forward pass,
  measured by running the denoiser on the ``meta`` device (no memory, no weights) at the recipe's
  batch, resolution and text length: each distinct tensor storage saved for backward counted once,
  parameters and buffers not counted, attention as a flash / memory-efficient kernel keeps it
  (query, key, value, output and a float32 log-sum-exp, never the ``L x L`` matrix), with the
  casts ``torch.autocast`` makes under ``run.mixed_precision`` done explicitly.  With gradient
  checkpointing (``model.gradient_checkpointing: true``) only the blocks' inputs stay and one block
  is recomputed at a time in backward: its activations are the **recompute** term;
- **gathered** (FSDP / ZeRO-3): the full weights of the largest wrapped block, twice (the block
  in use and the next one prefetched), and its gradients before they are reduce-scattered;
- **swap**: a copy of the trained weights that exists while other weights are swapped in (the old
  policy's rollouts in DiffusionNFT, evaluation with EMA weights); it never coexists with the
  activations, so the peak takes the larger of the two phases.

A recipe fits when the peak is below ``gpu_mem x (1 - margin)``; the margin (10 % by default)
stands for the CUDA context, the allocator's fragmentation and the small tensors not counted (the
loss terms on latents, the gradient of one activation at a time in backward, the reward models,
whose memory depends on the rewards you load).

The model comes from the recipe's ``model.name``: a local diffusers folder (its ``model_index.json``
and each component's ``config.json``), a built-in name, or one of the published checkpoints in
:data:`PUBLISHED` (their configs are written here, so no download is needed).  Parameter counts are
exact: every module is built from its config on the ``meta`` device, and LoRA is added to it by
visalign's own LoRA code.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = ["PUBLISHED", "PublishedModel", "ModelSource", "Component", "MemoryPlan", "StrategyRow", "STRATEGIES",
           "resolve_model", "build_meta_module", "denoiser_inputs", "SavedTensorMeter", "measure_activations",
           "flash_attention_accounting", "AutocastAccounting", "plan_recipe", "format_plan"]

GIB = 1024**3
#: the ways of spreading a job over GPUs, in table order
STRATEGIES = ("ddp", "zero2", "fsdp", "zero3")
STRATEGY_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "fsdp": "FSDP", "zero3": "ZeRO-3"}
#: the share of a GPU's memory left for the CUDA context, fragmentation and what is not counted
DEFAULT_MARGIN = 0.10


# --------------------------------------------------------------------------------------------
# The published checkpoints (configs as their model repositories publish them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedModel:
    """A checkpoint whose denoiser config is written here: its hub id, the pipeline class of its
    ``model_index.json``, the denoiser's component name, class and ``config.json`` values, and the
    other components a sampler keeps on the device as ``(architecture, parameter count)``."""

    hub_id: str
    pipeline: str
    denoiser: str
    denoiser_class: str
    config: Mapping[str, Any]
    others: Mapping[str, tuple[str, int]]


# Parameter counts of the frozen components (each architecture's published config built on meta).
_CLIP_L = ("CLIP ViT-L/14 text encoder", 123_060_480)
_CLIP_L_PROJ = ("CLIP ViT-L/14 text encoder with projection", 123_650_304)
_CLIP_G_PROJ = ("OpenCLIP ViT-bigG/14 text encoder with projection", 694_659_840)
_T5_XXL = ("T5 v1.1 XXL encoder", 4_762_310_656)
_UMT5_XXL = ("UMT5-XXL encoder", 5_680_910_336)
_VAE_4 = ("AutoencoderKL, 4 latent channels", 83_653_863)
_VAE_16 = ("AutoencoderKL, 16 latent channels", 83_819_683)
_VAE_WAN = ("AutoencoderKLWan", 126_892_531)

_SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
_SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True)
_SD35M = dict(
    attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)
_SD35L = dict(
    attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
    num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)
_FLUX_DEV = dict(
    attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
    pooled_projection_dim=768)
_WAN_COMMON = dict(
    added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256, image_dim=None,
    in_channels=16, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    text_dim=4096)

_SD_OTHERS = {"text_encoder": _CLIP_L, "vae": _VAE_4}
_SD3_OTHERS = {"text_encoder": _CLIP_L_PROJ, "text_encoder_2": _CLIP_G_PROJ, "text_encoder_3": _T5_XXL, "vae": _VAE_16}

#: hub id -> the published checkpoint (denoiser config from its ``transformer/`` or ``unet/config.json``)
PUBLISHED: dict[str, PublishedModel] = {m.hub_id: m for m in (
    PublishedModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", "unet",
                   "UNet2DConditionModel", _SD15_UNET, _SD_OTHERS),
    PublishedModel("runwayml/stable-diffusion-v1-5", "StableDiffusionPipeline", "unet",
                   "UNet2DConditionModel", _SD15_UNET, _SD_OTHERS),
    PublishedModel("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "unet",
                   "UNet2DConditionModel", _SDXL_UNET,
                   {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G_PROJ, "vae": _VAE_4}),
    PublishedModel("stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", "transformer",
                   "SD3Transformer2DModel", _SD35M, _SD3_OTHERS),
    PublishedModel("stabilityai/stable-diffusion-3.5-large", "StableDiffusion3Pipeline", "transformer",
                   "SD3Transformer2DModel", _SD35L, _SD3_OTHERS),
    PublishedModel("black-forest-labs/FLUX.1-dev", "FluxPipeline", "transformer", "FluxTransformer2DModel",
                   _FLUX_DEV, {"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL, "vae": _VAE_16}),
    PublishedModel("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline", "transformer", "WanTransformer3DModel",
                   {**_WAN_COMMON, "ffn_dim": 8960, "num_attention_heads": 12, "num_layers": 30},
                   {"text_encoder": _UMT5_XXL, "vae": _VAE_WAN}),
    PublishedModel("Wan-AI/Wan2.1-T2V-14B-Diffusers", "WanPipeline", "transformer", "WanTransformer3DModel",
                   {**_WAN_COMMON, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40},
                   {"text_encoder": _UMT5_XXL, "vae": _VAE_WAN}),
)}


# --------------------------------------------------------------------------------------------
# Resolving a model and building its modules on the meta device
# --------------------------------------------------------------------------------------------


@dataclass
class Component:
    """A module the sampler keeps on the device besides the denoiser: its parameter count (with
    persistent buffers) and bytes held in the recipe's dtype."""

    name: str
    description: str
    parameters: int
    bytes: int


@dataclass
class ModelSource:
    """What the planner knows of a model: family, the denoiser's class and config, the other
    components, and the values of ``model_index.json`` that shape the inputs (a pixel-space model's
    ``max_length``)."""

    name: str
    family: str
    pipeline: str
    denoiser: str
    denoiser_class: str
    denoiser_library: str
    denoiser_config: dict
    others: list[Component]
    index: dict = field(default_factory=dict)
    #: where the facts come from: "published" (the table here) or the folder read
    origin: str = "published"


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def _cast_as_loaded(module: torch.nn.Module, dtype: torch.dtype, library: str) -> torch.nn.Module:
    """Give a module built on meta the dtypes ``from_pretrained(..., dtype=dtype)`` gives it: the
    floating parameters and persistent buffers take ``dtype``, except the modules the class keeps
    in float32 (diffusers: ``_keep_in_fp32_modules`` for any dtype; transformers: for float16, and
    ``_keep_in_fp32_modules_strict`` for float16 / bfloat16); non-persistent buffers keep the dtype
    they were built with."""
    keep: set[str] = set()
    if library == "diffusers":
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    else:
        if dtype == torch.float16:
            keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())

    def target(name: str) -> torch.dtype:
        return torch.float32 if any(k in name.split(".") for k in keep) else dtype

    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.is_floating_point():
                    p.data = p.data.to(target(prefix + pname))
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and bname not in mod._non_persistent_buffers_set:
                    mod._buffers[bname] = b.to(target(prefix + bname))
    return module


def build_meta_module(library: str, class_name: str, config: Mapping | str | Path, dtype=None) -> torch.nn.Module:
    """A diffusers or transformers module built from its config on the ``meta`` device (exact
    shapes, no memory) with the dtypes loading it in ``dtype`` would give.  ``config`` is a dict of
    ``config.json`` values or the folder that holds it."""
    import logging

    dtype = _dtype(dtype)
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        values = dict(config) if isinstance(config, Mapping) else json.loads((Path(config) / "config.json").read_text())
        quiet = logging.getLogger("diffusers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with torch.device("meta"):
                module = cls.from_config(values)
        finally:
            quiet.setLevel(level)
    elif library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        if isinstance(config, Mapping):
            cfg = cls.config_class(**config)
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(config), local_files_only=True)
        with torch.device("meta"):
            module = cls(cfg)
    else:
        raise ValueError(f"cannot build a {library!r} module on meta (diffusers and transformers only)")
    return _cast_as_loaded(module, dtype, library)


def _module_class(library: str, class_name: str) -> type | None:
    import importlib

    try:
        cls = getattr(importlib.import_module(library), class_name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def state_numel(module: torch.nn.Module) -> int:
    """Parameters plus persistent buffers: the numbers a checkpoint of ``module`` stores."""
    return sum(t.numel() for t in module.state_dict().values())


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` (each distinct one once)."""
    return sum(t.numel() * t.element_size() for t in _unique(list(module.parameters()) + list(module.buffers())))


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _local_folder(name: str) -> Path | None:
    """The folder of a built-in name, a local folder, or the hub cache's copy of a hub id (no download)."""
    from visalign.models import BUILTIN_MODELS, builtin_model_path

    if name in BUILTIN_MODELS:
        return builtin_model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json"], local_files_only=True))
        except (OSError, ValueError):  # not in the cache (or not a repository id): the caller says what to do
            return None
    return None


def resolve_model(name: str, dtype=None) -> ModelSource:
    """What the planner needs of model ``name`` in ``dtype``: from :data:`PUBLISHED` for a known hub
    id, else from a local folder (a built-in name, a path, or the hub cache's copy of a hub id):
    ``model_index.json`` and each component's ``config.json``."""
    from visalign.samplers.loading import family_of

    dt = _dtype(dtype)
    if name in PUBLISHED:
        m = PUBLISHED[name]
        family = family_of({"_class_name": m.pipeline})
        size = torch.empty((), dtype=dt).element_size()
        others = [Component(k, desc, n, n * size) for k, (desc, n) in m.others.items()]
        return ModelSource(name, family, m.pipeline, m.denoiser, m.denoiser_class, "diffusers", dict(m.config),
                           others, {}, "published")
    folder = _local_folder(name)
    if folder is None or not (folder / "model_index.json").is_file():
        known = ", ".join(sorted(PUBLISHED))
        raise FileNotFoundError(
            f"model {name!r}: not a local diffusers folder (with model_index.json), not in the hub cache and not one "
            f"of the published checkpoints the planner knows ({known}); download its configs "
            f"(`hf download {name} --include '*.json'`) or pass the folder")
    index = json.loads((folder / "model_index.json").read_text())
    family = family_of(index)
    den_name = "transformer" if "transformer" in index else "unet"
    if den_name not in index:
        raise ValueError(f"{folder}/model_index.json names neither a transformer nor a unet")
    den_lib, den_cls = index[den_name]
    others = []
    for comp, entry in index.items():
        if comp == den_name or comp.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library is None or _module_class(library, class_name) is None:
            continue  # tokenizers, schedulers, absent optional components
        if not (folder / comp / "config.json").is_file():
            continue
        module = build_meta_module(library, class_name, folder / comp, dt)
        others.append(Component(comp, class_name, state_numel(module), held_bytes(module)))
    config = json.loads((folder / den_name / "config.json").read_text())
    return ModelSource(name, family, index["_class_name"], den_name, den_cls, den_lib, config, others,
                       {k: v for k, v in index.items() if not isinstance(v, list)}, str(folder))


def build_denoiser(source: ModelSource, dtype=None) -> torch.nn.Module:
    """The denoiser of ``source`` on the meta device, as loading it in ``dtype`` gives it."""
    return build_meta_module(source.denoiser_library, source.denoiser_class, source.denoiser_config, dtype)


# --------------------------------------------------------------------------------------------
# The denoiser's inputs for one training forward pass
# --------------------------------------------------------------------------------------------

#: latent downsampling of the VAE families (8 in every published checkpoint and in the tiny test models)
VAE_SCALE = 8
#: Wan's temporal VAE factor: 4k + 1 frames -> k + 1 latent frames
WAN_TEMPORAL = 4


def _pixel_patch(source: "ModelSource") -> int | None:
    """A model without a VAE denoises pixels folded into channels (``pixel_unshuffle``): its fold
    factor; ``None`` for latent models."""
    if any(o.name == "vae" for o in source.others) or source.denoiser_config.get("in_channels", 0) % 3:
        return None
    return int(round((source.denoiser_config["in_channels"] / 3) ** 0.5))


def default_size(source: ModelSource) -> tuple[int, int]:
    """The family's default ``(height, width)`` in pixels, as its sampler's ``default_size``."""
    c, f = source.denoiser_config, source.family
    if f == "wan":
        return 480, 832
    if f == "flux":
        return 128 * VAE_SCALE, 128 * VAE_SCALE
    patch = _pixel_patch(source)
    if patch is not None:
        side = int(c["sample_size"]) * patch
        return side, side
    sample = c.get("sample_size", 64)
    side = int(sample if isinstance(sample, int) else sample[0]) * VAE_SCALE
    return side, side


def text_tokens(source: ModelSource, options: Mapping) -> int:
    """The length of the text conditioning the denoiser attends to, as the family encodes prompts."""
    f = source.family
    if f in ("sd", "sdxl"):
        return 77
    if "max_length" in source.index:  # a model that records its prompt length (the pixel-space models)
        return int(source.index["max_length"])
    if f == "sd3":  # CLIP's 77 tokens, then T5's (zeros when the checkpoint has no T5)
        return 77 + int(options.get("max_sequence_length", 256))
    return int(options.get("max_sequence_length", 512))  # flux, wan


def latent_tokens(source: ModelSource, height: int, width: int, frames: int = 1) -> int:
    """Image (video) tokens the denoiser sees per sample at this size (a UNet's latent pixels)."""
    c, f = source.denoiser_config, source.family
    if f == "flux":
        return (height // (VAE_SCALE * 2)) * (width // (VAE_SCALE * 2))
    p = _pixel_patch(source)
    if p is not None:
        return (height // p) * (width // p)
    h, w = height // VAE_SCALE, width // VAE_SCALE
    if f == "sd3":
        p = int(c.get("patch_size", 2))
        return (h // p) * (w // p)
    if f == "wan":
        pt, ph, pw = c.get("patch_size", (1, 2, 2))
        return ((frames - 1) // WAN_TEMPORAL + 1) // pt * (h // ph) * (w // pw)
    return h * w


def denoiser_inputs(source: ModelSource, batch: int, height: int, width: int, *, frames: int = 81,
                    tokens: int | None = None, device="meta", dtype=None,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Keyword arguments of one denoiser call on ``batch`` samples, shaped as the family's sampler
    makes them (latents and text conditioning in the model dtype).  On ``meta`` they hold no
    memory; elsewhere they are random (seeded by ``generator``)."""
    c, f = source.denoiser_config, source.family
    dt = _dtype(dtype)
    dev = torch.device(device)
    tokens = text_tokens(source, {}) if tokens is None else tokens

    def rand(*shape, dtype=dt):
        if dev.type == "meta":
            return torch.empty(shape, device=dev, dtype=dtype)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=dev, dtype=dtype)

    def full(value, dtype=torch.float32):
        return torch.full((batch,), value, device=dev, dtype=dtype)

    patch = _pixel_patch(source)
    if f in ("sd", "sdxl") or patch is not None:
        scale = patch or VAE_SCALE
        out = {"sample": rand(batch, c["in_channels"], height // scale, width // scale),
               "timestep": full(500, torch.long) if patch is None else full(500.0),
               "encoder_hidden_states": rand(batch, tokens, c["cross_attention_dim"]), "return_dict": False}
        if c.get("addition_embed_type") == "text_time":
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            out["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
        return out
    if f == "sd3":
        return {"hidden_states": rand(batch, c["in_channels"], height // VAE_SCALE, width // VAE_SCALE),
                "timestep": full(500.0), "encoder_hidden_states": rand(batch, tokens, c["joint_attention_dim"]),
                "pooled_projections": rand(batch, c["pooled_projection_dim"]), "return_dict": False}
    if f == "flux":
        from visalign.samplers.families.flux import image_ids

        h, w = 2 * (height // (VAE_SCALE * 2)), 2 * (width // (VAE_SCALE * 2))
        out = {"hidden_states": rand(batch, (h // 2) * (w // 2), c["in_channels"]), "timestep": full(0.5, dt),
               "pooled_projections": rand(batch, c["pooled_projection_dim"]),
               "encoder_hidden_states": rand(batch, tokens, c["joint_attention_dim"]),
               "txt_ids": torch.zeros(tokens, 3, device=dev, dtype=dt),
               "img_ids": image_ids(h, w, dev, dt), "return_dict": False}
        out["guidance"] = full(3.5) if c.get("guidance_embeds") else None
        return out
    if f == "wan":
        if (frames - 1) % WAN_TEMPORAL:
            raise ValueError(f"num_frames must be {WAN_TEMPORAL}k + 1 for Wan, got {frames}")
        return {"hidden_states": rand(batch, c["in_channels"], (frames - 1) // WAN_TEMPORAL + 1,
                                      height // VAE_SCALE, width // VAE_SCALE),
                "timestep": full(500.0), "encoder_hidden_states": rand(batch, tokens, c["text_dim"]),
                "return_dict": False}
    raise ValueError(f"the planner has no input layout for family {f!r}")


# --------------------------------------------------------------------------------------------
# Measuring what autograd keeps for backward
# --------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorMeter:
    """Counts the bytes of the distinct storages autograd saves for backward inside :meth:`hooks`;
    storages of ``exclude`` (a module's parameters and buffers, held anyway) are not counted.  A
    view counts its whole storage (the storage is what stays allocated); a storage saved twice
    counts once.  Works on real and on ``meta`` tensors."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.exclude = {_storage_key(t) for t in exclude}
        self.kept: dict[int, torch.Tensor] = {}

    def add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.kept:
            self.kept[key] = t  # kept alive so that the key is not reused while measuring

    @property
    def bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.kept.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def hooks(self):
        """A ``saved_tensors_hooks`` context that records every tensor saved for backward."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


_SDPA = torch.nn.functional.scaled_dot_product_attention


class _FlashAttention(torch.autograd.Function):
    """Attention that keeps for backward what flash / memory-efficient kernels keep: query, key,
    value, the output and a float32 log-sum-exp per query ``(B, H, L)``.  Backward recomputes."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        with torch.no_grad():
            math_out = _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        # the kernels write the output token-major, (..., L, H, E) in memory, so that merging the
        # heads afterwards is a view, not a copy
        shape = math_out.shape
        if len(shape) == 4:
            out = torch.empty((shape[0], shape[2], shape[1], shape[3]), device=query.device, dtype=math_out.dtype)
            out = out.transpose(1, 2)
            out.copy_(math_out)
        else:
            out = math_out
        lse = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.options = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                           enable_gqa=enable_gqa)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, _out, _lse = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
        with torch.enable_grad():
            out = _SDPA(*inputs, **ctx.options)
        grads = torch.autograd.grad(out, inputs, grad_out)
        return (*grads, None, None, None, None, None)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return _FlashAttention.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@contextlib.contextmanager
def flash_attention_accounting() -> Iterator[None]:
    """Inside this block ``scaled_dot_product_attention`` keeps for backward what a GPU's flash /
    memory-efficient kernel keeps.  On ``meta`` tensors PyTorch dispatches attention to its math
    path, which would keep the ``L x L`` attention matrix that no flash run allocates."""
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


#: ops autocast runs in the lower precision (PyTorch's CUDA and CPU lists, the ones diffusion models call)
AUTOCAST_LOWER = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                            "conv_transpose3d", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm"})
#: ops CUDA's autocast runs in float32 (PyTorch's list, the ones diffusion models call); the CPU's
#: autocast keeps them in the lower precision
AUTOCAST_CUDA_FLOAT32 = frozenset({"layer_norm", "group_norm", "softmax", "log_softmax", "pow", "__pow__", "exp",
                                   "rsqrt", "sum", "norm", "cumsum", "log", "softplus", "mse_loss"})


class AutocastAccounting(torch.overrides.TorchFunctionMode):
    """``torch.autocast(device_type, dtype)``'s casts, done explicitly so that they happen on any
    device (``meta`` included): floating inputs of :data:`AUTOCAST_LOWER` ops are cast to ``dtype``
    (the casts of trainable leaf weights made once and reused, as autocast caches them), and on
    ``"cuda"`` half-precision inputs of :data:`AUTOCAST_CUDA_FLOAT32` ops to float32.  The copies
    are new tensors, so what backward keeps of them is counted."""

    def __init__(self, dtype: torch.dtype, device_type: str = "cuda") -> None:
        super().__init__()
        self.dtype, self.device_type = dtype, device_type
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, obj, dtype: torch.dtype, only_half: bool):
        if isinstance(obj, torch.Tensor):
            if (not obj.is_floating_point() or obj.dtype == dtype or obj.dtype == torch.float64
                    or (only_half and obj.element_size() != 2)):
                return obj
            if obj.is_leaf and obj.requires_grad:
                key = id(obj)
                if key not in self.cache:
                    self.cache[key] = (obj, obj.to(dtype))
                return self.cache[key][1]
            return obj.to(dtype)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._cast(o, dtype, only_half) for o in obj)
        return obj

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in AUTOCAST_LOWER:
            args = self._cast(args, self.dtype, False)
            kwargs = {k: self._cast(v, self.dtype, False) for k, v in kwargs.items()}
        elif self.device_type == "cuda" and name in AUTOCAST_CUDA_FLOAT32:
            args = self._cast(args, torch.float32, True)
            kwargs = {k: self._cast(v, torch.float32, True) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class ActivationMeasure:
    """Bytes kept for backward by one forward pass (``saved``) and, under gradient checkpointing,
    the bytes one block keeps while it is recomputed in backward (``recompute``, the largest
    block's)."""

    saved: int
    recompute: int = 0
    blocks: int = 0


def measure_activations(denoiser: torch.nn.Module, inputs: Mapping[str, Any], *, checkpointing: bool = False,
                        flash: bool = True, checkpoint_function: Callable | None = None,
                        autocast: tuple[torch.dtype, str] | None = None) -> ActivationMeasure:
    """Run ``denoiser(**inputs)`` with gradients and count what autograd keeps for backward
    (:class:`SavedTensorMeter`, the denoiser's parameters and buffers excluded).

    ``flash`` accounts attention as a flash kernel (:func:`flash_attention_accounting`; needed on
    ``meta``).  With ``checkpointing`` the denoiser's gradient checkpointing is switched on for the
    call: each checkpointed block keeps its inputs (counted) and the bytes it saves when it runs are
    measured per block (``recompute``: the largest); ``checkpoint_function(block, *args)``, when
    given, runs each block instead (e.g. ``torch.utils.checkpoint`` on real tensors).
    ``autocast=(dtype, device_type)`` runs the forward as ``torch.autocast(device_type, dtype)``
    would (:class:`AutocastAccounting`; real autocast does not act on ``meta`` tensors).
    """
    exclude = list(denoiser.parameters()) + list(denoiser.buffers())
    meter = SavedTensorMeter(exclude)
    peak = {"bytes": 0, "blocks": 0}

    def run_block(block, *args):
        for t in _tensors(args):  # a checkpointed block holds its inputs until its backward
            meter.add(t)
        peak["blocks"] += 1
        if checkpoint_function is not None:
            return checkpoint_function(block, *args)
        inner = SavedTensorMeter(exclude)
        with inner.hooks():
            out = block(*args)
        peak["bytes"] = max(peak["bytes"], inner.bytes)
        return out

    if checkpointing:
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(denoiser).__name__} does not support gradient checkpointing")
        denoiser.enable_gradient_checkpointing(run_block)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if flash:
                stack.enter_context(flash_attention_accounting())
            if autocast is not None:
                stack.enter_context(AutocastAccounting(*autocast))
            stack.enter_context(meter.hooks())
            out = denoiser(**inputs)
        saved = meter.bytes
        del out
    finally:
        if checkpointing:
            denoiser.disable_gradient_checkpointing()
    return ActivationMeasure(saved, peak["bytes"], peak["blocks"])


def largest_block(denoiser: torch.nn.Module) -> tuple[int, int]:
    """``(bytes, trained bytes)`` of the largest unit FSDP / ZeRO-3 gathers at once, wrapping each
    instance of the classes the model never splits (``_no_split_modules``) as its own unit: a unit
    holds its parameters but those of the units nested in it (a UNet's up block without its
    transformer and ResNet blocks); the rest of the model is the root unit."""
    names = set(getattr(denoiser, "_no_split_modules", None) or ())
    units = [denoiser] + [m for m in denoiser.modules() if m is not denoiser and type(m).__name__ in names]
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):  # later (deeper or sibling) units take their parameters
        for p in unit.parameters():
            owner[id(p)] = index
    sizes = [[0, 0] for _ in units]
    for p in _unique(denoiser.parameters()):
        size = sizes[owner[id(p)]]
        size[0] += p.numel() * p.element_size()
        size[1] += p.numel() * p.element_size() if p.requires_grad else 0
    total, trained = max(sizes)
    return total, trained


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class StrategyRow:
    """Bytes one GPU holds with one strategy (see the module docstring for each term)."""

    strategy: str
    gpus: int
    weights_trainable: int
    weights_frozen: int
    weights_other: int
    gradients: int
    optimizer: int
    reference: int
    ema: int
    old: int
    activations: int
    recompute: int
    gathered: int
    swap: int
    total: int
    budget: int
    fits: bool

    @property
    def static(self) -> int:
        return (self.weights_trainable + self.weights_frozen + self.weights_other + self.gradients + self.optimizer
                + self.reference + self.ema + self.old)


@dataclass
class MemoryPlan:
    """A recipe's memory per GPU for each strategy, and what it was computed from."""

    model: str
    family: str
    origin: str
    algorithm: str
    mode: str  #: "lora" or "full"
    lora_rank: int | None
    dtype: str
    mixed_precision: str
    height: int
    width: int
    frames: int | None
    latent_tokens: int
    text_tokens: int
    micro_batch: int  #: samples per training micro-batch (per process), as the recipe sets it
    forward_batch: int  #: rows of one denoiser forward with gradient (x2 with CFG, x2 for DPO pairs)
    graphs: int  #: forward passes whose activations are alive together (DRaFT-K without checkpointing: K)
    checkpointing: str  #: "off", "blocks" (model.gradient_checkpointing) or "whole call" (backprop.checkpoint)
    denoiser_parameters: int
    trainable_parameters: int
    components: list[Component]
    copies: dict[str, str]
    activations_per_sample: int
    gpus: int
    gpu_mem_gib: float
    margin: float
    rows: list[StrategyRow]
    notes: list[str] = field(default_factory=list)

    def row(self, strategy: str) -> StrategyRow:
        for r in self.rows:
            if r.strategy == strategy:
                return r
        raise KeyError(strategy)

    def to_dict(self) -> dict:
        return asdict(self)


def _cfg_factor(family: str, guidance_scale: float) -> int:
    """Rows per forward with classifier-free guidance: the conditional and the unconditional branch
    (FLUX.1's guidance is an embedding, not CFG)."""
    return 2 if family not in ("flux",) and float(guidance_scale) > 1.0 else 1


def _forward_geometry(recipe, family: str) -> tuple[int, int, int, str, list[str]]:
    """``(micro_batch, forward_batch, graphs, whole_call_checkpoint_steps, notes)`` of the recipe's
    training forward passes, as its algorithm runs them."""
    c, algo = recipe.config, recipe.algorithm
    notes: list[str] = []
    if algo == "backprop":
        samples = c.batch_size * (c.lv_samples if c.method == "draft_lv" else 1)
        k = c.grad_steps if c.method in ("draft", "alignprop") else 1
        cfg = _cfg_factor(family, c.guidance_scale)
        notes.append("reward back-propagation: the VAE decode and the reward model's activations are not counted")
        return c.batch_size, samples * cfg, k, "whole call" if c.checkpoint else "", notes
    if algo == "dpo":
        return c.train_batch_size, 2 * c.train_batch_size * _cfg_factor(family, c.train_guidance_scale), 1, "", notes
    guidance = 1.0 if getattr(c, "train_without_cfg", False) else c.guidance_scale
    return c.train_batch_size, c.train_batch_size * _cfg_factor(family, guidance), 1, "", notes


def _copies(recipe, lora: bool) -> dict[str, str]:
    """The copies of weights the trainer keeps, by name: what each copies."""
    c = recipe.config
    out: dict[str, str] = {}
    refresh = recipe.guards.reference_refresh_every or getattr(c, "ref_refresh_every", 0)
    if not lora:
        out["reference"] = "denoiser"
    elif refresh:
        out["reference"] = "trainable"  # a frozen second adapter
    if c.ema_decay > 0:
        out["ema"] = "trainable"
    if recipe.algorithm == "nft":
        out["old"] = "trainable"
    return out


def plan_recipe(recipe, *, gpus: int = 1, gpu_mem_gib: float = 80.0, margin: float = DEFAULT_MARGIN,
                strategies: Sequence[str] = STRATEGIES) -> MemoryPlan:
    """The memory plan of a loaded recipe (:func:`visalign.trainers.load_recipe`) on ``gpus`` GPUs of
    ``gpu_mem_gib`` GiB each."""
    from types import MappingProxyType

    from .common.lora import add_lora

    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
    m = recipe.model
    dtype = _dtype(m.dtype)
    source = resolve_model(m.name, dtype)
    family = source.family
    notes: list[str] = []
    if recipe.algorithm == "nft" and family in ("sd", "sdxl"):
        notes.append("DiffusionNFT trains rectified-flow models only; the trainer refuses this family")

    # ---- weights and what trains ----------------------------------------------------------------
    den = build_denoiser(source, dtype)
    lora = recipe.lora is not None
    if lora:
        from visalign.models import FAMILIES

        targets = FAMILIES.get(source.pipeline).lora_targets
        holder = SimpleNamespace(denoiser=den, lora_targets=targets, family=family)
        trainable = add_lora(holder, recipe.lora)
    else:
        den.requires_grad_(True)
        trainable = list(den.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    t_bytes = sum(p.numel() * p.element_size() for p in trainable)
    den_params = sum(p.numel() * p.element_size() for p in _unique(den.parameters()))
    den_buffers = sum(b.numel() * b.element_size() for b in _unique(den.buffers()))
    frozen_params = den_params - t_bytes
    other_bytes = sum(c.bytes for c in source.others)
    copies = _copies(recipe, lora)
    block_bytes, block_trainable = largest_block(den)

    # ---- activations ------------------------------------------------------------------------------
    dh, dw = default_size(source)
    height, width = int(m.height or dh), int(m.width or dw)
    frames = int(m.options.get("num_frames", 81)) if family == "wan" else None
    tokens = text_tokens(source, MappingProxyType(dict(m.options)))
    micro, fwd, graphs, whole_call, more = _forward_geometry(recipe, family)
    notes += more
    mp = recipe.run.mixed_precision
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    inputs = denoiser_inputs(source, fwd, height, width, frames=frames or 81, tokens=tokens, dtype=dtype)
    blocks_ckpt = bool(getattr(m, "gradient_checkpointing", False))
    device_type = "cpu" if str(m.device).startswith("cpu") else "cuda"  # autocast's op lists differ by device
    measure = measure_activations(den, inputs, checkpointing=blocks_ckpt,
                                  autocast=(autocast, device_type) if autocast is not None else None)
    saved, recompute = measure.saved, measure.recompute
    checkpointing = "blocks" if blocks_ckpt else "off"
    if whole_call:  # backprop: each denoiser call with gradient is checkpointed whole, keeping its input
        latent = next(iter(_tensors(inputs)))
        activations = graphs * latent.numel() * 4  # the sampler's float32 latents
        recompute = saved + (recompute if blocks_ckpt else 0)
        checkpointing = "whole call" + (" + blocks" if blocks_ckpt else "")
    else:
        activations = graphs * saved
    per_sample = saved // max(1, fwd)

    swap = t_bytes if ((recipe.algorithm == "nft" and recipe.config.old_decay_rate > 0)
                       or (copies.get("ema") and recipe.run.eval_with_ema)) else 0

    # ---- per strategy ------------------------------------------------------------------------------
    budget = int(gpu_mem_gib * GIB * (1 - margin))
    rows = []
    for s in strategies:
        n = gpus if s != "ddp" else 1
        full_shard = s in ("fsdp", "zero3")
        shard = gpus if full_shard else 1

        def copy_bytes(what: str, shard: int = shard) -> int:
            if what == "denoiser":
                return math.ceil(den_params / shard) + den_buffers
            return math.ceil(t_bytes / shard)

        row = dict(
            strategy=s, gpus=gpus,
            weights_trainable=math.ceil(t_bytes / shard),
            weights_frozen=math.ceil(frozen_params / shard) + den_buffers,
            weights_other=other_bytes,
            gradients=math.ceil(t_bytes / n),
            optimizer=math.ceil(2 * t_bytes / n),
            reference=copy_bytes(copies["reference"]) if "reference" in copies else 0,
            ema=copy_bytes(copies["ema"]) if "ema" in copies else 0,
            old=copy_bytes(copies["old"]) if "old" in copies else 0,
            activations=activations, recompute=recompute,
            gathered=(2 * block_bytes + block_trainable) if full_shard and gpus > 1 else 0,
            swap=math.ceil(swap / shard),
        )
        static = sum(row[k] for k in ("weights_trainable", "weights_frozen", "weights_other", "gradients",
                                      "optimizer", "reference", "ema", "old"))
        peak = static + row["gathered"] + max(row["activations"] + row["recompute"], row["swap"])
        rows.append(StrategyRow(**row, total=peak, budget=budget, fits=peak <= budget))

    check = getattr(recipe.config, "check_geometry", None)
    if check is not None:
        try:
            check(gpus)
        except ValueError as err:
            notes.append(f"with {gpus} processes the trainer refuses this recipe: {err}")
    return MemoryPlan(
        model=m.name, family=family, origin=source.origin, algorithm=recipe.algorithm,
        mode="lora" if lora else "full", lora_rank=recipe.lora.rank if lora else None, dtype=str(dtype).split(".")[-1],
        mixed_precision=mp, height=height, width=width, frames=frames,
        latent_tokens=latent_tokens(source, height, width, frames or 1), text_tokens=tokens, micro_batch=micro,
        forward_batch=fwd, graphs=graphs, checkpointing=checkpointing,
        denoiser_parameters=state_numel(den) - (n_trainable if lora else 0), trainable_parameters=n_trainable,
        components=list(source.others), copies=copies, activations_per_sample=per_sample, gpus=gpus,
        gpu_mem_gib=float(gpu_mem_gib), margin=float(margin), rows=rows, notes=notes)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


_ROWS = [
    ("weights: trained", "weights_trainable"), ("weights: frozen denoiser", "weights_frozen"),
    ("weights: text encoders + VAE", "weights_other"), ("gradients", "gradients"),
    ("optimizer (AdamW, 2 states)", "optimizer"), ("reference copy", "reference"), ("EMA copy", "ema"),
    ("old policy (NFT)", "old"), ("activations", "activations"), ("recompute (1 block)", "recompute"),
    ("gathered block (FSDP/ZeRO-3)", "gathered"), ("swap copy (not with activations)", "swap"),
]


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (GiB per GPU)."""
    size = f"{plan.height}x{plan.width}" + (f"x{plan.frames} frames" if plan.frames else "")
    mode = f"LoRA r={plan.lora_rank}" if plan.mode == "lora" else "full fine-tuning"
    lines = [
        f"{plan.model} ({plan.family}, {plan.origin}): {_count(plan.denoiser_parameters)} denoiser parameters, "
        f"{mode} ({_count(plan.trainable_parameters)} trained), {plan.dtype} weights, mixed precision "
        f"{plan.mixed_precision}",
        f"{plan.algorithm}: micro-batch {plan.micro_batch} -> {plan.forward_batch} "
        f"row{'s' if plan.forward_batch > 1 else ''} per forward at {size} "
        f"({plan.latent_tokens} latent + {plan.text_tokens} text tokens), gradient checkpointing {plan.checkpointing}; "
        f"activations {_gib(plan.activations_per_sample)} GiB per row",
        "other components: " + (", ".join(f"{c.name} {_count(c.parameters)}" for c in plan.components) or "none"),
        f"{plan.gpus} GPU{'s' if plan.gpus > 1 else ''} x {plan.gpu_mem_gib:g} GiB, margin {plan.margin:.0%}: "
        f"budget {_gib(plan.rows[0].budget) if plan.rows else '-'} GiB per GPU",
        "",
    ]
    names = [STRATEGY_NAMES[r.strategy] for r in plan.rows]
    width = max(len(label) for label, _ in _ROWS) + 2
    lines.append("GiB per GPU".ljust(width) + "".join(n.rjust(9) for n in names))
    for label, key in _ROWS:
        values = [getattr(r, key) for r in plan.rows]
        if not any(values):
            continue
        lines.append(label.ljust(width) + "".join(_gib(v).rjust(9) for v in values))
    lines.append("peak".ljust(width) + "".join(_gib(r.total).rjust(9) for r in plan.rows))
    lines.append("fits".ljust(width) + "".join(("yes" if r.fits else "NO").rjust(9) for r in plan.rows))
    fitting = [STRATEGY_NAMES[r.strategy] for r in plan.rows if r.fits]
    lines.append("")
    if fitting:
        lines.append(f"fits with {', '.join(fitting)}")
    else:
        best = min(plan.rows, key=lambda r: r.total)
        lines.append(f"does not fit: the smallest peak is {_gib(best.total)} GiB ({STRATEGY_NAMES[best.strategy]}) "
                     f"for a budget of {_gib(best.budget)} GiB; {_advice(plan, best)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _advice(plan: MemoryPlan, row: StrategyRow) -> str:
    tips = []
    if plan.checkpointing == "off" and row.activations > row.budget / 4:
        tips.append("turn on model.gradient_checkpointing=true")
    if plan.micro_batch > 1 and row.activations > row.budget / 4:
        tips.append("lower the micro-batch (train_batch_size / batch_size) and raise gradient_accumulation")
    if plan.mode == "full":
        tips.append("train a LoRA instead (lora={rank: 32, alpha: 64})")
    if row.strategy != "fsdp":
        tips.append("shard with FSDP")
    tips.append("add GPUs or use GPUs with more memory")
    return "; ".join(tips)
