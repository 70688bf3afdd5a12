"""VLM artifact assessment (``artifact-vlm``): one yes/no question per artifact category.

The categories follow the MagicMirror taxonomy of generation artifacts (Wang et al. 2025,
"MagicMirror: A Large-Scale Dataset and Benchmark for Fine-Grained Artifacts Assessment in
Text-to-Image Generation": anatomy, object shape / structure, attributes, interaction / physics)
plus texture and rendered text, which the T2I hacking literature keeps meeting.  For each category
the VLM is asked "Does this image contain ...? Please answer yes or no." and the component is
``P(no artifact)`` read at the answer position exactly as VQAScore reads ``P(yes)``
(:func:`visalign.rewards.vlm.yes_no_probs`).  The score is the mean (or the minimum) over
categories.  Prompts are not needed: the questions are about the image alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import RewardInfo, RewardOutput
from .vlm import DEFAULT_VLM, VLMReward, _backend, model_licence, yes_no_probs
from .vlm_backend import VLMBackend

__all__ = ["ArtifactVLM", "artifact_vlm", "ARTIFACT_QUESTIONS"]

_ASK = " Please answer yes or no."
ARTIFACT_QUESTIONS: dict[str, str] = {
    "anatomy": "Does this image contain anatomical errors in people or animals, such as malformed hands, extra or "
               "missing fingers or limbs, or distorted faces?" + _ASK,
    "structure": "Does this image contain objects with broken, warped, fused or impossible shapes or "
                 "structures?" + _ASK,
    "attributes": "Does this image contain objects with unnatural proportions, sizes or colours?" + _ASK,
    "texture": "Does this image contain unnatural textures, smeared or noisy patches, or repeated patterns?" + _ASK,
    "physics": "Does this image contain inconsistent lighting, wrong shadows or reflections, or physically impossible "
               "interactions between objects?" + _ASK,
    "text": "Does this image contain garbled, misspelled or malformed text, letters or symbols?" + _ASK,
}
_READINGS = {"p_no_norm", "p_no"}
_REDUCE = {"mean", "min"}


class ArtifactVLM(VLMReward):
    """Per-category ``P(no artifact)`` from a chat VLM; score = mean or min over categories.

    Args:
        backend (`VLMBackend`): the loaded VLM.
        categories (`str` or `list[str]`, *optional*): subset of :data:`ARTIFACT_QUESTIONS`, as a
            list or a ``"+"``-joined string (``"anatomy+text"``); all by default.
        reading (`str`, *optional*, defaults to ``"p_no_norm"``): ``"p_no_norm"`` =
            p(no) / (p(yes) + p(no)) or ``"p_no"`` = the raw probability of "No".
        reduce (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` or ``"min"`` (the worst category).
        questions (`dict[str, str]`, *optional*): replace or add category questions (yes = artifact).
        batch_size (`int`, *optional*): images per forward pass.
    """

    def __init__(self, backend: VLMBackend, *, categories: str | Sequence[str] | None = None,
                 reading: str = "p_no_norm", reduce: str = "mean", questions: dict[str, str] | None = None,
                 batch_size: int | None = None, name: str = "artifact-vlm") -> None:
        table = {**ARTIFACT_QUESTIONS, **(questions or {})}
        if categories is None:
            categories = list(table)
        elif isinstance(categories, str):
            categories = [c.strip() for c in categories.split("+") if c.strip()]
        unknown = [c for c in categories if c not in table]
        if unknown or not categories:
            raise ValueError(f"artifact-vlm categories={categories!r}: unknown {unknown}; choose among {sorted(table)} "
                             "(join several with '+', e.g. 'anatomy+text')")
        if reading not in _READINGS:
            raise ValueError(f"artifact-vlm reading={reading!r}: choose one of {sorted(_READINGS)}")
        if reduce not in _REDUCE:
            raise ValueError(f"artifact-vlm reduce={reduce!r}: choose one of {sorted(_REDUCE)}")
        self.backend, self.reading, self.reduce, self.batch_size = backend, reading, reduce, batch_size
        self.questions = {c: table[c] for c in categories}
        self.info = RewardInfo(name=name, version="1", licence=model_licence(backend), modality="image",
                               inputs=("images",), native_range=(0.0, 1.0), differentiable=True, weights=backend.name,
                               description="P(no artifact) per MagicMirror-style category from a chat VLM")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim == 5:
            raise ValueError(f"reward {self.info.name!r} scores images; got video {tuple(images.shape)}: pass frames")
        b = images.shape[0]
        components: dict[str, torch.Tensor] = {}
        for cat, question in self.questions.items():
            logprobs = self.backend.answer_logprobs(images, [question] * b, self.batch_size)
            yn = yes_no_probs(self.backend, logprobs)
            # "yes" means "there is an artifact": the clean probability is the "No" side
            no_norm = 1.0 - yn["p_yes_norm"]
            components[cat] = no_norm if self.reading == "p_no_norm" else yn["p_no"]
        stacked = torch.stack(list(components.values()), dim=-1)  # (B, K)
        scores = stacked.mean(-1) if self.reduce == "mean" else stacked.min(-1).values
        return RewardOutput(scores=scores.float(), components=components)


def artifact_vlm(model: str | VLMBackend = DEFAULT_VLM, *, categories: str | Sequence[str] | None = None,
                 reading: str = "p_no_norm", reduce: str = "mean", dtype: Any = None, device: Any = None,
                 trust_remote_code: bool = False, batch_size: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> ArtifactVLM:
    """Registry factory for ``artifact-vlm`` (``"artifact-vlm:categories=anatomy+text,reduce=min"``)."""
    backend = _backend(model, dtype, device, trust_remote_code, min_pixels, max_pixels)
    return ArtifactVLM(backend, categories=categories, reading=reading, reduce=reduce, batch_size=batch_size)
