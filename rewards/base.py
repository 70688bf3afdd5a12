"""The Reward contract (docs/rewards.md; its "Metadata" section for ``metadata``).

A reward is a callable ``reward(images, prompts=None, *, references=None, metadata=None)``
returning a :class:`RewardOutput`.  ``images`` is a float tensor in ``[0, 1]`` of shape
``(B, 3, H, W)`` (or ``(B, F, 3, H, W)`` for video).  Scores are float32, higher is better;
a sample that a reward could not judge is marked invalid in ``valid`` and never silently
scored as 0 or -1.

``metadata`` is ``None`` or a sequence with one entry per sample, each a dict of *task metadata*
for that sample's prompt, or ``None`` when the sample has none.  Task metadata says what the
prompt asks for: GenEval's ``tag`` / ``include`` / ``exclude`` (read by the ``shapes`` verifier),
a ``group`` label (read by ``combine(..., normalize="group")``).  It is never file bookkeeping
(path, seed, model, sampler settings): whoever calls a reward strips those.  A reward reads only
the keys it knows and, per sample, falls back (for example to parsing the prompt) when they are
absent; it never treats an unknown dict as its own format.  :func:`sample_metadata` checks the
sequence and gives one dict per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

__all__ = ["RewardOutput", "RewardInfo", "Reward", "check_images", "sample_metadata"]


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


def sample_metadata(metadata: Sequence[Mapping | None] | None, batch: int, name: str) -> list[dict]:
    """Check ``metadata`` against the contract and return one task-metadata dict per sample.

    Args:
        metadata (`Sequence[Mapping | None]`, *optional*): one entry per sample, a mapping of task
            metadata or ``None``; ``None`` for the whole batch means no sample has any.
        batch (`int`): the number of samples.
        name (`str`): the reward's name, for the error messages.

    Returns:
        `list[dict]`: ``batch`` dicts (shallow copies); ``{}`` where a sample has no metadata, so a
        reward can always write ``entry.get(key)`` and fall back when the key is absent.

    Raises:
        TypeError: ``metadata`` is a single mapping or a string rather than a sequence, or an entry
            is neither a mapping nor ``None``.
        ValueError: the number of entries is not ``batch``.
    """
    if metadata is None:
        return [{} for _ in range(batch)]
    if isinstance(metadata, (Mapping, str, bytes)):
        raise TypeError(
            f"reward {name!r}: metadata must be a sequence with one entry (a dict or None) per sample, "
            f"got a single {type(metadata).__name__}; pass metadata=[{{...}}] * {batch} to give every sample the same"
        )
    entries = list(metadata)
    if len(entries) != batch:
        raise ValueError(
            f"reward {name!r}: got {batch} samples but {len(entries)} metadata entries; "
            "pass one entry (a dict or None) per sample"
        )
    out: list[dict] = []
    for i, entry in enumerate(entries):
        if entry is None:
            out.append({})
        elif isinstance(entry, Mapping):
            out.append(dict(entry))
        else:
            raise TypeError(
                f"reward {name!r}: metadata[{i}] is a {type(entry).__name__}; each entry is a dict of task "
                "metadata (e.g. GenEval's tag/include) or None"
            )
    return out


class Reward:
    """Base class for rewards: holds ``info`` and validates input; subclasses implement ``score``.

    ``__call__`` checks the input and the output, so every reward honours the same contract.  By the
    time ``score`` runs, ``prompts`` is ``None`` or one string per sample and ``metadata`` is
    ``None`` or a list of one dict per sample (``{}`` where the caller gave ``None``).
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
        metadata: Sequence[Mapping | None] | None = None,
    ) -> RewardOutput:
        """Score a batch.

        Args:
            images (`torch.Tensor`): float in ``[0, 1]``, ``(B, 3, H, W)`` or ``(B, F, 3, H, W)``.
            prompts (`Sequence[str]` or `str`, *optional*): one prompt per sample; a single string is
                used for every sample.  Required by rewards whose ``info.inputs`` name ``"prompts"``.
            references (*optional*): reference images, for rewards that name ``"references"``.
            metadata (`Sequence[dict | None]`, *optional*): one entry per sample: a dict of task
                metadata for that sample's prompt (GenEval's ``tag`` / ``include`` / ``exclude``, a
                ``group`` label for ``combine(..., normalize="group")``) or ``None``.  Never file
                bookkeeping (path, seed, model).  A reward reads only the keys it knows and falls
                back per sample (e.g. to parsing the prompt) when they are absent.

        Returns:
            :class:`RewardOutput` with ``B`` scores.
        """
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
        if metadata is not None:
            metadata = sample_metadata(metadata, images.shape[0], self.info.name)
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
