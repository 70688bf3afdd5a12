"""LoRA on a Sampler's denoiser via peft, saved in diffusers' LoRA format.

Saved adapters load with ``pipe.load_lora_weights(dir)`` for the diffusers families and with
:func:`load_lora` (``visalign toy eval --lora DIR``) for every family.  What each family adapts by
default, and under which prefix diffusers stores it, are facts of the family adapter
(``Sampler.lora_targets``, ``lora_prefix``, ``lora_writer``); the defaults follow the reference
implementations (Flow-GRPO for SD3: the attention projections of both streams; the attention
projections of the UNet families).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["add_lora", "save_lora", "load_lora", "load_finetuned", "lora_state_dict", "has_lora"]


def has_lora(sampler) -> bool:
    """Whether the denoiser carries peft adapters."""
    return bool(getattr(sampler.denoiser, "peft_config", None))


def add_lora(sampler, *, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] | None = None,
             init: str = "gaussian", adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the denoiser and add trainable LoRA adapters (``B = 0``: the model is unchanged at
    the start); returns the trainable parameters.  ``target_modules`` defaults to the family's
    ``sampler.lora_targets``; ``init`` is peft's ``init_lora_weights`` (``"gaussian"``,
    ``"default"`` for Kaiming-uniform A)."""
    from peft import LoraConfig

    targets = list(target_modules or sampler.lora_targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=init if init != "default" else True)
    sampler.denoiser.requires_grad_(False)
    sampler.denoiser.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in sampler.denoiser.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"LoRA matched no module of the {sampler.family} denoiser; targets were {targets}. "
                         "Set lora.target_modules to names of its Linear / Conv layers.")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(sampler, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(sampler.denoiser, adapter_name=adapter_name).items()}


def save_lora(sampler, out_dir: str | Path, adapter_name: str = "default",
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters with diffusers' own LoRA writer (``pytorch_lora_weights.safetensors`` with
    the adapter config as metadata), so ``pipe.load_lora_weights(out_dir)`` restores rank and alpha.
    The folder is written beside ``out_dir`` and renamed into place.  ``state_dict`` is the denoiser's
    full state dict to take the adapters from (gathered from a sharded run) instead of the denoiser's
    own."""
    import shutil
    import tempfile

    import diffusers
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = getattr(diffusers, sampler.lora_writer)
    prefix = sampler.lora_prefix
    layers = get_peft_model_state_dict(sampler.denoiser, state_dict=state_dict, adapter_name=adapter_name)
    layers = {k: v.contiguous().cpu() for k, v in layers.items()}
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
        raise FileNotFoundError(f"no LoRA weights at {str(path)!r}: expected pytorch_lora_weights.safetensors "
                                "(the final/ or export/iter_N folder of a `visalign train` run)")
    sampler.denoiser.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=sampler.lora_prefix,
                                       adapter_name=adapter_name)
    sampler.denoiser.set_adapters([adapter_name])


def load_finetuned(sampler, path: str | Path) -> str:
    """Load what ``visalign train`` wrote to ``RUN/final`` (or ``RUN/export/iter_N``) onto ``sampler``:
    a LoRA (``pytorch_lora_weights.safetensors``, :func:`load_lora`) or, after full fine-tuning
    (``lora: null``), the denoiser's weights (``denoiser.safetensors``, loaded strictly: every key
    of the denoiser, no other).  Returns ``"lora"`` or ``"full"``."""
    p = Path(path)
    if p.is_dir() and not (p / "pytorch_lora_weights.safetensors").is_file():
        full = p / "denoiser.safetensors"
        if not full.is_file():
            raise FileNotFoundError(f"no fine-tuned weights in {str(p)!r}: expected pytorch_lora_weights.safetensors "
                                    "(a LoRA) or denoiser.safetensors (full fine-tuning), as `visalign train` writes "
                                    "to RUN/final or RUN/export/iter_N")
        from safetensors.torch import load_file

        try:
            sampler.denoiser.load_state_dict(load_file(str(full), device="cpu"), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{full} does not fit the {sampler.name} denoiser (was it fine-tuned from another "
                             f"base?): {str(err).splitlines()[0]}") from None
        return "full"
    load_lora(sampler, p)
    return "lora"
