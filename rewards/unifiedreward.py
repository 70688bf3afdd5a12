"""UnifiedReward (Wang et al. 2025, "Unified Reward Model for Multimodal Understanding and
Generation"; UnifiedReward-Think: Wang et al. 2025, "Unified Multimodal Chain-of-Thought Reward
Model through Reinforcement Fine-Tuning").

UnifiedReward-qwen-7b (``CodeGoat24/UnifiedReward-qwen-7b``) is a Qwen2.5-VL-7B-Instruct fine-tuned
to judge generated images in text.  It is used with two prompts (the official inference scripts'):

* **point-wise** (:func:`unifiedreward_point_prompt`): the image and the caption; the model lists
  the caption's elements and ends with ``Final Score: <1-5>``.  :func:`parse_unifiedreward_point`
  reads the number after the last ``Final Score:``;
* **pair-wise** (:func:`unifiedreward_pair_prompt`): two images and the caption; the model
  concludes ``Image 1 is better.``, ``Image 2 is better.`` or ``Both images are equally good.``;
  :func:`parse_unifiedreward_pair` turns the last such conclusion into 1, 0 or 0.5 (the
  probability that image 1 is preferred).

The same functions serve any OpenAI-compatible server running the model (vLLM, SGLang): send
the prompt with the image(s) in one user message, parse the reply; when the server returns
``logprobs`` with ``top_logprobs``, :func:`point_from_openai_logprobs` /
:func:`pair_from_openai_logprobs` read the token distribution where the answer is written.

In process (:class:`UnifiedRewardPoint`, :class:`UnifiedRewardPair`) the model generates greedily
(as the official scripts do) and, at the step where it writes the score digit, the distribution
over the digits ``1``..``5`` (or ``1`` / ``2`` for the pair conclusion) is recorded:

* point: ``expected`` = ``sum_k k * p_k`` with ``p`` renormalised over the five digits (each digit
  summed over its spellings with or without a leading space) — a smoother reading than the parsed
  integer; ``reading="parsed"`` gives the official one;
* pair: ``p_first`` = ``p("1") / (p("1") + p("2"))`` at the digit of ``Image N is better``.

Deviations from the official scripts, with reasons: the expected readings (the scripts only parse
text); a reply without a parsable score or conclusion marks the sample invalid (the benchmark
script counts it as 0, which would be a silent penalty); scores outside 1..5 are invalid; the
conclusion is the *last* one in the reply (a reasoning reply may quote the options first).
Decoding is not differentiable: these rewards have no gradient.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .base import RewardInfo, RewardOutput
from .vlm import VLMReward
from .vlm_backend import VLMBackend, load_backend

__all__ = ["unifiedreward_point_prompt", "unifiedreward_pair_prompt", "parse_unifiedreward_point",
           "parse_unifiedreward_pair", "score_token_index", "pair_token_index", "expected_digit_score",
           "first_image_probability", "point_from_openai_logprobs", "pair_from_openai_logprobs",
           "UnifiedRewardPoint", "UnifiedRewardPair", "unifiedreward", "unifiedreward_pair", "DEFAULT_MODEL",
           "POINT_PROMPT", "PAIR_PROMPT"]

DEFAULT_MODEL = "CodeGoat24/UnifiedReward-qwen-7b"
LICENCE = "MIT AND Apache-2.0"  # the fine-tune's card (MIT) on Qwen2.5-VL-7B-Instruct (Apache-2.0)

POINT_PROMPT = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Extract key elements from the provided text caption, evaluate their presence in the generated image using the "
    "format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and assign a "
    "score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
PAIR_PROMPT = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
    "compare these images based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well each image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of each image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Compare both images using the above criteria and select the one that better aligns with the caption while "
    "exhibiting superior visual quality.\n"
    "Provide a clear conclusion such as \"Image 1 is better.\", \"Image 2 is better.\" and \"Both images are "
    "equally good.\"\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)


def unifiedreward_point_prompt(prompt: str) -> str:
    """The point-wise question for one image generated from ``prompt`` (the official wording)."""
    return POINT_PROMPT.replace("{prompt}", prompt)


def unifiedreward_pair_prompt(prompt: str) -> str:
    """The pair-wise question for two images generated from ``prompt``: image 1 first in the message."""
    return PAIR_PROMPT.replace("{prompt}", prompt)


# white space is optional between words: a reply rebuilt from its tokens' texts may have lost it
_FINAL = re.compile(r"final\s*score\s*:\s*\**\s*\[?\s*(?P<value>\d+(?:\.\d+)?)", re.IGNORECASE)
_PAIR = re.compile(r"image\s*(?P<n>[12])\s*is\s*better|(?P<tie>both\s*images\s*are\s*equally\s*good)", re.IGNORECASE)


def parse_unifiedreward_point(text: str) -> float | None:
    """The score after the last ``Final Score:`` (``"Final Score: 4"``, ``"**Final Score:** 3.5"``),
    or ``None`` when there is none or it is outside 1..5."""
    matches = list(_FINAL.finditer(text or ""))
    if not matches:
        return None
    value = float(matches[-1]["value"])
    return value if 1.0 <= value <= 5.0 else None


def parse_unifiedreward_pair(text: str) -> float | None:
    """The last conclusion of a pair-wise reply: 1.0 (``Image 1 is better``), 0.0 (``Image 2 is
    better``), 0.5 (``Both images are equally good``); ``None`` when there is none."""
    matches = list(_PAIR.finditer(text or ""))
    if not matches:
        return None
    last = matches[-1]
    return 0.5 if last["tie"] else (1.0 if last["n"] == "1" else 0.0)


def _token_at(tokens: Sequence[str], char: int, digits: str) -> int | None:
    """Index of the token that holds character ``char`` of ``"".join(tokens)``, if that token is
    one of ``digits`` alone (optionally after white space)."""
    start = 0
    for i, tok in enumerate(tokens):
        if start <= char < start + len(tok):
            return i if tok.strip() in tuple(digits) else None
        start += len(tok)
    return None


def score_token_index(tokens: Sequence[str]) -> int | None:
    """Index of the generated token that writes the point-wise score (the digit after the last
    ``Final Score:``), given the reply as its tokens' texts; ``None`` if the digit shares a token
    with other text or there is no score."""
    matches = list(_FINAL.finditer("".join(tokens)))
    return _token_at(tokens, matches[-1].start("value"), "12345") if matches else None


def pair_token_index(tokens: Sequence[str]) -> int | None:
    """Index of the token that writes ``N`` in the last ``Image N is better`` (``None`` for a tie
    or no conclusion)."""
    matches = list(_PAIR.finditer("".join(tokens)))
    if not matches or matches[-1]["tie"]:
        return None
    return _token_at(tokens, matches[-1].start("n"), "12")


def _digit_logprobs(candidates: Mapping[str, float] | Iterable[tuple[str, float]], digits: str) -> dict[str, float]:
    items = candidates.items() if isinstance(candidates, Mapping) else candidates
    per: dict[str, list[float]] = {}
    for tok, lp in items:
        key = str(tok).strip()
        if key in tuple(digits) and lp is not None and math.isfinite(float(lp)):
            per.setdefault(key, []).append(float(lp))
    return {d: float(torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0)) for d, v in per.items()}


def expected_digit_score(candidates: Mapping[str, float] | Iterable[tuple[str, float]]) -> float | None:
    """``sum_k k * p_k`` over the digits 1..5 from the log-probabilities of candidate tokens at the
    score position (a mapping or ``(token, logprob)`` pairs; spellings with white space are summed;
    other tokens ignored; renormalised over the digits present).  ``None`` if no digit is among them."""
    per = _digit_logprobs(candidates, "12345")
    if not per:
        return None
    keys = sorted(per)
    probs = torch.softmax(torch.tensor([per[k] for k in keys], dtype=torch.float64), 0)
    return float(sum(int(k) * p for k, p in zip(keys, probs.tolist())))


def first_image_probability(candidates: Mapping[str, float] | Iterable[tuple[str, float]]) -> float | None:
    """``p("1") / (p("1") + p("2"))`` at the digit of ``Image N is better`` (``None`` without both)."""
    per = _digit_logprobs(candidates, "12")
    if set(per) != {"1", "2"}:
        return None if not per else (1.0 if "1" in per else 0.0)
    return float(torch.sigmoid(torch.tensor(per["1"] - per["2"], dtype=torch.float64)))


def _openai_reading(content: Sequence[Mapping[str, Any]] | None, locate, read) -> float | None:
    if not content:
        return None
    tokens = [str(entry.get("token", "")) for entry in content]
    idx = locate(tokens)
    if idx is None:
        return None
    top = content[idx].get("top_logprobs") or [{"token": content[idx].get("token"), "logprob": content[idx].get("logprob")}]
    return read([(t.get("token"), t.get("logprob")) for t in top])


def point_from_openai_logprobs(content: Sequence[Mapping[str, Any]] | None) -> float | None:
    """The expected point-wise score from an OpenAI-compatible reply's ``choices[0].logprobs.content``
    (entries ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}``; ask for
    ``logprobs=True, top_logprobs=5`` or more).  ``None`` when the score token or its digits are missing."""
    return _openai_reading(content, score_token_index, expected_digit_score)


def pair_from_openai_logprobs(content: Sequence[Mapping[str, Any]] | None) -> float | None:
    """``P(image 1 preferred)`` read at the conclusion's digit of an OpenAI-compatible reply
    (see :func:`point_from_openai_logprobs`); ``None`` for a tie or no conclusion."""
    return _openai_reading(content, pair_token_index, first_image_probability)


class _DigitRecorder:
    """A logits processor that keeps, at every generation step, the log-probabilities of a few
    token ids (the digits); it leaves the scores unchanged."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = torch.tensor(list(ids), dtype=torch.long)
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(F.log_softmax(scores.float(), dim=-1)[:, self.ids.to(scores.device)].cpu())
        return scores


def _chat_inputs(backend: VLMBackend, slots: Sequence[torch.Tensor], questions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Model inputs for ``len(slots)`` images per question (image 1 first), left-padded; every
    image of a row must have the first slot's size."""
    b, (h, w) = len(questions), slots[0].shape[-2:]
    texts = []
    for q in questions:
        content = [{"type": "image"} for _ in slots] + [{"type": "text", "text": q}]
        texts.append(backend.processor.apply_chat_template([{"role": "user", "content": content}],
                                                           add_generation_prompt=True, tokenize=False))
    blank = [torch.zeros(3, h, w, dtype=torch.uint8)] * (b * len(slots))
    enc = backend.processor(text=texts, images=blank, padding=True, return_tensors="pt")
    out = {k: v.to(backend.device) for k, v in enc.items() if k != "pixel_values"}
    images = torch.stack([s.to(backend.device) for s in slots], dim=1).flatten(0, 1)  # row-major: (b * k, 3, H, W)
    pix = backend.pixels(images)
    if "image_grid_thw" in pix and not torch.equal(enc["image_grid_thw"], pix["image_grid_thw"].cpu()):
        raise RuntimeError("internal: image grid differs from the processor's")
    out.update(pix)
    return out


def generate_with_digits(backend: VLMBackend, slots: Sequence[torch.Tensor], questions: Sequence[str],
                         digits: str, max_new_tokens: int) -> tuple[list[str], list[list[str]], torch.Tensor, list[int]]:
    """Greedy replies and, per generation step, the log-probabilities of ``digits``' token ids.

    Returns ``(texts, pieces, logprobs, ids)``: the decoded replies, each reply as its tokens'
    texts (special tokens as ``""``), ``(B, steps, len(ids))`` log-probabilities, and the ids."""
    from transformers import LogitsProcessorList

    ids = sorted({i for d in digits for i in backend.word_ids(d)})
    recorder = _DigitRecorder(ids)
    with torch.no_grad():
        enc = _chat_inputs(backend, [s.detach() for s in slots], questions)
        out = backend.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     logits_processor=LogitsProcessorList([recorder]))
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new = sequences[:, enc["input_ids"].shape[1]:].cpu()
    tok = backend.tokenizer
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    pieces = [[tok.decode([int(i)], skip_special_tokens=True) for i in row] for row in new]
    logprobs = torch.stack(recorder.steps, dim=1) if recorder.steps else torch.zeros(len(questions), 0, len(ids))
    return texts, pieces, logprobs, ids


def _candidates(backend: VLMBackend, ids: Sequence[int], row: torch.Tensor) -> list[tuple[str, float]]:
    return [(backend.tokenizer.decode([i]), float(lp)) for i, lp in zip(ids, row.tolist())]


_READINGS = {"expected", "parsed"}


def _model_licence(backend: VLMBackend) -> str:
    return LICENCE if backend.name == DEFAULT_MODEL else "NOASSERTION"


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim == 5:
        raise ValueError(f"reward {name!r} scores images; got video {tuple(images.shape)}: pass frames")


class UnifiedRewardPoint(VLMReward):
    """UnifiedReward point-wise score (1..5) of (image, prompt) pairs.

    ``scores``: the expected score (``reading="expected"``, default) or the parsed one
    (``"parsed"``); when the digit's distribution cannot be read (the digit shares a token with
    other text) the expected reading falls back to the parsed score.  ``components``: ``parsed``,
    ``expected`` (NaN where unreadable).  ``extras["text"]``: the replies.  A reply without a
    ``Final Score`` in 1..5 marks the sample invalid.

    Args:
        backend (`VLMBackend`): the loaded model.
        reading (`str`, *optional*): ``"expected"`` or ``"parsed"``.
        max_new_tokens (`int`, *optional*, defaults to 512): reply length (the official scripts' 512).
        batch_size (`int`, *optional*): images per generation call.
    """

    def __init__(self, backend: VLMBackend, *, reading: str = "expected", max_new_tokens: int = 512,
                 batch_size: int | None = None, name: str = "unifiedreward") -> None:
        if reading not in _READINGS:
            raise ValueError(f"unifiedreward reading={reading!r}: choose one of {sorted(_READINGS)}")
        self.backend, self.reading, self.max_new_tokens, self.batch_size = backend, reading, max_new_tokens, batch_size
        self.info = RewardInfo(name=name, version="qwen-7b", licence=_model_licence(backend), modality="image",
                               inputs=("images", "prompts"), native_range=(1.0, 5.0), differentiable=False,
                               weights=backend.name, description="UnifiedReward point-wise 'Final Score' (1-5)")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        _check_images(images, self.info.name)
        step = self.batch_size or images.shape[0]
        texts, parsed, expected = [], [], []
        for s in range(0, images.shape[0], step):
            questions = [unifiedreward_point_prompt(p) for p in prompts[s : s + step]]
            out_texts, pieces, logprobs, ids = generate_with_digits(self.backend, [images[s : s + step]], questions,
                                                                    "12345", self.max_new_tokens)
            for r, text in enumerate(out_texts):
                value = parse_unifiedreward_point(text)
                idx = score_token_index(pieces[r]) if value is not None else None
                exp = None
                if idx is not None and idx < logprobs.shape[1]:
                    exp = expected_digit_score(_candidates(self.backend, ids, logprobs[r, idx]))
                texts.append(text)
                parsed.append(float("nan") if value is None else value)
                expected.append(float("nan") if exp is None else exp)
        parsed_t, expected_t = torch.tensor(parsed), torch.tensor(expected)
        scores = parsed_t if self.reading == "parsed" else torch.where(torch.isnan(expected_t), parsed_t, expected_t)
        return RewardOutput(scores=scores.float(), components={"parsed": parsed_t.float(), "expected": expected_t.float()},
                            valid=~torch.isnan(parsed_t), extras={"text": texts})


class UnifiedRewardPair(VLMReward):
    """UnifiedReward pair-wise preference of each sample over its reference image.

    The sample is shown as image 1 and its reference as image 2 (resized to the sample's size);
    ``scores`` = P(sample preferred): 1, 0 or 0.5 parsed from the conclusion (``reading="parsed"``,
    default), or ``p_first`` read at the conclusion's digit (``reading="expected"``; ties keep 0.5).
    ``both_orders=True`` asks a second time with the images swapped and averages the two readings
    (``label(a, b) + 1 - label(b, a)) / 2``), which cancels the model's position bias.
    :meth:`compare` labels pairs for a DPO or reward-refresh judge.

    Args:
        backend (`VLMBackend`): the loaded model.
        reading (`str`, *optional*): ``"parsed"`` or ``"expected"``.
        both_orders (`bool`, *optional*, defaults to `False`): ask in both orders.
        max_new_tokens (`int`, *optional*, defaults to 512).
        batch_size (`int`, *optional*): pairs per generation call.
    """

    def __init__(self, backend: VLMBackend, *, reading: str = "parsed", both_orders: bool = False,
                 max_new_tokens: int = 512, batch_size: int | None = None, name: str = "unifiedreward-pair") -> None:
        if reading not in _READINGS:
            raise ValueError(f"unifiedreward-pair reading={reading!r}: choose one of {sorted(_READINGS)}")
        self.backend, self.reading, self.both_orders = backend, reading, both_orders
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.info = RewardInfo(name=name, version="qwen-7b", licence=_model_licence(backend), modality="image",
                               inputs=("images", "prompts", "references"), native_range=(0.0, 1.0),
                               differentiable=False, weights=backend.name,
                               description="UnifiedReward pair-wise: P(sample preferred over its reference image)")

    def _one_order(self, first: torch.Tensor, second: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
        parsed, p_first, texts = [], [], []
        step = self.batch_size or first.shape[0]
        for s in range(0, first.shape[0], step):
            questions = [unifiedreward_pair_prompt(p) for p in prompts[s : s + step]]
            out_texts, pieces, logprobs, ids = generate_with_digits(
                self.backend, [first[s : s + step], second[s : s + step]], questions, "12", self.max_new_tokens)
            for r, text in enumerate(out_texts):
                label = parse_unifiedreward_pair(text)
                idx = pair_token_index(pieces[r]) if label is not None else None
                prob = None
                if idx is not None and idx < logprobs.shape[1]:
                    prob = first_image_probability(_candidates(self.backend, ids, logprobs[r, idx]))
                elif label == 0.5:
                    prob = 0.5
                texts.append(text)
                parsed.append(float("nan") if label is None else label)
                p_first.append(float("nan") if prob is None else prob)
        parsed_t, p_t = torch.tensor(parsed), torch.tensor(p_first)
        reading = parsed_t if self.reading == "parsed" else torch.where(torch.isnan(p_t), parsed_t, p_t)
        return {"label": reading, "parsed": parsed_t, "p_first": p_t, "text": texts}

    def _aligned(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        if images_b.ndim == 3:
            images_b = images_b.unsqueeze(0)
        if images_b.ndim != 4 or images_b.shape[-3] != 3:
            raise ValueError(f"reward {self.info.name!r}: references must be images (B, 3, H, W) or one (3, H, W); got "
                             f"{tuple(images_b.shape)}")
        if images_b.shape[0] == 1 and images_a.shape[0] > 1:
            images_b = images_b.expand(images_a.shape[0], -1, -1, -1)
        if images_b.shape[0] != images_a.shape[0]:
            raise ValueError(f"reward {self.info.name!r}: {images_a.shape[0]} images but {images_b.shape[0]} references")
        if images_b.shape[-2:] != images_a.shape[-2:]:
            images_b = F.interpolate(images_b.float(), size=images_a.shape[-2:], mode="bicubic", align_corners=False,
                                     antialias=True).clamp(0, 1)
        return images_b.to(images_a.device)

    def judge(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
        """``{"label", "parsed", "p_first", "text"}`` for the pairs (a as image 1); with
        ``both_orders`` the labels average both orders and ``text`` holds both replies."""
        images_b = self._aligned(images_a, images_b)
        ab = self._one_order(images_a, images_b, prompts)
        if not self.both_orders:
            return ab
        ba = self._one_order(images_b, images_a, prompts)
        merged = {k: (ab[k] + (1.0 - ba[k])) / 2 for k in ("label", "parsed", "p_first")}
        merged["text"] = [[x, y] for x, y in zip(ab["text"], ba["text"])]
        return merged

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(P,)`` labels of pairs: P(``a`` preferred) in [0, 1]; NaN where the reply had no conclusion."""
        _check_images(images_a, self.info.name)
        return self.judge(images_a, images_b, list(prompts))["label"].float()

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        _check_images(images, self.info.name)
        if not isinstance(references, torch.Tensor):
            raise ValueError(f"reward {self.info.name!r}: references must be a tensor of reference images")
        out = self.judge(images, references, list(prompts))
        return RewardOutput(scores=out["label"].float(), components={"parsed": out["parsed"].float(),
                                                                     "p_first": out["p_first"].float()},
                            valid=~torch.isnan(out["label"]), extras={"text": out["text"]})


def _load(model: str | VLMBackend, dtype: Any, device: Any, min_pixels: int | None,
          max_pixels: int | None) -> VLMBackend:
    if isinstance(model, VLMBackend):
        return model
    return load_backend(model, dtype=dtype, device=device, trust_remote_code=False, min_pixels=min_pixels,
                        max_pixels=max_pixels, strict=True)


def unifiedreward(model: str | VLMBackend = DEFAULT_MODEL, *, reading: str = "expected", max_new_tokens: int = 512,
                  dtype: Any = None, device: Any = None, batch_size: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> UnifiedRewardPoint:
    """Registry factory for ``unifiedreward`` (``"unifiedreward:reading=parsed,dtype=bfloat16,device=cuda"``).

    ``model``: hub id or folder of a UnifiedReward Qwen2.5-VL checkpoint (``CodeGoat24/UnifiedReward-qwen-7b``;
    the 3b / 32b sizes load the same way), loaded strictly, never with remote code."""
    return UnifiedRewardPoint(_load(model, dtype, device, min_pixels, max_pixels), reading=reading,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)


def unifiedreward_pair(model: str | VLMBackend = DEFAULT_MODEL, *, reading: str = "parsed", both_orders: bool = False,
                       max_new_tokens: int = 512, dtype: Any = None, device: Any = None, batch_size: int | None = None,
                       min_pixels: int | None = None, max_pixels: int | None = None) -> UnifiedRewardPair:
    """Registry factory for ``unifiedreward-pair`` (``"unifiedreward-pair:both_orders=true"``)."""
    return UnifiedRewardPair(_load(model, dtype, device, min_pixels, max_pixels), reading=reading,
                             both_orders=both_orders, max_new_tokens=max_new_tokens, batch_size=batch_size)
