"""Reward-side guards against reward hacking (docs/reward_training.md, "Guards").

- :class:`UncertaintyPenalty` (``uncertainty_penalty``): ``r'_i = r_i - kappa * u_i`` with ``u_i``
  the wrapped reward's uncertainty component (a head ensemble's standard deviation).  A
  conservative reward that is worth less where its ensemble disagrees: the uncertainty-weighted
  objective of Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization",
  ``mean - lambda * std``), and the reward-side form of Ctrl-U's idea that uncertain rewards should
  count less (Zhang et al. 2025, "Ctrl-U: Robust Conditional Image Generation via
  Uncertainty-aware Reward Modeling"; Ctrl-U reweights the reward *loss* by an uncertainty from
  two generations, see the docs for the difference).
- :class:`DiversityBonus` (``diversity``): ``d_i = mean_{j in g(i), j != i} (1 - cos(f_i, f_j))``
  (or the ``min`` over ``j``, the distance to the nearest other sample) of backbone features
  ``f`` (DINOv2 or CLIP), within each sample's group ``g(i)``; add it to a reward with
  :func:`visalign.rewards.combine` (``{"shapes-proxy": 1, "diversity:...": 0.1}``) or wrap one
  with ``reward=``.  It pays samples for being unlike the rest of their prompt's group, against
  the mode collapse that comes with hacking (GARDO, He et al. 2025, "Reinforcing Diffusion Models
  without Reward Hacking", amplifies advantages by such a DINO-feature diversity).

Groups are those of :mod:`.compose`: ``metadata[j]["group"]`` when every sample has one, else
consecutive blocks of ``group_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .backbones import Backbone, backbones_of, get_backbone, share_forward
from .base import Reward, RewardOutput
from .compose import _groups
from .registry import info as registry_info
from .registry import load as load_reward

__all__ = ["UncertaintyPenalty", "uncertainty_penalty", "DiversityBonus", "diversity", "group_diversity"]


class UncertaintyPenalty(Reward):
    """``score = reward.score - kappa * reward.components[component]``.

    Args:
        reward (`Reward`): a reward with an uncertainty component (a ``head`` ensemble, or
            ``shapes-proxy``).
        kappa (`float`, *optional*, defaults to 1.0): the penalty per unit of uncertainty (>= 0).
        component (`str`, *optional*, defaults to ``"uncertainty"``): which component to subtract.

    Components: the wrapped reward's, plus ``unpenalized`` (its score) and ``penalty``
    (``kappa * u``).  Differentiable where the wrapped reward and its uncertainty are.
    """

    def __init__(self, reward: Reward, kappa: float = 1.0, component: str = "uncertainty") -> None:
        if kappa < 0:
            raise ValueError(f"uncertainty_penalty: kappa must be >= 0 (a penalty), got {kappa}")
        self.reward, self.kappa, self.component = reward, float(kappa), component
        base = registry_info("uncertainty_penalty")
        self.info = dataclasses.replace(
            base, name=f"uncertainty_penalty({reward.info.name})", inputs=reward.info.inputs,
            modality=reward.info.modality, licence=reward.info.licence, weights=reward.info.weights,
            differentiable=reward.info.differentiable, native_range=(float("-inf"), reward.info.native_range[1]),
            description=f"{reward.info.name} minus {kappa:g} x its {component}")

    @property
    def backbones(self) -> list[Backbone]:
        return backbones_of(self.reward)

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        out = self.reward(images, prompts, references=references, metadata=metadata)
        if self.component not in out.components:
            raise ValueError(
                f"uncertainty_penalty: reward {self.reward.info.name!r} has no component {self.component!r} "
                f"(it has {sorted(out.components)}); wrap a reward with an uncertainty, e.g. a trained head "
                "ensemble (head:path=DIR) or shapes-proxy, or name the component with component=...")
        penalty = self.kappa * out.components[self.component]
        components = {**out.components, "unpenalized": out.scores.detach(), "penalty": penalty.detach()}
        return RewardOutput(out.scores - penalty, components=components, valid=out.valid, extras=out.extras)


def uncertainty_penalty(reward: str | Reward | None = None, kappa: float = 1.0, component: str = "uncertainty",
                        **options: Any) -> UncertaintyPenalty:
    """``uncertainty_penalty:reward=head,path=DIR,kappa=0.5``: the reward (a name, built with the
    remaining ``options``) minus ``kappa`` times its uncertainty."""
    if reward is None:
        raise ValueError("uncertainty_penalty needs reward=NAME (e.g. uncertainty_penalty:reward=head,path=DIR,kappa=1)")
    inner = load_reward(reward, **options) if isinstance(reward, str) else reward
    return UncertaintyPenalty(inner, kappa=kappa, component=component)


def group_diversity(features: torch.Tensor, groups: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """``(B,)`` cosine distance of each sample's features to the other members of its group:
    the ``mean`` over them, or the ``min`` (nearest neighbour).  0 for a sample alone in its group."""
    if aggregate not in ("mean", "min"):
        raise ValueError(f"diversity aggregate={aggregate!r}: choose 'mean' or 'min'")
    f = F.normalize(features.float(), dim=-1)
    dist = 1 - f @ f.T  # (B, B)
    same = groups[:, None] == groups[None, :]
    others = same & ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    n = others.sum(1)
    if aggregate == "mean":
        d = torch.where(others, dist, 0).sum(1) / n.clamp_min(1)
    else:
        d = torch.where(others, dist, torch.inf).amin(1)
    return torch.where(n > 0, d, torch.zeros_like(d))


class DiversityBonus(Reward):
    """Within-group feature diversity (module docstring), optionally added to a reward.

    Args:
        features (`Callable` or `Backbone`): images in [0, 1] -> ``(B, D)`` features; a zoo
            backbone with ``feature`` naming its output (``"cls"`` for DINOv2, ``"embeds"`` for CLIP).
        weight (`float`, *optional*, defaults to 1.0): ``w`` in ``score = reward + w * d`` (or ``w * d``
            alone without ``reward``).
        group_size (`int`, *optional*): samples per group when metadata carries no ``group`` labels.
        aggregate (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` or ``"min"`` distance.
        reward (`Reward`, *optional*): the reward the bonus is added to.

    Components: ``diversity`` (``d``), and with ``reward`` its components and ``base`` (its score).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | Backbone, weight: float = 1.0,
                 group_size: int | None = None, aggregate: str = "mean", reward: Reward | None = None,
                 feature: str = "cls") -> None:
        if aggregate not in ("mean", "min"):
            raise ValueError(f"diversity aggregate={aggregate!r}: choose 'mean' or 'min'")
        self.backbone = features if isinstance(features, Backbone) else None
        self.features = (lambda x: features.image_features(x)[feature]) if isinstance(features, Backbone) else features
        self.weight, self.group_size, self.aggregate, self.reward = float(weight), group_size, aggregate, reward
        base = registry_info("diversity")
        inputs = tuple(dict.fromkeys(("images", *(reward.info.inputs if reward else ()))))
        self.info = dataclasses.replace(
            base, inputs=inputs, name=f"diversity({reward.info.name})" if reward else "diversity",
            native_range=(float("-inf"), float("inf")) if reward else (0.0, 2.0 * self.weight),
            differentiable=reward.info.differentiable if reward else True)

    @property
    def backbones(self) -> list[Backbone]:
        found = [self.backbone] if self.backbone is not None else []
        return found + [b for b in backbones_of(self.reward) if all(b is not f for f in found)] if self.reward else found

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 4:
            raise ValueError(f"reward 'diversity' scores images (B, 3, H, W); got {tuple(images.shape)}")
        groups = _groups(images.shape[0], self.group_size, metadata).to(images.device)
        with share_forward([self] + ([self.reward] if self.reward else [])):
            d = group_diversity(self.features(images), groups, self.aggregate)
            if self.reward is None:
                return RewardOutput(self.weight * d, components={"diversity": d.detach()})
            out = self.reward(images, prompts if "prompts" in self.reward.info.inputs else None,
                              references=references, metadata=metadata)
        components = {**out.components, "base": out.scores.detach(), "diversity": d.detach()}
        return RewardOutput(out.scores + self.weight * d.to(out.scores), components=components, valid=out.valid,
                            extras=out.extras)


def diversity(weight: float = 1.0, group_size: int | None = None, aggregate: str = "mean", backbone: str = "dinov2",
              model: str | None = None, pretrained: str | None = None, feature: str | None = None,
              reward: str | None = None, dtype: Any = None, device: Any = None, **reward_options: Any) -> DiversityBonus:
    """``diversity:group_size=8,weight=0.1`` (DINOv2-base CLS features by default), or on CLIP:
    ``diversity:backbone=open_clip,model=ViT-L-14,pretrained=openai``; ``reward=NAME`` (plus that
    reward's options) adds the bonus to a reward."""
    if backbone == "dinov2":
        bb = get_backbone("dinov2", model or "facebook/dinov2-base", dtype=dtype, device=device)
        feature = feature or "cls"
    elif backbone == "open_clip":
        bb = get_backbone("open_clip", model or "ViT-L-14", pretrained or "openai", dtype=dtype, device=device)
        feature = feature or "embeds"
    elif backbone == "transformers-clip":
        bb = get_backbone("transformers-clip", model or "openai/clip-vit-large-patch14", None, dtype=dtype,
                          device=device)
        feature = feature or "embeds"
    else:
        raise ValueError(f"diversity backbone={backbone!r}: choose 'dinov2', 'open_clip' or 'transformers-clip'")
    inner = load_reward(reward, **reward_options) if reward is not None else None
    if inner is None and reward_options:
        raise ValueError(f"diversity: unknown options {sorted(reward_options)} (reward options need reward=NAME)")
    return DiversityBonus(bb, weight=weight, group_size=group_size, aggregate=aggregate, reward=inner, feature=feature)
