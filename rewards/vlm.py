"""VLM rewards: VQAScore (yes/no probability) and a rubric judge (1-5 rating).

VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text
Generation"): ask a VLM ``Does this figure show "{prompt}"? Please answer yes or no.`` and read
``P("Yes")`` from the next-token distribution at the answer position, teacher-forced right after
the chat template's generation prompt.  Both rewards run on any transformers chat VLM with a
differentiable pixel path (:mod:`visalign.rewards.vlm_backend`: Qwen2-VL, Qwen2.5-VL, LLaVA-1.5).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from .base import Reward, RewardInfo, RewardOutput
from .vlm_backend import VLMBackend, load_backend

__all__ = ["VLMReward", "VQAScore", "VLMJudge", "vqascore", "vlm_judge", "yes_no_probs", "DEFAULT_VLM"]

DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
VQA_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
RUBRIC = (
    'Rate how well this image shows "{prompt}" and how good it looks, on a scale from 1 (very poor) to 5 '
    "(excellent). Answer with a single digit from 1 to 5."
)
CRITIQUE = 'Describe briefly what this image gets right and wrong with respect to "{prompt}".'


def model_licence(backend: VLMBackend) -> str:
    """SPDX licence of the default VLM; any other checkpoint's licence is its own (not asserted here)."""
    return "Apache-2.0" if backend.name == DEFAULT_VLM else "NOASSERTION"


def _logsumexp_ids(logprobs: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    return torch.logsumexp(logprobs[:, list(ids)], dim=-1)  # (B,)


def yes_no_probs(backend: VLMBackend, logprobs: torch.Tensor, yes: str = "Yes",
                 no: str = "No") -> dict[str, torch.Tensor]:
    """VQAScore's three readings of one answer distribution.

    ``p_yes`` = P(first answer token is ``yes``), summed over its spellings (with / without a
    leading-space marker), ``p_no`` likewise; ``p_yes_norm`` = p_yes / (p_yes + p_no);
    ``log_odds`` = log p_yes - log p_no.
    """
    log_yes = _logsumexp_ids(logprobs, backend.word_ids(yes))
    log_no = _logsumexp_ids(logprobs, backend.word_ids(no))
    return {
        "p_yes": log_yes.exp(),
        "p_no": log_no.exp(),
        "p_yes_norm": torch.sigmoid(log_yes - log_no),  # = p_yes / (p_yes + p_no), stable
        "log_odds": log_yes - log_no,
    }


_VARIANTS = {"p_yes", "p_yes_norm", "log_odds"}


class VLMReward(Reward):
    """A reward that holds a :class:`VLMBackend` (shared between rewards on the same model)."""

    backend: VLMBackend

    def to(self, device: torch.device | str) -> "VLMReward":
        self.backend.model.to(device)  # moves the shared model: every reward on it follows
        return self


class VQAScore(VLMReward):
    """``P("Yes")`` that the image shows the prompt (VQAScore, Lin et al. 2024).

    Args:
        backend (`VLMBackend`): the loaded VLM.
        variant (`str`, *optional*, defaults to ``"p_yes"``): which reading is ``scores``:
            ``"p_yes"`` (the paper's), ``"p_yes_norm"`` (p_yes / (p_yes + p_no)) or ``"log_odds"``.
            All three are in ``components``.
        question (`str`, *optional*): template with ``{prompt}``; defaults to the paper's.
        batch_size (`int`, *optional*): images per forward pass (all at once by default).
    """

    def __init__(self, backend: VLMBackend, *, variant: str = "p_yes", question: str = VQA_QUESTION,
                 batch_size: int | None = None, name: str = "vqascore") -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"vqascore variant={variant!r}: choose one of {sorted(_VARIANTS)}")
        if "{prompt}" not in question:
            raise ValueError(f"vqascore question={question!r} must contain '{{prompt}}'")
        self.backend, self.variant, self.question, self.batch_size = backend, variant, question, batch_size
        low, high = (-20.0, 20.0) if variant == "log_odds" else (0.0, 1.0)
        self.info = RewardInfo(name=name, version="1", licence=model_licence(backend), modality="image",
                               inputs=("images", "prompts"), native_range=(low, high), differentiable=True,
                               weights=backend.name, description="P('Yes') from a chat VLM (VQAScore)")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim == 5:
            raise ValueError(f"reward {self.info.name!r} scores images; got video {tuple(images.shape)}: pass frames")
        questions = [self.question.format(prompt=p) for p in prompts]
        logprobs = self.backend.answer_logprobs(images, questions, self.batch_size)
        comps = yes_no_probs(self.backend, logprobs)
        return RewardOutput(scores=comps[self.variant].float(), components=comps)


_MODES = {"expected", "generate"}


class VLMJudge(VLMReward):
    """A 1-5 rubric rating from a chat VLM.

    ``mode="expected"``: the expected rating over the rating tokens,
    ``sum_k k * softmax(logits[k])`` with the softmax taken over the five rating tokens only
    (differentiable); ``components["rating_mass"]`` is the probability the full vocabulary puts on
    them (low = the model wanted to say something else).  ``mode="generate"``: greedy text, the
    first standalone digit 1-5 is the rating; a reply without one marks the sample invalid.

    Args:
        backend (`VLMBackend`): the loaded VLM.
        mode (`str`, *optional*, defaults to ``"expected"``): ``"expected"`` or ``"generate"``.
        rubric (`str`, *optional*): template with ``{prompt}``, asking for one digit 1-5.
        critique (`bool`, *optional*, defaults to `False`): also generate a short critique into
            ``extras["critique"]``.
        max_new_tokens (`int`, *optional*, defaults to 16): generation length (generate mode).
        batch_size (`int`, *optional*): images per forward pass.
    """

    def __init__(self, backend: VLMBackend, *, mode: str = "expected", rubric: str = RUBRIC, critique: bool = False,
                 max_new_tokens: int = 16, batch_size: int | None = None, name: str = "vlm-judge") -> None:
        if mode not in _MODES:
            raise ValueError(f"vlm-judge mode={mode!r}: choose one of {sorted(_MODES)}")
        if "{prompt}" not in rubric:
            raise ValueError(f"vlm-judge rubric={rubric!r} must contain '{{prompt}}'")
        self.backend, self.mode, self.rubric, self.critique = backend, mode, rubric, critique
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.info = RewardInfo(name=name, version="1", licence=model_licence(backend), modality="image",
                               inputs=("images", "prompts"), native_range=(1.0, 5.0),
                               differentiable=mode == "expected", weights=backend.name,
                               description="1-5 rubric rating from a chat VLM (expected value or generated)")

    def rating_ids(self) -> list[list[int]]:
        return [self.backend.word_ids(str(k)) for k in range(1, 6)]

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim == 5:
            raise ValueError(f"reward {self.info.name!r} scores images; got video {tuple(images.shape)}: pass frames")
        questions = [self.rubric.format(prompt=p) for p in prompts]
        extras: dict[str, Any] = {}
        if self.mode == "expected":
            logprobs = self.backend.answer_logprobs(images, questions, self.batch_size)  # (B, V)
            per_k = torch.stack([_logsumexp_ids(logprobs, ids) for ids in self.rating_ids()], dim=-1)  # (B, 5)
            probs = torch.softmax(per_k, dim=-1)  # renormalised over the rating tokens
            ks = torch.arange(1, 6, dtype=probs.dtype, device=probs.device)
            scores = (probs * ks).sum(-1)
            components = {"expected_rating": scores, "rating_mass": per_k.logsumexp(-1).exp()}
            valid = None
        else:
            texts = self.backend.generate(images, questions, self.max_new_tokens, self.batch_size)
            ratings = [parse_rating(t) for t in texts]
            scores = torch.tensor([float("nan") if r is None else float(r) for r in ratings])
            valid = torch.tensor([r is not None for r in ratings])
            components = {"rating": scores}
            extras["text"] = texts
        if self.critique:
            extras["critique"] = self.backend.generate(images, [CRITIQUE.format(prompt=p) for p in prompts],
                                                       max_new_tokens=96, batch_size=self.batch_size)
        return RewardOutput(scores=scores.float(), components=components, valid=valid, extras=extras)


_RATING = re.compile(r"(?<![\d.])([1-5])(?![\d.]*\d)")  # "4", "Rating: 4/5"; not "45", "4.5", "10"


def parse_rating(text: str) -> int | None:
    """The first standalone digit 1-5 in ``text`` (``"4"``, ``"Rating: 4/5"``); ``None`` if there is none."""
    m = _RATING.search(text)
    return int(m.group(1)) if m else None


def _backend(model: str | VLMBackend, dtype: Any, device: Any, trust_remote_code: bool,
             min_pixels: int | None, max_pixels: int | None) -> VLMBackend:
    if isinstance(model, VLMBackend):
        return model
    return load_backend(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)


def vqascore(model: str | VLMBackend = DEFAULT_VLM, *, variant: str = "p_yes", question: str = VQA_QUESTION,
             dtype: Any = None, device: Any = None, trust_remote_code: bool = False, batch_size: int | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None) -> VQAScore:
    """Registry factory for ``vqascore`` (``"vqascore:model=Qwen/Qwen2-VL-2B-Instruct,variant=log_odds"``)."""
    backend = _backend(model, dtype, device, trust_remote_code, min_pixels, max_pixels)
    return VQAScore(backend, variant=variant, question=question, batch_size=batch_size)


def vlm_judge(model: str | VLMBackend = DEFAULT_VLM, *, mode: str = "expected", rubric: str = RUBRIC,
              critique: bool = False, max_new_tokens: int = 16, dtype: Any = None, device: Any = None,
              trust_remote_code: bool = False, batch_size: int | None = None, min_pixels: int | None = None,
              max_pixels: int | None = None) -> VLMJudge:
    """Registry factory for ``vlm-judge`` (``"vlm-judge:mode=generate,critique=true"``)."""
    backend = _backend(model, dtype, device, trust_remote_code, min_pixels, max_pixels)
    return VLMJudge(backend, mode=mode, rubric=rubric, critique=critique, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
