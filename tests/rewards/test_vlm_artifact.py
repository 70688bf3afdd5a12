"""artifact-vlm on a tiny random Qwen2-VL: per-category P(no artifact), mean / min reduction."""

from __future__ import annotations

import pytest
import torch

from visalign import rewards
from visalign.rewards.vlm_artifact import ARTIFACT_QUESTIONS, ArtifactVLM
from visalign.rewards.vlm_backend import load_backend
from visalign.rewards.vlm_testing import tiny_qwen2vl


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"), seed=1))


def test_components_are_p_no_per_category(folder):
    backend = load_backend(folder)
    u8 = torch.randint(0, 256, (2, 3, 24, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    reward = ArtifactVLM(backend)
    out = reward(u8.float() / 255)  # no prompts needed
    assert list(out.components) == list(ARTIFACT_QUESTIONS)
    tok = backend.tokenizer.convert_tokens_to_ids
    for cat, question in ARTIFACT_QUESTIONS.items():
        for i in range(2):
            text = backend.chat_texts([question])
            enc = backend.processor(text=text, images=[u8[i]], return_tensors="pt")
            with torch.no_grad():
                p = torch.softmax(backend.model(**enc).logits[0, -1].double(), -1)
            expected = p[tok("No")] / (p[tok("Yes")] + p[tok("No")])
            torch.testing.assert_close(out.components[cat][i].double(), expected, atol=1e-5, rtol=1e-4)
    stacked = torch.stack(list(out.components.values()), -1)
    torch.testing.assert_close(out.scores, stacked.mean(-1))
    assert ((out.scores > 0) & (out.scores < 1)).all() and out.valid.all()
    worst = ArtifactVLM(backend, reduce="min")(u8.float() / 255)
    torch.testing.assert_close(worst.scores, stacked.min(-1).values)


def test_subset_raw_reading_and_gradient(folder):
    reward = rewards.load(f"artifact-vlm:model={folder},categories=anatomy+text,reading=p_no")
    x = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = reward(x)
    assert set(out.components) == {"anatomy", "text"}
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_options_are_named(folder):
    backend = load_backend(folder)
    with pytest.raises(ValueError, match="hands"):
        ArtifactVLM(backend, categories="hands")
    with pytest.raises(ValueError, match="reduce"):
        ArtifactVLM(backend, reduce="max")
