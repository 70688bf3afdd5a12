"""LoRA on a Sampler's denoiser via peft, saved in diffusers' LoRA format.

Saved adapters load with ``pipe.load_lora_weights(dir)`` for the diffusers families and with
``visalign toy eval --lora DIR`` (``load_lora``) for the toy model.  Default target modules per
family follow the reference implementations (Flow-GRPO for SD3: attention projections of both
streams; the attention projections of the UNet families).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LoraSettings", "DEFAULT_TARGETS", "add_lora", "save_lora", "load_lora", "lora_state_dict", "weight_prefix"]

_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT = _ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

#: per-family default LoRA target modules
DEFAULT_TARGETS: dict[str, list[str]] = {
    "sd": _ATTN,
    "sdxl": _ATTN,
    "toy": _ATTN,
    "sd3": _JOINT,
    "flux": _JOINT,
    "wan": _ATTN,
}


@dataclass
class LoraSettings:
    """LoRA hyperparameters (Flow-GRPO's SD3.5 defaults: r = 32, alpha = 64)."""

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    #: module name suffixes to adapt; None = the family default (DEFAULT_TARGETS)
    target_modules: list[str] | None = None
    #: "gaussian" (A ~ N(0, 1/r), B = 0) keeps the initial model exactly; peft's default is the same for B
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


def weight_prefix(family: str) -> str:
    """The component name diffusers' LoRA loaders use for the denoiser."""
    return "unet" if family in ("sd", "sdxl", "toy") else "transformer"


def add_lora(sampler, settings: LoraSettings, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the denoiser and add trainable LoRA adapters; returns the trainable parameters."""
    from peft import LoraConfig

    targets = settings.target_modules or DEFAULT_TARGETS[sampler.family]
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        init_lora_weights=settings.init if settings.init != "default" else True, target_modules=targets,
    )
    sampler.denoiser.requires_grad_(False)
    sampler.denoiser.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in sampler.denoiser.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"LoRA matched no module of the {sampler.family} denoiser; targets were {targets}")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(sampler) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(sampler.denoiser).items()}


#: the diffusers pipeline class whose LoRA writer matches each family's loader
_WRITERS = {"sd": "StableDiffusionPipeline", "toy": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
            "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}


def save_lora(sampler, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapters with diffusers' own LoRA writer (``pytorch_lora_weights.safetensors`` with
    the adapter config as metadata), so ``pipe.load_lora_weights(out_dir)`` restores rank and alpha.
    The folder is written beside ``out_dir`` and renamed into place."""
    import shutil
    import tempfile

    import diffusers
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = getattr(diffusers, _WRITERS[sampler.family])
    prefix = weight_prefix(sampler.family)
    layers = get_peft_model_state_dict(sampler.denoiser, adapter_name=adapter_name)
    metadata = sampler.denoiser.peft_config[adapter_name].to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer.save_lora_weights(tmp, **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_lora(sampler, lora_dir: str | Path, adapter_name: str = "default") -> None:
    """Load adapters saved by :func:`save_lora` onto ``sampler.denoiser`` (strict key check)."""
    path = Path(lora_dir)
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {str(path)!r}: expected pytorch_lora_weights.safetensors")
    sampler.denoiser.load_lora_adapter(str(file.parent), weight_name=file.name,
                                       prefix=weight_prefix(sampler.family), adapter_name=adapter_name)
    sampler.denoiser.set_adapters([adapter_name])
