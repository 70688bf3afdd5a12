"""Reward composition: ``combine({reward: weight}, normalize=..., transform=..., ensemble=...)``.

Per input reward ``i`` with native scores ``s_i``:

1. ``n_i = normalize(s_i)``: ``"none"``; ``"batch"`` (z-score over the valid samples of the
   batch); ``"group"`` (z-score within each prompt group, GRPO-style; groups are the labels
   ``metadata[j]["group"]`` when every sample has one, else consecutive blocks of ``group_size``;
   labels on some samples only are an error); ``("affine", a, b)`` (``a * s + b``,
   e.g. Flow-GRPO's PickScore ``/ 26`` is ``("affine", 1/26, 0)``).
2. ``t_i = transform(n_i)``: ``None``, ``"clamp"`` (to [0, 1]) or ``("clamp", lo, hi)``,
   ``"sigmoid"``, ``"logsigmoid"``, ``"rank"`` (batch rank scaled to [0, 1]).
3. ``score = ensemble({w_i * t_i})``: ``"sum"`` (default, ``sum_i w_i t_i``), ``"mean"``
   (``sum_i w_i t_i / sum_i w_i``), ``"min"`` (``min_i w_i t_i``), ``("mean_minus_std", k)``
   (``mean_i - k * std_i`` of ``w_i t_i``: a conservative ensemble of reward models that resists
   hacking any one of them, Coste et al. 2024 "Reward Model Ensembles Help Mitigate Overoptimization").

Components keep each input's native scores (``components[name]``) and their own components
(``components["name/sub"]``).  A sample is valid only where every input is valid; its score is
NaN elsewhere.  Rewards on one backbone share its forward pass (:func:`.backbones.share_forward`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .backbones import Backbone, backbones_of, share_forward
from .base import Reward, RewardInfo, RewardOutput
from .registry import load as load_reward

__all__ = ["CombinedReward", "combine", "NORMALIZERS", "TRANSFORMS", "ENSEMBLES"]

_EPS = 1e-6


def _masked_zscore(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    n = valid.sum().clamp_min(1)
    mean = torch.where(valid, s, 0).sum() / n
    var = torch.where(valid, (s - mean) ** 2, 0).sum() / (n - 1).clamp_min(1)
    return (s - mean) / (var.sqrt() + _EPS)


def _groups(batch: int, group_size: int | None, metadata: Sequence[dict] | None) -> torch.Tensor:
    # metadata has passed Reward.__call__: None or one dict per sample ({} where the caller gave None)
    labelled = [i for i, m in enumerate(metadata or ()) if "group" in m]
    if metadata is not None and len(labelled) == batch:
        labels = [m["group"] for m in metadata]
        index = {g: i for i, g in enumerate(dict.fromkeys(labels))}
        return torch.tensor([index[g] for g in labels])
    if labelled:  # half-labelled: consecutive blocks would silently mix the labelled groups
        have = set(labelled)
        missing = [i for i in range(batch) if i not in have]
        raise ValueError(
            f"normalize='group': metadata gives a 'group' label for samples {labelled[:8]} but not for "
            f"samples {missing[:8]} (of {batch}); label every sample or none (then group_size is used)"
        )
    if group_size is None or batch % group_size:
        raise ValueError(
            f"normalize='group' needs group_size dividing the batch (got group_size={group_size}, batch={batch}) "
            "or metadata=[{'group': ...}, ...] for every sample"
        )
    return torch.arange(batch) // group_size


def _norm_none(s, valid, ctx, *args):
    return s


def _norm_batch(s, valid, ctx, *args):
    return _masked_zscore(s, valid)


def _norm_group(s, valid, ctx, *args):
    groups = _groups(s.shape[0], ctx["group_size"], ctx["metadata"]).to(s.device)
    out = torch.zeros_like(s)
    for g in groups.unique():
        m = groups == g
        out = torch.where(m, _masked_zscore(s, valid & m), out)
    return out


def _norm_affine(s, valid, ctx, a=1.0, b=0.0):
    return a * s + b


NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "none": _norm_none, "batch": _norm_batch, "group": _norm_group, "affine": _norm_affine,
}


def _rank(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # rank among valid samples, 0 (worst) .. 1 (best); not differentiable
    keyed = torch.where(valid, x.detach(), -torch.inf)
    ranks = keyed.argsort().argsort().float() - (~valid).sum()
    return ranks / (valid.sum() - 1).clamp_min(1)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": lambda x, valid, lo=0.0, hi=1.0: x,
    "clamp": lambda x, valid, lo=0.0, hi=1.0: x.clamp(lo, hi),
    "sigmoid": lambda x, valid: torch.sigmoid(x),
    "logsigmoid": lambda x, valid: torch.nn.functional.logsigmoid(x),
    "rank": _rank,
}


def _ens_sum(terms, weights, *args):
    return terms.sum(0)


def _ens_mean(terms, weights, *args):
    return terms.sum(0) / weights.sum()


def _ens_min(terms, weights, *args):
    return terms.amin(0)


def _ens_mean_minus_std(terms, weights, k=1.0):
    std = terms.std(0, unbiased=False) if terms.shape[0] > 1 else torch.zeros_like(terms[0])
    return terms.mean(0) - k * std


ENSEMBLES: dict[str, Callable[..., torch.Tensor]] = {
    "sum": _ens_sum, "mean": _ens_mean, "min": _ens_min, "mean_minus_std": _ens_mean_minus_std,
}


def _parse(choice: Any, table: Mapping[str, Callable], what: str) -> tuple[str, tuple]:
    """``"name"`` or ``("name", *args)`` or ``"name:arg"`` -> (name, args), checked against ``table``."""
    if choice is None:
        choice = "identity" if what == "transform" else "none"
    if isinstance(choice, str):
        name, _, arg = choice.partition(":")
        args: tuple = tuple(float(a) for a in arg.split(",")) if arg else ()
    elif isinstance(choice, (tuple, list)) and choice and isinstance(choice[0], str):
        name, args = choice[0], tuple(float(a) for a in choice[1:])
    else:
        raise ValueError(f"{what}={choice!r}: give a name or a tuple (name, *numbers); names: {sorted(table)}")
    if name not in table:
        raise ValueError(f"{what}={name!r}: choose one of {sorted(table)}")
    return name, args


class CombinedReward(Reward):
    """The Reward that :func:`combine` returns."""

    def __init__(self, rewards: Sequence[tuple[str, Reward, float]], normalize: Any, transform: Any,
                 ensemble: Any, group_size: int | None) -> None:
        self.parts = list(rewards)
        self.normalize = _parse(normalize, NORMALIZERS, "normalize")
        self.transform = _parse(transform, TRANSFORMS, "transform")
        self.ensemble = _parse(ensemble, ENSEMBLES, "ensemble")
        self.group_size = group_size
        infos = [r.info for _, r, _ in self.parts]
        inputs = tuple(dict.fromkeys(i for info in infos for i in info.inputs))
        modalities = sorted({info.modality for info in infos})
        self.info = RewardInfo(
            name="combine(" + ",".join(n for n, _, _ in self.parts) + ")",
            licence=" AND ".join(sorted({i.licence for i in infos if i.licence != "none"})) or "none",
            modality=modalities[0] if len(modalities) == 1 else "image,video", inputs=inputs,
            native_range=(float("-inf"), float("inf")),
            differentiable=all(i.differentiable for i in infos) and self.transform[0] != "rank",
            weights="; ".join(i.weights for i in infos if i.weights != "none") or "none",
            description="weighted combination of " + ", ".join(f"{w:g}*{n}" for n, _, w in self.parts),
        )

    @property
    def backbones(self) -> list[Backbone]:
        found: list[Backbone] = []
        for _, r, _ in self.parts:
            found += [b for b in backbones_of(r) if all(b is not f for f in found)]
        return found

    def to(self, device: torch.device | str) -> "CombinedReward":
        for _, reward, _ in self.parts:
            reward.to(device)
        return self

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        ctx = {"group_size": self.group_size, "metadata": metadata}
        outs: list[RewardOutput] = []
        with share_forward([r for _, r, _ in self.parts]):
            for _, reward, _ in self.parts:
                outs.append(reward(images, prompts if "prompts" in reward.info.inputs else None,
                                   references=references, metadata=metadata))
        valid = torch.stack([o.valid for o in outs]).all(0)  # (B,)
        norm, targs = NORMALIZERS[self.normalize[0]], self.transform[1]
        terms = []
        for (_, _, weight), out in zip(self.parts, outs):
            s = torch.where(valid, out.scores.float(), 0)  # invalid entries out of every statistic
            t = TRANSFORMS[self.transform[0]](norm(s, valid, ctx, *self.normalize[1]), valid, *targs)
            terms.append(weight * t)
        weights = torch.tensor([w for _, _, w in self.parts], device=valid.device)
        total = ENSEMBLES[self.ensemble[0]](torch.stack(terms), weights, *self.ensemble[1])
        components: dict[str, torch.Tensor] = {}
        extras: dict[str, Any] = {}
        for (name, _, _), out in zip(self.parts, outs):
            components[name] = out.scores.detach()
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
            extras.update({f"{name}/{k}": v for k, v in out.extras.items()})
        total = torch.where(valid, total, torch.nan)
        return RewardOutput(total, components=components, valid=valid, extras=extras)


def combine(rewards: Mapping[str | Reward, float], normalize: Any = "none", transform: Any = None,
            ensemble: Any = "sum", group_size: int | None = None, shared: Mapping[str, Any] | None = None,
            **load_options: Any) -> CombinedReward:
    """Combine rewards into one; see the module docstring for the options.

    Args:
        rewards: ``{name_or_spec_or_Reward: weight}``; names and spec strings are built with
            :func:`visalign.rewards.load` and ``load_options`` (e.g. ``device``).
        shared: options offered to every named reward, each taking those its factory accepts
            (:func:`visalign.rewards.load`'s ``shared``).
        normalize, transform, ensemble: a name or a tuple ``(name, *numbers)`` (or ``"name:n1,n2"``).
        group_size: samples per prompt group for ``normalize="group"``.

    Example::

        combine({"aesthetic": 1.0, "pickscore": 1.0}, normalize=("affine", 1 / 26, 0))
    """
    if not rewards:
        raise ValueError("combine() needs at least one reward: combine({'aesthetic': 1.0})")
    parts: list[tuple[str, Reward, float]] = []
    names: set[str] = set()
    for key, weight in rewards.items():
        reward = load_reward(key, shared=shared, **load_options) if isinstance(key, str) else key
        if not isinstance(reward, Reward):
            raise TypeError(f"combine: {key!r} is not a reward name, spec string or Reward")
        name = key if isinstance(key, str) else reward.info.name
        base, i = name, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.add(name)
        parts.append((name, reward, float(weight)))
    return CombinedReward(parts, normalize, transform, ensemble, group_size)
