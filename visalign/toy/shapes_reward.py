"""The ``shapes`` reward: the toy world's gold verifier (:mod:`visalign.toy.verify`) as a Reward.

Scores are Flow-GRPO's GenEval-style partial credit (``mode="partial"``, default) or the strict
pass 0/1 (``mode="strict"``).  Components, all ``(B,)`` float32:

- ``strict``, ``partial``: both scores, whatever ``mode`` is;
- ``strict/<tag>`` for each GenEval category (``single_object``, ``two_object``, ``counting``,
  ``colors``, ``position``, ``color_attr``): the strict pass for samples of that category and NaN
  for the others, so ``nanmean`` gives the per-category accuracy of a mixed batch.

What each sample must show comes, per sample, from its ``metadata`` entry when that entry holds
GenEval metadata (an ``include`` list; ``tag`` and ``exclude`` are read too), else from parsing that
sample's prompt; other keys of an entry (a ``group`` label, anything else) are ignored.  A sample
that cannot be judged is invalid (score NaN, ``valid`` False, the reason in ``extras["reason"]``):
a prompt outside the grammar with no GenEval metadata, or an ``include`` that is not a list of
clauses (``{"class", "count"[, "color"][, "position"]}``).  ``extras["source"]`` says where each
sample's metadata came from (``"metadata"`` or ``"prompt"``).  Not differentiable: segmentation and
counting are discrete.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from visalign.rewards.base import Reward, RewardOutput, sample_metadata
from visalign.rewards.registry import info as _registered_info

__all__ = ["ShapesReward"]

_MODES = ("partial", "strict")


class ShapesReward(Reward):
    """Gold verifier of the shapes toy world.

    Args:
        mode (`str`, *optional*, defaults to ``"partial"``): ``"partial"`` (mean of the clause
            terms, Flow-GRPO's GenEval reward) or ``"strict"`` (1 if every clause holds, else 0).
    """

    info = _registered_info("shapes")  # the facts live in visalign/toy/plugin.py

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
        from .prompts import TAGS, parse_prompt
        from .verify import check, detect_batch

        if images.ndim != 4:
            raise ValueError(f"reward 'shapes' scores images (B, 3, H, W), not video; got {tuple(images.shape)}")
        b = images.shape[0]
        entries = sample_metadata(metadata, b, "shapes")
        metas: list[dict | None] = []
        reasons: list[str] = []
        sources: list[str] = []
        for i, entry in enumerate(entries):
            if "include" in entry:  # GenEval metadata: what the sample must show, whatever the text says
                problem = _geneval_problem(entry)
                metas.append(None if problem else entry)
                reasons.append(f"metadata[{i}]: {problem}" if problem else "")
                sources.append("metadata")
                continue
            try:  # anything else in the entry is not ours: judge the prompt text
                metas.append(parse_prompt(prompts[i]))
                reasons.append("")
            except ValueError as err:  # outside the grammar: this sample cannot be judged
                metas.append(None)
                reasons.append(str(err))
            sources.append("prompt")
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
                            extras={"tag": tags, "reason": reasons, "source": sources})


def _geneval_problem(meta: dict) -> str:
    """Why the verifier cannot check ``meta`` (GenEval metadata), or ``""`` when it can.

    A clause naming a class, colour or relation the toy world does not have (real GenEval metadata
    names COCO classes) cannot be judged here, so it makes the sample invalid rather than a 0.
    """
    from .prompts import COLORS, RELATIONS, SHAPES

    def clause_problem(clause: Any, where: str, n: int) -> str:
        if not isinstance(clause, dict) or "class" not in clause or "count" not in clause:
            return f"{where} must be a dict with 'class' and 'count', got {clause!r}"
        if clause["class"] not in SHAPES:
            return f"{where}: class {clause['class']!r} is not a shape of the toy world ({', '.join(SHAPES)})"
        count = clause["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return f"{where}: count must be a positive integer, got {count!r}"
        if "color" in clause and clause["color"] not in COLORS:
            return f"{where}: colour {clause['color']!r} is not one of the toy world's ({', '.join(COLORS)})"
        pos = clause.get("position")
        if pos is not None and not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                                    and isinstance(pos[1], int) and 0 <= pos[1] < n):
            return (f"{where}: position must be [relation, index of another clause] with a relation among "
                    f"{list(RELATIONS)}, got {pos!r}")
        return ""

    include = meta["include"]
    if not isinstance(include, list) or not include:
        return f"'include' must be a non-empty list of clauses, got {include!r}"
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        return f"'exclude' must be a list of clauses, got {exclude!r}"
    for key, clauses in (("include", include), ("exclude", exclude)):
        for k, clause in enumerate(clauses):
            problem = clause_problem(clause, f"{key}[{k}]", len(include))
            if problem:
                return problem
    return ""
