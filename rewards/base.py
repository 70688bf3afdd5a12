"""The Reward contract (shared/DESIGN.md, "Reward contract").

A reward is a callable ``reward(images, prompts=None, *, references=None, metadata=None)``
returning a :class:`RewardOutput`.  ``images`` is a float tensor in ``[0, 1]`` of shape
``(B, 3, H, W)`` (or ``(B, F, 3, H, W)`` for video).  Scores are float32, higher is better;
a sample that a reward could not judge is marked invalid in ``valid`` and never silently
scored as 0 or -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["RewardOutput", "RewardInfo", "Reward", "check_images"]


@dataclass
class RewardOutput:
    """What every reward returns.

    Args:
        scores (`torch.Tensor`): ``(B,)`` float32, higher is better.
        components (`dict[str, torch.Tensor]`): named ``(B,)`` sub-scores, in native units.
        valid (`torch.Tensor`, *optional*): ``(B,)`` bool; ``False`` where the reward could not
            judge the sample.  Defaults to all valid.
        extras (`dict[str, Any]`): rationales, native-scale values, anything per-sample that is
            not a number to optimise.
    """

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must be 1-D (B,), got shape {tuple(self.scores.shape)}")
        if self.valid is None:
            self.valid = torch.ones_like(self.scores, dtype=torch.bool)
        # An invalid sample never carries a usable number, and a NaN score is invalid.
        self.valid = self.valid.to(torch.bool) & torch.isfinite(self.scores.detach())

    def __len__(self) -> int:
        return self.scores.shape[0]


@dataclass(frozen=True)
class RewardInfo:
    """Static facts about a reward, shown by ``visalign rewards``.

    Args:
        name: registry name (``"aesthetic"``).
        version: version of the weights / formula (``"v2"``).
        licence: SPDX identifier of the weights' licence (``"MIT"``), ``"none"`` if weight-free.
        modality: ``"image"``, ``"video"`` or ``"image,video"``.
        inputs: required inputs among ``"images"``, ``"prompts"``, ``"references"``.
        native_range: typical range of the score, ``(low, high)``.
        higher_is_better: always ``True`` for the ``scores`` field; kept for the catalogue.
        differentiable: ``True`` when the autograd graph reaches the pixels.
        weights: where the weights come from (hub id, URL), or ``"none"``.
        description: one line for the catalogue.
    """

    name: str
    version: str = "1"
    licence: str = "none"
    modality: str = "image"
    inputs: tuple[str, ...] = ("images",)
    native_range: tuple[float, float] = (0.0, 1.0)
    higher_is_better: bool = True
    differentiable: bool = False
    weights: str = "none"
    description: str = ""


def check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """Validate the contract's image tensor and return it as floating point.

    Raises a ``ValueError`` that names the reward and the bad shape or dtype.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"reward {name!r} takes a float tensor in [0, 1] of shape (B, 3, H, W) or (B, F, 3, H, W); "
            f"got {type(images).__name__}. Convert PIL images with visalign.rewards.to_tensor()."
        )
    if images.ndim not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(
            f"reward {name!r} takes images of shape (B, 3, H, W) or (B, F, 3, H, W); got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"reward {name!r} takes float images in [0, 1]; got dtype {images.dtype}. Divide uint8 by 255."
        )
    return images


class Reward:
    """Base class for rewards: holds ``info`` and validates input; subclasses implement ``score``.

    ``__call__`` checks the input and the output, so every reward honours the same contract.
    """

    info: RewardInfo

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        references: Any,
        metadata: Sequence[dict] | None,
    ) -> RewardOutput:  # pragma: no cover - documented override point
        raise TypeError(f"{type(self).__name__} must implement score()")

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        *,
        references: Any = None,
        metadata: Sequence[dict] | None = None,
    ) -> RewardOutput:
        images = check_images(images, self.info.name)
        if "prompts" in self.info.inputs:
            if prompts is None:
                raise ValueError(f"reward {self.info.name!r} needs prompts: pass prompts=[...] (one per image)")
            if isinstance(prompts, str):
                prompts = [prompts] * images.shape[0]
            if len(prompts) != images.shape[0]:
                raise ValueError(
                    f"reward {self.info.name!r}: got {images.shape[0]} images but {len(prompts)} prompts"
                )
        if "references" in self.info.inputs and references is None:
            raise ValueError(f"reward {self.info.name!r} needs references=... (reference images)")
        out = self.score(images, prompts, references, metadata)
        if out.scores.shape[0] != images.shape[0]:
            raise RuntimeError(
                f"reward {self.info.name!r} returned {out.scores.shape[0]} scores for {images.shape[0]} images"
            )
        return out

    def to(self, device: torch.device | str) -> "Reward":
        """Move the reward's modules, wrapped rewards and shared backbones to ``device``."""
        for value in vars(self).values():
            if isinstance(value, (torch.nn.Module, Reward)):
                value.to(device)
        for backbone in getattr(self, "backbones", ()):
            backbone.to(device)  # shared: every reward on this backbone moves with it
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.info.name!r})"
