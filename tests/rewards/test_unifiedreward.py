"""UnifiedReward: the official prompts, the parsers on real-looking replies, the log-probability
readings, strict loading and the in-process path on a tiny random Qwen2.5-VL.

A random model does not write "Final Score: 4", so the end-to-end runs check what can be checked on
it: replies without a score are invalid samples (never 0), the digit log-probabilities recorded
during generation equal an independent teacher-forced forward pass, and the scoring from a reply
is tested on replies given to it.
"""

from __future__ import annotations

import math

import pytest
import torch

from visalign import rewards
from visalign.rewards import unifiedreward as U
from visalign.rewards.anchor_testing import tiny_unifiedreward
from visalign.rewards.judge import RewardJudge
from visalign.rewards.vlm_backend import load_backend


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_unifiedreward(tmp_path_factory.mktemp("unifiedreward"))


@pytest.fixture(scope="module")
def backend(folder):
    return load_backend(str(folder), strict=True)


def _images(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8).float() / 255


# ---- prompts and parsers ------------------------------------------------------------------------

def test_prompts_are_the_official_ones():
    point = U.unifiedreward_point_prompt("a red cat")
    assert point.startswith("You are given a text caption and a generated image based on that caption. Your task is "
                            "to evaluate this image based on two key criteria:\n1. Alignment with the Caption:")
    assert ("and assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: "
            "[a red cat]") in point and point.endswith("[a red cat]")
    pair = U.unifiedreward_pair_prompt("a {curly} cat")
    assert pair.startswith("You are given a text caption and two generated images based on that caption. Your task "
                           "is to evaluate and compare these images based on two key criteria:\n")
    assert ('Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are '
            'equally good."\nYour task is provided as follows:\nText Caption: [a {curly} cat]') in pair


@pytest.mark.parametrize("text, value", [
    ("Key elements:\n- red (color): 1\n- cat (object): 1\n- sofa (object): 0\nFinal Score: 4", 4.0),
    ("red (attribute): 1\n\n**Final Score:** 3.5", 3.5),
    ("Final Score: [5]", 5.0),
    ("final score: 2/5 because the cat is missing", 2.0),
    ("Final Score: 3\n...on reflection...\nFinal Score: 2", 2.0),
    ("I cannot evaluate this image.", None),
    ("Final Score: 0", None),
    ("Final Score: 7", None),
    ("Final Score: four", None),
    ("", None),
])
def test_point_parser(text, value):
    assert U.parse_unifiedreward_point(text) == value


@pytest.mark.parametrize("text, value", [
    ("Image 1 is better.", 1.0),
    ("Both images depict a cat, but the second has better lighting. Image 2 is better.", 0.0),
    ("Both images are equally good.", 0.5),
    ("Is Image 1 is better? Not quite: looking closer, Image 2 is better.", 0.0),
    ("image 1 IS better", 1.0),
    ("The first one.", None),
    ("", None),
])
def test_pair_parser(text, value):
    assert U.parse_unifiedreward_pair(text) == value


def test_token_readings():
    assert U.score_token_index(["Final", " Score", ":", " ", "4"]) == 4
    assert U.score_token_index(["Final", " Score", ":", " 4", "\n"]) == 3
    assert U.score_token_index(["Final", " Score", ": 4"]) is None  # the digit shares its token: no reading
    assert U.score_token_index(["Score", ":", " 4"]) is None
    assert U.pair_token_index(["Image", " ", "2", " is", " better", "."]) == 2
    assert U.pair_token_index(["Both", " images", " are", " equally", " good"]) is None
    lp = math.log
    # spellings summed, other tokens ignored, renormalised: p4 = 0.8, p5 = 0.2
    assert U.expected_digit_score({" 4": lp(0.3), "4": lp(0.1), " 5": lp(0.1), "Final": lp(0.5)}) == pytest.approx(4.2)
    assert U.expected_digit_score([("1", 0.0)]) == pytest.approx(1.0)
    assert U.expected_digit_score({"hello": 0.0}) is None
    assert U.first_image_probability({"1": lp(0.3), " 2": lp(0.1)}) == pytest.approx(0.75)
    assert U.first_image_probability({"7": 0.0}) is None


def test_openai_logprob_readings():
    def entry(tok, top):
        return {"token": tok, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}

    content = [entry("Final", [("Final", 1.0)]), entry(" Score", [(" Score", 1.0)]), entry(":", [(":", 1.0)]),
               entry(" 3", [(" 3", 0.5), (" 4", 0.25), (" three", 0.25)])]
    assert U.point_from_openai_logprobs(content) == pytest.approx((3 * 0.5 + 4 * 0.25) / 0.75)
    pair = [entry("Image", [("Image", 1.0)]), entry(" 1", [(" 1", 0.6), (" 2", 0.2)]), entry(" is", [(" is", 1.0)]),
            entry(" better", [(" better", 1.0)])]
    assert U.pair_from_openai_logprobs(pair) == pytest.approx(0.75)
    assert U.point_from_openai_logprobs(None) is None and U.point_from_openai_logprobs(pair) is None


# ---- loading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [("drop", "missing keys"), ("extra", "unexpected keys")])
def test_strict_loading_refuses_a_mismatched_checkpoint(folder, tmp_path, edit, message):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (weights,) = bad.glob("*.safetensors")
    state = load_file(str(weights))
    if edit == "drop":
        del state[next(k for k in state if k.endswith("mlp.up_proj.weight"))]
    else:
        state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        U.unifiedreward(str(bad))


def test_registered_with_facts():
    point, pair = rewards.info("unifiedreward"), rewards.info("unifiedreward-pair")
    assert point.native_range == (1.0, 5.0) and not point.differentiable and point.licence == "MIT AND Apache-2.0"
    assert pair.inputs == ("images", "prompts", "references") and "UnifiedReward-qwen-7b" in pair.weights


# ---- in process -------------------------------------------------------------------------------------

def test_recorded_digit_logprobs_equal_a_teacher_forced_pass(backend):
    """Greedy decoding redone by hand, one unpadded processor call per picture: the recorded digit
    log-probabilities and the generated tokens agree with it."""
    x = _images(2)
    questions = [U.unifiedreward_point_prompt("a red cat"), U.unifiedreward_point_prompt("a blue dog on the square")]
    texts, pieces, logprobs, ids = U.generate_with_digits(backend, [x], questions, "12345", 4)
    assert len(texts) == 2 and logprobs.shape == (2, 4, len(ids)) and len(pieces[0]) == 4
    for r in range(2):
        u8 = (x[r] * 255).round().to(torch.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[r]}]}]
        prompt = backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = backend.processor(text=[prompt], images=[u8], return_tensors="pt")
        seq, types = enc["input_ids"], enc.get("mm_token_type_ids")
        for k in range(4):
            extra = {"mm_token_type_ids": types} if types is not None else {}
            with torch.no_grad():
                logits = backend.model(input_ids=seq, attention_mask=torch.ones_like(seq),
                                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                       **extra).logits[0, -1].float()
            torch.testing.assert_close(logprobs[r, k], torch.log_softmax(logits, -1)[ids], atol=1e-4, rtol=0)
            nxt = int(logits.argmax())
            assert backend.tokenizer.decode([nxt], skip_special_tokens=True) == pieces[r][k]
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            if types is not None:
                types = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], dim=1)


def test_random_replies_are_invalid_not_zero(backend):
    reward = U.UnifiedRewardPoint(backend, max_new_tokens=6)
    x, prompts = _images(3), ["a red cat", "a dog", "a blue square with a cat"]
    out = reward(x, prompts)
    assert out.scores.shape == (3,) and not out.valid.any() and torch.isnan(out.scores).all()
    assert len(out.extras["text"]) == 3 and all(isinstance(t, str) for t in out.extras["text"])
    perm = [2, 0, 1]  # batch order (and left padding) does not change the greedy replies
    assert reward(x[perm], [prompts[i] for i in perm]).extras["text"] == [out.extras["text"][i] for i in perm]


def _fake_generation(replies, logprob_rows):
    """A stand-in for generate_with_digits returning the given replies (word pieces) and logprobs."""
    def fake(backend, slots, questions, digits, max_new_tokens):
        n = len(questions)
        pieces = [list(replies[i]) for i in range(n)]
        ids = sorted({i for d in digits for i in backend.word_ids(d)})
        steps = max(len(p) for p in pieces)
        lp = torch.full((n, steps, len(ids)), -30.0)
        for (r, k), per_digit in logprob_rows.items():
            for d, value in per_digit.items():
                lp[r, k, ids.index(backend.word_ids(d)[0])] = math.log(value)
        del replies[:n]
        return ["".join(p) for p in pieces], pieces, lp, ids
    return fake


def test_point_scores_from_replies(backend, monkeypatch):
    replies = [["cat (object): 1\n", "Final", " Score", ":", " ", "4"], ["I cannot tell."],
               ["Final", " Score", ": 3"]]
    monkeypatch.setattr(U, "generate_with_digits", _fake_generation(replies, {(0, 5): {"4": 0.6, "5": 0.2}}))
    out = U.UnifiedRewardPoint(backend)(_images(3), ["a", "b", "c"])
    assert out.valid.tolist() == [True, False, True]
    assert out.components["parsed"][0] == 4.0 and out.components["parsed"][2] == 3.0
    assert out.scores[0].item() == pytest.approx(4.25)  # expected over the digits: (4 * .6 + 5 * .2) / .8
    assert math.isnan(out.scores[1]) and out.scores[2] == 3.0  # unreadable digit: the parsed score
    assert math.isnan(out.components["expected"][2])


def test_pair_labels_and_judge(backend, monkeypatch):
    replies = [["Image", " ", "1", " is", " better", "."], ["Both images are equally good."], ["No idea"],
               ["Image", " ", "2", " is", " better"], ["Both images are equally good."], ["Image 1 is better"]]
    monkeypatch.setattr(U, "generate_with_digits", _fake_generation(replies, {(0, 2): {"1": 0.6, "2": 0.2}}))
    reward = U.UnifiedRewardPair(backend, both_orders=True)
    a, b = _images(3, seed=1), _images(1, seed=2)[0, :, :16, :24]  # one reference, another size: resized
    out = reward(a, ["a", "b", "c"], references=b)
    # order ab: 1, 0.5, none; order ba: 0 (image 2 = a), 0.5, 1 (image 1 = b) -> a preferred: 1, 0.5, nan
    assert out.scores[:2].tolist() == [1.0, 0.5] and math.isnan(out.scores[2])
    assert out.valid.tolist() == [True, True, False] and len(out.extras["text"][0]) == 2

    replies[:] = [["Image", " ", "1", " is", " better"]]
    expected = U.UnifiedRewardPair(backend, reading="expected")(a[:1], ["a"], references=b)
    assert expected.scores.item() == pytest.approx(0.75) and expected.components["parsed"].item() == 1.0

    class Stub:
        def compare(self, images_a, images_b, prompts):
            return torch.tensor([1.0, float("nan")])

    labels = RewardJudge(Stub(), name="unifiedreward-pair").compare(a[:2], a[:2].flip(0), ["a", "b"])
    assert labels[0] == 1.0 and torch.isnan(labels[1])


def test_pair_end_to_end_on_the_tiny_model(backend):
    reward = U.UnifiedRewardPair(backend, max_new_tokens=4)
    labels = reward.compare(_images(2), _images(2, seed=5), ["a red cat", "a dog"])
    assert labels.shape == (2,) and labels.dtype == torch.float32  # random replies: NaN, never a made-up label
    inputs = U._chat_inputs(backend, [_images(2), _images(2, seed=5)], ["q1", "q2"])
    assert inputs["image_grid_thw"].shape == (4, 3)  # two images per row, image 1 first
    u8 = [(im * 255).round().to(torch.uint8) for im in (_images(2)[0], _images(2, seed=5)[0])]
    ref = backend.processor.image_processor(images=u8, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"][: ref.shape[0]], ref, atol=1e-5, rtol=0)
