"""The ``shapes`` reward: the toy world's gold verifier (:mod:`visalign.toy.verify`) as a Reward.

Scores are Flow-GRPO's GenEval-style partial credit (``mode="partial"``, default) or the strict
pass 0/1 (``mode="strict"``).  Components, all ``(B,)`` float32:

- ``strict``, ``partial``: both scores, whatever ``mode`` is;
- ``strict/<tag>`` for each GenEval category (``single_object``, ``two_object``, ``counting``,
  ``colors``, ``position``, ``color_attr``): the strict pass for samples of that category and NaN
  for the others, so ``nanmean`` gives the per-category accuracy of a mixed batch.

Metadata comes from ``metadata=`` when given (GenEval layout), else is parsed from the prompt text;
a prompt outside the grammar makes its sample invalid (score NaN, ``valid`` False, the parser's
message in ``extras["reason"]``).  Not differentiable: segmentation and counting are discrete.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Reward, RewardOutput
from .registry import info as _registered_info

__all__ = ["ShapesReward"]

_MODES = ("partial", "strict")


class ShapesReward(Reward):
    """Gold verifier of the shapes toy world.

    Args:
        mode (`str`, *optional*, defaults to ``"partial"``): ``"partial"`` (mean of the clause
            terms, Flow-GRPO's GenEval reward) or ``"strict"`` (1 if every clause holds, else 0).
    """

    info = _registered_info("shapes")  # the facts live in catalog.py

    def __init__(self, mode: str = "partial") -> None:
        if mode not in _MODES:
            raise ValueError(f"shapes reward: unknown mode {mode!r}; choose one of {list(_MODES)}")
        self.mode = mode

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        references: Any,
        metadata: Sequence[dict] | None,
    ) -> RewardOutput:
        from visalign.toy.prompts import TAGS, parse_prompts
        from visalign.toy.verify import check, detect_batch

        if images.ndim != 4:
            raise ValueError(f"reward 'shapes' scores images (B, 3, H, W), not video; got {tuple(images.shape)}")
        b = images.shape[0]
        if metadata is not None and len(metadata) != b:
            raise ValueError(f"reward 'shapes': got {b} images but {len(metadata)} metadata entries")
        if metadata is not None:
            metas, reasons = list(metadata), [""] * b
        else:  # outside the grammar: that sample cannot be judged
            metas, reasons = parse_prompts(prompts)
        objects = detect_batch(images)
        nan = float("nan")
        strict = torch.full((b,), nan)
        partial = torch.full((b,), nan)
        per_tag = {t: torch.full((b,), nan) for t in TAGS}
        tags: list[str | None] = []
        for i, (meta, objs) in enumerate(zip(metas, objects)):
            tags.append(meta.get("tag") if meta else None)
            if meta is None:
                continue
            v = check(objs, meta)
            strict[i], partial[i] = float(v.strict), v.partial
            if meta.get("tag") in per_tag:
                per_tag[meta["tag"]][i] = float(v.strict)
            reasons[i] = "; ".join(v.reasons)
        valid = torch.tensor([m is not None for m in metas])
        components = {"strict": strict, "partial": partial, **{f"strict/{t}": per_tag[t] for t in TAGS}}
        scores = (partial if self.mode == "partial" else strict).clone()
        return RewardOutput(scores=scores, components=components, valid=valid,
                            extras={"tag": tags, "reason": reasons})
