"""VQAScore / vlm-judge on a tiny random Qwen2-VL saved to disk and loaded by the real loader.

Reference numbers are computed independently: the processor's own inputs (from uint8 pictures,
one image per call, so no padding) through the model, softmax at the last position.
"""

from __future__ import annotations

import math

import pytest
import torch

from visalign import rewards
from visalign.rewards.vlm import RUBRIC, VQA_QUESTION, VLMJudge, VQAScore, parse_rating
from visalign.rewards.vlm_backend import load_backend, qwen2vl_pixels
from visalign.rewards.vlm_testing import tiny_qwen2vl

PROMPTS = ["a red cat", "a blue square with a dog or a cat"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl")))


@pytest.fixture(scope="module")
def backend(folder):
    return load_backend(folder)


def _uint8_images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _reference_probs(backend, images_u8, questions):
    """Softmax of the next token after the generation prompt, one unpadded processor call per image."""
    rows = []
    for img, q in zip(images_u8, questions):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = backend.processor(text=[text], images=[img], return_tensors="pt")
        with torch.no_grad():
            logits = backend.model(**enc).logits[0, -1]
        rows.append(torch.softmax(logits.double(), -1))
    return torch.stack(rows)


def test_pixels_equal_processor_on_grid_sized_uint8(backend):
    ip = backend.processor.image_processor
    u8 = _uint8_images(2, 24, 32)  # 24x32 is on the 8-pixel grid and within [min, max] pixels: no resize
    ref = ip(images=list(u8), return_tensors="pt")
    mine, grid = qwen2vl_pixels(u8.float() / 255, ip)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert mine.shape == ref["pixel_values"].shape == (2 * 6 * 8, 3 * 2 * 4 * 4)  # grid 6x8 of 4-px patches
    torch.testing.assert_close(mine, ref["pixel_values"], atol=1e-5, rtol=0)


def test_pixels_equal_processor_after_resize(backend):
    ip = backend.processor.image_processor
    g = torch.Generator().manual_seed(1)
    x = 0.25 + 0.5 * torch.rand(2, 3, 41, 19, generator=g)  # off-grid size: smart_resize + bicubic
    ref = ip(images=list(x), do_rescale=False, return_tensors="pt")  # float path of the processor
    mine, grid = qwen2vl_pixels(x, ip)
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(mine, ref["pixel_values"], atol=1e-4, rtol=0)
    # uint8 pictures: the processor resamples uint8 in fixed point (up to one grey level: 1/255/std ~ 1.5e-2)
    u8 = (x * 255).round().to(torch.uint8)
    ref8 = ip(images=list(u8), return_tensors="pt")["pixel_values"]
    diff = (qwen2vl_pixels(u8.float() / 255, ip)[0] - ref8).abs()
    assert diff.max() < 2e-2 and diff.mean() < 6e-3  # rounding alone averages 0.25 level ~ 3.6e-3


def test_inputs_match_processor_text_side(backend):
    u8 = _uint8_images(2, 24, 32)
    questions = [VQA_QUESTION.format(prompt=p) for p in PROMPTS]
    mine = backend.inputs(u8.float() / 255, questions)
    ref = backend.processor(text=backend.chat_texts(questions), images=list(u8), padding=True, return_tensors="pt")
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert torch.equal(mine["attention_mask"], ref["attention_mask"])
    assert mine["attention_mask"][0, 0] == 0 and mine["attention_mask"][:, -1].all()  # left padded
    torch.testing.assert_close(mine["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)


def test_vqascore_equals_independent_softmax(backend):
    u8 = _uint8_images(2, 24, 32, seed=3)
    reward = VQAScore(backend)
    out = reward(u8.float() / 255, PROMPTS)
    probs = _reference_probs(backend, u8, [VQA_QUESTION.format(prompt=p) for p in PROMPTS])
    tok = backend.tokenizer.convert_tokens_to_ids
    p_yes, p_no = probs[:, tok("Yes")], probs[:, tok("No")]
    assert backend.word_ids("Yes") == [tok("Yes")]  # "yes" (lower case) is a different answer
    torch.testing.assert_close(out.scores.double(), p_yes, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["p_yes_norm"].double(), p_yes / (p_yes + p_no), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["log_odds"].double(), (p_yes / p_no).log(), atol=1e-4, rtol=1e-4)
    assert out.scores.dtype == torch.float32 and out.valid.all() and ((out.scores > 0) & (out.scores < 1)).all()
    log_odds = VQAScore(backend, variant="log_odds")(u8.float() / 255, PROMPTS)
    torch.testing.assert_close(log_odds.scores, out.components["log_odds"])


def test_batching_does_not_change_scores(backend):
    x = _uint8_images(3, 24, 32, seed=4).float() / 255
    prompts = PROMPTS + ["a cat"]
    whole = VQAScore(backend)(x, prompts).scores
    chunked = VQAScore(backend, batch_size=2)(x, prompts).scores
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_pixels(backend):
    x = (0.25 + 0.5 * torch.rand(2, 3, 37, 29, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    for reward in (VQAScore(backend), VLMJudge(backend)):
        x.grad = None
        reward(x, PROMPTS).scores.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_judge_expected_rating_equals_hand_sum(backend):
    u8 = _uint8_images(2, 24, 32, seed=6)
    out = VLMJudge(backend)(u8.float() / 255, PROMPTS)
    probs = _reference_probs(backend, u8, [RUBRIC.format(prompt=p) for p in PROMPTS])
    tok = backend.tokenizer.convert_tokens_to_ids
    p = torch.stack([probs[:, tok(str(k))] for k in range(1, 6)], -1)  # (B, 5)
    expected = (p * torch.arange(1, 6, dtype=p.dtype)).sum(-1) / p.sum(-1)
    torch.testing.assert_close(out.scores.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["rating_mass"].double(), p.sum(-1), atol=1e-6, rtol=1e-4)
    assert ((out.scores >= 1) & (out.scores <= 5)).all()


def _force_next_token(backend, word, logit=10.0):
    """Give the tiny model a head that always prefers ``word`` (a real Linear, zero weight + bias)."""
    model = backend.model
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[backend.tokenizer.convert_tokens_to_ids(word)] = logit
    model.lm_head = head.requires_grad_(False)
    return old


def test_judge_generate_parses_and_marks_failures_invalid(backend):
    x = _uint8_images(2, 24, 32, seed=7).float() / 255
    old = _force_next_token(backend, "4")
    try:
        out = VLMJudge(backend, mode="generate", max_new_tokens=3)(x, PROMPTS)
        assert out.extras["text"] == ["4 4 4"] * 2
        assert out.valid.all() and out.scores.tolist() == [4.0, 4.0]
        e = math.exp(10.0)  # expected value with logits 10 on "4", 0 on the other digits
        exp = VLMJudge(backend)(x, PROMPTS)
        torch.testing.assert_close(exp.scores, torch.full((2,), (1 + 2 + 3 + 5 + 4 * e) / (e + 4)))
        backend.model.lm_head = old
        _force_next_token(backend, "cat")
        bad = VLMJudge(backend, mode="generate", max_new_tokens=3, critique=True)(x, PROMPTS)
        assert bad.extras["text"] == ["cat cat cat"] * 2 and len(bad.extras["critique"]) == 2
        assert not bad.valid.any() and torch.isnan(bad.scores).all()  # never a silent 0
    finally:
        backend.model.lm_head = old


def test_parse_rating():
    assert parse_rating("4") == 4 and parse_rating("Rating: 3/5") == 3 and parse_rating("I'd say 5.") == 5
    assert parse_rating("10 out of 10") is None and parse_rating("4.5") is None and parse_rating("good") is None
    assert parse_rating("0, then 2") == 2


def test_registry_loads_by_spec_and_shares_the_model(folder):
    a = rewards.load(f"vqascore:model={folder},variant=p_yes_norm")
    b = rewards.load("vlm-judge", model=folder)
    assert isinstance(a, VQAScore) and isinstance(b, VLMJudge) and a.backend is b.backend
    assert a.info.differentiable and a.info.inputs == ("images", "prompts")
    with pytest.raises(ValueError, match="variant"):
        rewards.load("vqascore", model=folder, variant="yes")
    with pytest.raises(ValueError, match="mode"):
        rewards.load("vlm-judge", model=folder, mode="sample")
    with pytest.raises(ValueError, match="needs prompts"):
        a(torch.rand(1, 3, 24, 32))


def test_qwen2_5_vl_family(tmp_path):
    """Qwen2.5-VL shares the processor (and so the pixel path); its vision tower attends in windows."""
    backend = load_backend(str(tiny_qwen2vl(tmp_path / "q25", version="2.5")))
    assert type(backend.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    u8 = _uint8_images(2, 32, 32, seed=8)
    x = (u8.float() / 255).requires_grad_(True)
    out = VQAScore(backend)(x, PROMPTS)
    probs = _reference_probs(backend, u8, [VQA_QUESTION.format(prompt=p) for p in PROMPTS])
    torch.testing.assert_close(out.scores.detach().double(), probs[:, backend.tokenizer.convert_tokens_to_ids("Yes")],
                               atol=1e-5, rtol=1e-4)
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_missing_model_error_names_the_path(tmp_path):
    with pytest.raises(OSError, match="could not load the VLM"):
        load_backend(str(tmp_path / "nope"))
