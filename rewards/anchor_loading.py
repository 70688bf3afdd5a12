"""Checkpoint loading shared by the reward anchors (HPSv3, VideoReward, UnifiedReward).

The rules are those of :mod:`visalign.rewards.loading`: weights come from a hub id, a local folder
or a file; tensors are read with ``safetensors`` (``torch.load(weights_only=True)`` only for
checkpoints that were released as ``.pt`` / ``.pth``); no ``trust_remote_code``; and every load is
**strict**: the checkpoint's keys, after an explicit rename, must be exactly the model's keys, with
the same shapes, else a :class:`CheckpointMismatchError` names the checkpoint and lists the keys.

Qwen2-VL checkpoints written with transformers before 4.52 use a flat layout (``visual.*`` for the
vision tower, ``model.*`` for the language model, ``lm_head.*``); transformers 4.52 and later nest
both under ``model.`` (``model.visual.*``, ``model.language_model.*``).  :func:`qwen2vl_key` reads
either into the module names of :class:`visalign.rewards.qwen_reward.QwenRewardModel`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .loading import hub_download

__all__ = ["CheckpointMismatchError", "resolve_file", "resolve_folder", "read_tensors", "check_keys", "qwen2vl_key",
           "rename_state_dict", "merge_lora", "build_empty", "load_strict_assign"]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


def resolve_file(checkpoint: str | Path, filename: str, what: str) -> Path:
    """The checkpoint file: ``checkpoint`` itself if it is a file, ``checkpoint/filename`` if it is a
    folder, else ``filename`` from the hub repo ``checkpoint`` (the local cache when offline)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(f"{what}: no {filename} in the folder {str(path)!r}; pass the folder that holds it or "
                                "the file itself")
    if path.is_absolute() or str(checkpoint).startswith("."):
        raise FileNotFoundError(f"{what}: {str(checkpoint)!r} does not exist")
    return Path(hub_download(str(checkpoint), filename, what))


def resolve_folder(source: str | Path, what: str, files: Iterable[str] = ("config.json",)) -> str:
    """A local folder, or a hub id (returned as is when its files are cached or the machine is online)."""
    path = Path(source)
    if path.is_dir():
        return str(path)
    if path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(f"{what}: folder {str(source)!r} does not exist")
    for name in files:  # fail early, with the loader's message, when the files are not there
        hub_download(str(source), name, what)
    return str(source)


def read_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from ``.safetensors`` or a tensor-only ``torch.save`` file.

    ``.pt`` / ``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors and plain containers (no arbitrary unpickling)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise ValueError(f"{what}: {str(path)!r} is not a plain tensor checkpoint (torch.load(weights_only=True) "
                             f"refused it: {err}); convert it to safetensors") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = list(state)[:6] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{what}: {str(path)!r} does not hold a flat state dict of tensors (found {found})")
    return dict(state)


def _show(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(expected: Mapping[str, torch.Size] | Iterable[str], given: Mapping[str, torch.Tensor], what: str,
               source: str | Path) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``given`` has exactly the ``expected`` keys
    (and, when ``expected`` maps keys to shapes, the same shapes)."""
    want = dict(expected) if isinstance(expected, Mapping) else dict.fromkeys(expected)
    missing = sorted(set(want) - set(given))
    unexpected = sorted(set(given) - set(want))
    bad_shape = [f"{k}: {tuple(given[k].shape)} in the file, {tuple(want[k])} in the model" for k in sorted(want)
                 if k in given and want[k] is not None and tuple(given[k].shape) != tuple(want[k])]
    if missing or unexpected or bad_shape:
        raise CheckpointMismatchError(
            f"{what}: checkpoint {str(source)!r} does not match the model. Missing keys: [{_show(missing)}]; "
            f"unexpected keys: [{_show(unexpected)}]; shape mismatches: [{_show(bad_shape, 6)}]. Pass the official "
            "file; visalign never loads weights with strict=False."
        )


_QWEN_RULES = [
    (re.compile(r"^visual\."), "backbone.visual."),  # transformers < 4.52
    (re.compile(r"^model\.visual\."), "backbone.visual."),  # transformers >= 4.52
    (re.compile(r"^model\.language_model\."), "backbone.language_model."),
    (re.compile(r"^model\."), "backbone.language_model."),
    (re.compile(r"^rm_head\."), "rm_head."),
]


def qwen2vl_key(key: str) -> str | None:
    """Official Qwen2-VL reward-model key -> :class:`~visalign.rewards.qwen_reward.QwenRewardModel`
    key (``None`` for a key with no place, e.g. ``lm_head.weight``: the rewards read no logits)."""
    for pattern, repl in _QWEN_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def rename_state_dict(state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None],
                      ignored: re.Pattern | None, what: str, source: str | Path) -> dict[str, torch.Tensor]:
    """Apply ``rename`` to every key; keys it maps to ``None`` must match ``ignored`` (else they are
    reported as unexpected).  Two keys renamed to one name is an error."""
    out: dict[str, torch.Tensor] = {}
    homeless = []
    for key, value in state.items():
        new = rename(key)
        if new is None:
            if ignored is None or not ignored.fullmatch(key):
                homeless.append(key)
            continue
        if new in out:
            raise CheckpointMismatchError(f"{what}: checkpoint {str(source)!r} holds two tensors for {new!r} "
                                          "(both the old and the new transformers layout?)")
        out[new] = value
    if homeless:
        raise CheckpointMismatchError(f"{what}: checkpoint {str(source)!r} has keys with no place in the model: "
                                      f"[{_show(sorted(homeless))}]. Pass the official file.")
    return out


_LORA = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def merge_lora(state: Mapping[str, torch.Tensor], scale: float, what: str,
               source: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fold PEFT LoRA adapters into their base weights: ``W + scale * B @ A``.

    A PEFT state dict names a wrapped layer's own weights ``<layer>.base_layer.weight`` (and
    ``.bias``) and its adapter ``<layer>.lora_A.<adapter>.weight`` / ``lora_B``; the result names
    them ``<layer>.weight`` / ``.bias`` as the plain model does.  Returns the merged state and the
    layers that carried an adapter.  An adapter without its pair or its base weight is an error.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LORA.match(key)
        if m:
            pairs.setdefault(m["base"], {})[m["ab"]] = value
        else:
            plain[key] = value
    merged: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        merged[key.replace(".base_layer.", ".")] = value
    for layer, ab in sorted(pairs.items()):
        weight_key = f"{layer}.weight"
        if set(ab) != {"A", "B"} or weight_key not in merged:
            raise CheckpointMismatchError(f"{what}: checkpoint {str(source)!r} has an incomplete LoRA adapter on "
                                          f"{layer!r} (needs lora_A, lora_B and base_layer.weight)")
        base = merged[weight_key]
        delta = (ab["B"].float() @ ab["A"].float()) * scale
        if delta.shape != base.shape:
            raise CheckpointMismatchError(f"{what}: LoRA adapter on {layer!r} has shape {tuple(delta.shape)}, the "
                                          f"layer {tuple(base.shape)} (checkpoint {str(source)!r})")
        merged[weight_key] = (base.float() + delta).to(base.dtype)
    return merged, sorted(pairs)


def build_empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module without allocating its parameters (they are filled by :func:`load_strict_assign`);
    buffers, such as rotary frequencies, are built for real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_strict_assign(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
                       source: str | Path) -> None:
    """Strict key and shape check, then ``load_state_dict(strict=True, assign=True)`` (the
    checkpoint's tensors become the parameters: no second copy)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state, what, source)
    model.load_state_dict(dict(state), strict=True, assign=True)
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:  # cannot happen after a strict load; kept so a partial model never runs
        raise CheckpointMismatchError(f"{what}: parameters left unloaded: {_show(meta)}")
