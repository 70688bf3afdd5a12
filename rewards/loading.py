"""Weight loading for reward models: strict, no unpickling, offline-aware errors.

Rules (docs/rewards.md and docs/architecture.md): weights come from a hub id or a local path; state
dicts are read with ``safetensors`` or ``torch.load(weights_only=True)``; they are loaded
**strictly** (a missing or unexpected key is an error that lists the keys); when a file is not
there and the machine is offline, the error names the id and says where to put the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "MissingWeightsError",
    "hub_download",
    "is_offline",
    "load_state_dict_file",
    "load_strict",
    "resolve_dtype",
    "resolve_device",
]


class MissingWeightsError(FileNotFoundError):
    """Weights that are neither a local path nor in the Hugging Face cache (and no network)."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def missing_weights(what: str, repo_id: str, filename: str | None = None, cause: BaseException | None = None) -> MissingWeightsError:
    """An error that names the weights and says how to get them."""
    file_part = f" {filename}" if filename else ""
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return MissingWeightsError(
        f"cannot find the weights of {what}: hub id {repo_id!r}{file_part} is not in the local Hugging Face cache"
        f"{' and HF_HUB_OFFLINE=1' if is_offline() else ' and could not be downloaded'}{why}. On a connected "
        f"machine run `huggingface-cli download {repo_id}{file_part}` (the cache is then used offline; copy "
        f"~/.cache/huggingface to this machine if needed), or download the files and pass their local path instead."
    )


def hub_download(repo_id: str, filename: str, what: str) -> str:
    """Path of ``filename`` in hub repo ``repo_id`` (from the cache when offline), or a clear error."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=is_offline())
    except Exception as err:  # network, cache miss, gated repo: all mean "the file is not here"
        raise missing_weights(what, repo_id, filename, err) from err


def load_state_dict_file(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Args:
        path: the file.
        key: if the file holds a dict with this key (``"state_dict"`` in HPSv2 checkpoints), return
            that entry.  A ``"module."`` prefix on every key (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a .safetensors/.pt/.pth/.bin file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{str(path)!r} is not a plain tensor checkpoint (torch.load(weights_only=True) refused it: {err}). "
                "visalign does not unpickle arbitrary objects; convert the file to safetensors or a state dict."
            ) from err
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors (found {keys})")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that lists the bad keys."""
    expected = set(module.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        raise ValueError(
            f"weights for {what} do not match the model: missing keys [{show(missing)}]; unexpected keys "
            f"[{show(unexpected)}]. Check that the architecture matches the checkpoint (visalign never loads "
            "with strict=False)."
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights for {what} do not match the model: {err}") from err


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")
