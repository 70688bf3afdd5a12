"""``visalign.samplers.load``: a hub id, a local diffusers folder or a built-in name -> Sampler.

The family is read from ``model_index.json`` (its ``_class_name``).  Weights are loaded by the
diffusers / transformers ``from_pretrained`` of each component (safetensors, strict); nothing
runs remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from visalign.assets import asset_path, assets_dir, missing_asset_message  # noqa: F401  (assets_dir: re-exported)
from visalign.models import BUILTIN_MODELS, FAMILIES, builtin_model_path, register_family, register_model  # noqa: F401

from .contract import Sampler

__all__ = ["load", "ModelNotFoundError", "FAMILIES", "BUILTIN_MODELS", "family_of", "assets_dir", "register_family",
           "register_model", "builtin_model_path"]


class ModelNotFoundError(FileNotFoundError):
    """The model could be found neither locally nor in the hub cache (and the hub is unreachable)."""


def _how_to_get(model: str) -> str:
    return (
        f"To use {model!r} offline, download it on a connected machine "
        f"(`huggingface-cli download {model} --local-dir DIR`, or `hf download`), copy DIR here and pass "
        "--model DIR (a folder with model_index.json)."
    )


def _read_model_index(model: str) -> tuple[dict, str]:
    """Return (model_index, local-or-hub reference).  Raises ModelNotFoundError with advice."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} is a folder but has no model_index.json: it is not a diffusers model folder. "
                "Pass the folder that `pipe.save_pretrained(DIR)` or `huggingface-cli download` wrote."
            )
        return json.loads(index.read_text()), str(path)
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(
            f"model {model!r} not found: no such folder, and it is not a hub id (owner/name) or a built-in "
            f"name ({', '.join(BUILTIN_MODELS.available())}). " + _how_to_get("OWNER/NAME")
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        index_file = hf_hub_download(model, "model_index.json")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        state = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else "it could not be fetched"
        raise ModelNotFoundError(f"model {model!r}: {state} ({type(err).__name__}). " + _how_to_get(model)) from err
    return json.loads(Path(index_file).read_text()), model


def family_of(model_index: dict) -> str:
    cls = model_index.get("_class_name", "")
    if cls not in FAMILIES:
        raise ValueError(
            f"unsupported pipeline class {cls!r} in model_index.json; visalign supports "
            + ", ".join(f"{k} ({e.family})" for k, e in FAMILIES.items())
            + " (a package can add a family with visalign.samplers.register_family)"
        )
    return FAMILIES[cls].family


def load(model: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None, **options) -> Sampler:
    """Load a model as a :class:`Sampler`.

    Args:
        model: a built-in name (:func:`register_model`), a local folder in diffusers layout, or a hub id
            (``"stabilityai/stable-diffusion-3.5-medium"``; needs the hub or its local cache).
        dtype: weights' dtype (``torch.bfloat16``, ``"float16"``...); defaults to float32.
        device: where to put the model; defaults to CPU.
        options: passed to the family adapter (e.g. ``max_sequence_length``, ``num_frames``).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = model
    if model in BUILTIN_MODELS:
        local = builtin_model_path(model)
        if not (local / "model_index.json").is_file():
            hint = BUILTIN_MODELS[model].hint
            raise ModelNotFoundError(
                f"built-in model {model!r}: " + missing_asset_message(str(BUILTIN_MODELS[model].target))
                + (f" {hint}" if hint else "")
            )
        model = str(local)
    index, ref = _read_model_index(model)
    family_of(index)
    sampler_cls = FAMILIES.get(index["_class_name"])
    if hasattr(sampler_cls, "from_folder"):  # not a diffusers pipeline: the family reads its folder
        return sampler_cls.from_folder(ref, dtype=dtype, device=device, name=name, **options)
    from diffusers import DiffusionPipeline

    kwargs = {"dtype": dtype} if dtype is not None else {}
    # Optional components saved as [null, null] (e.g. SD3 without T5) must be passed as None.
    kwargs.update({k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]})
    pipe = DiffusionPipeline.from_pretrained(ref, **kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return sampler_cls(pipe, name=name, **options)
