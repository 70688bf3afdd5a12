"""Registry of rewards kept as data, ``load(spec, **options)`` and ``register(...)``.

Each entry names the module and factory that build the reward, so importing
``visalign.rewards`` imports no model code: open_clip / transformers load only when a reward
that needs them is built.  Packages outside visalign register their own rewards with
:func:`register` and an absolute target (``"mypkg.rewards:MyReward"``), at run time or from a
plug-in (:mod:`visalign.registry`); docs/rewards.md shows how.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

from visalign.registry import Registry

from .base import Reward, RewardInfo

__all__ = ["register", "load", "available", "info", "parse_spec", "factory_parameters"]

#: name -> Entry(target, info=RewardInfo); short targets of the built-in catalogue
#: (``"clip_rewards:aesthetic"``) name modules of visalign.rewards
_REGISTRY = Registry("reward", package="visalign.rewards", hint="(run `visalign rewards` for the catalogue)",
                     unique=True)


def register(info: RewardInfo | str, target: str | Callable[..., Reward], **facts: Any) -> None:
    """Register a reward so that ``load(name)``, recipes and ``visalign rewards`` know it.

    Args:
        info: a :class:`RewardInfo`, or the reward's name with the facts as keywords
            (``version``, ``licence``, ``modality``, ``inputs``, ``native_range``,
            ``differentiable``, ``weights``, ``description``; :class:`RewardInfo` has defaults).
        target: the factory (a :class:`Reward` subclass or a function returning one): an absolute
            ``"package.module:Factory"`` string, imported on first use, or the object itself.

    Example::

        visalign.rewards.register("sharpness", "mypkg.rewards:Sharpness", differentiable=True,
                                  description="Laplacian variance")
        visalign.rewards.load("sharpness:radius=2")

    Re-registering a name to another target is an error.
    """
    if isinstance(info, str):
        info = RewardInfo(info, **facts)
    elif facts:
        raise TypeError(f"register({info.name!r}): give the facts either in the RewardInfo or as keywords, not both")
    _REGISTRY.register(info.name, target, info=info)


def available() -> list[RewardInfo]:
    """All registered rewards, sorted by name."""
    return [_REGISTRY[k].info for k in _REGISTRY.available()]


def info(name: str) -> RewardInfo:
    return _REGISTRY.entry(name).info


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
    params = inspect.signature(_REGISTRY.get(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def load(spec: str, /, *, shared: Mapping[str, Any] | None = None, **options: Any) -> Reward:
    """Build one reward from a name or a spec string (``"clipscore:model=ViT-L-14"``); ``shared``
    and ``options`` as in :func:`visalign.rewards.load`, which also takes a mapping of weights."""
    if isinstance(spec, Mapping):
        raise TypeError("a mapping of weights is built by visalign.rewards.load (or combine), not the registry")
    name, spec_options = parse_spec(spec)
    factory: Callable[..., Reward] = _REGISTRY.get(name)
    if shared:
        accepted = factory_parameters(name)
        shared = dict(shared) if accepted is None else {k: v for k, v in shared.items() if k in accepted}
    return factory(**{**spec_options, **(shared or {}), **options})
