"""Registry of rewards kept as data, and ``load(name_or_spec, **options)``.

Each entry names the module and class that build the reward, so importing
``visalign.rewards`` imports no model code: open_clip / transformers load only when a reward
that needs them is built (importing ``visalign.rewards`` loads no model code).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .base import Reward, RewardInfo

__all__ = ["register", "load", "available", "info", "parse_spec", "factory_parameters"]


@dataclass(frozen=True)
class _Entry:
    info: RewardInfo
    target: str  # "module:attr", module relative to visalign.rewards, attr a Reward factory


_REGISTRY: dict[str, _Entry] = {}


def register(info: RewardInfo, target: str) -> None:
    """Register a reward: ``target`` is ``"module:Factory"`` (module relative to ``visalign.rewards``)."""
    if info.name in _REGISTRY and _REGISTRY[info.name].target != target:
        raise ValueError(f"reward {info.name!r} is already registered to {_REGISTRY[info.name].target}")
    _REGISTRY[info.name] = _Entry(info, target)


def available() -> list[RewardInfo]:
    """All registered rewards, sorted by name."""
    return [_REGISTRY[k].info for k in sorted(_REGISTRY)]


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"unknown reward {name!r}.{hint} Known rewards: {', '.join(sorted(_REGISTRY))} "
        "(run `visalign rewards` for the catalogue)."
    )


def info(name: str) -> RewardInfo:
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name].info


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"clipscore:model=ViT-L-14,scale=2.5"`` -> ``("clipscore", {"model": "ViT-L-14", "scale": 2.5})``."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    if rest:
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(
                    f"bad reward spec {spec!r}: options are key=value separated by commas, "
                    f"e.g. 'clipscore:model=ViT-L-14,scale=2.5' (got {part!r})"
                )
            options[key.strip()] = _parse_value(value.strip())
    return name.strip(), options


def factory_parameters(name: str) -> set[str] | None:
    """Keyword names the reward's factory accepts (None when it takes ``**options``)."""
    import inspect

    if name not in _REGISTRY:
        raise _unknown(name)
    module_name, _, attr = _REGISTRY[name].target.partition(":")
    factory = getattr(importlib.import_module(f"visalign.rewards.{module_name}"), attr)
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def load(name_or_spec: str, **options: Any) -> Reward:
    """Build a reward by name or spec string; keyword options override the spec's.

    Examples::

        visalign.rewards.load("aesthetic")
        visalign.rewards.load("clipscore:model=ViT-L-14", device="cuda")
    """
    name, spec_options = parse_spec(name_or_spec)
    if name not in _REGISTRY:
        raise _unknown(name)
    module_name, _, attr = _REGISTRY[name].target.partition(":")
    module = importlib.import_module(f"visalign.rewards.{module_name}")
    factory: Callable[..., Reward] = getattr(module, attr)
    return factory(**{**spec_options, **options})
