"""HPSv3 on a tiny random Qwen2-VL saved in the released layout (HPSv3.safetensors + base folder).

The reference numbers come from transformers' own Qwen2VLForConditionalGeneration, loaded from the
same tensors by transformers' loader, run as the official inferencer runs it (processor inputs
from uint8 pictures, one image per call, language model on inputs_embeds without position ids)
with the head computed by hand from the file's tensors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from visalign import rewards
from visalign.rewards.anchor_loading import CheckpointMismatchError
from visalign.rewards.anchor_testing import tiny_hpsv3
from visalign.rewards.hpsv3 import REWARD_TOKEN, HPSv3, hpsv3, hpsv3_prompt

PIXELS = 32 * 32  # the tiny model's min = max pixels (factor 8): 32x32 pictures are not resized
PROMPTS = ["a red cat", "a blue dog on the square with a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def reward(tiny) -> HPSv3:
    return hpsv3(str(tiny["checkpoint"]), base=str(tiny["base"]), pixels=PIXELS)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """transformers' model loaded from the checkpoint's tensors by transformers itself, the processor
    with <|Reward|>, and the head's tensors."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    state = load_file(str(tiny["checkpoint"]))
    folder = tmp_path_factory.mktemp("hpsv3_ref")
    config = json.loads((tiny["base"] / "config.json").read_text())
    config["text_config"]["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(folder / "model.safetensors"))
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(tiny["base"])
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    head = {k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")}
    return model.eval(), processor, head


def official_score(reference, image_u8: torch.Tensor, prompt: str) -> torch.Tensor:
    """(mu, log_sigma) as the official HPSv3 inferencer computes them, for one picture."""
    model, processor, head = reference
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_prompt(prompt)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image_u8], return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        lm = model.model.language_model
        embeds = lm.embed_tokens(ids)
        image_embeds = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image_embeds)
        hidden = lm(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).last_hidden_state
        h = hidden[ids == processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)].float()  # (1, D)
        h = F.relu(F.linear(h, head["0.weight"], head["0.bias"]))
        h = F.relu(F.linear(h, head["3.weight"], head["3.bias"]))
        return F.linear(h, head["5.weight"], head["5.bias"])[0]


def _u8(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_prompt_is_the_official_template():
    text = hpsv3_prompt("a red cat")
    assert text.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text "
                           "Alignment and give a overall score to estimate the human preference. Please provide a "
                           "rating from 0 to 10, with 0 being the worst and 10 being the best. \n\n**Visual Quality:**  \n")
    assert "possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt" in text
    assert text.endswith("distort the original description.\nTextual prompt - a red cat\n\n\n\nPlease provide the overall "
                         "ratings of this image: <|Reward|>\n\nEND\n")
    assert text.count(REWARD_TOKEN) == 1 and hpsv3_prompt("{x}").count("{x}") == 1


def test_checkpoint_is_in_the_released_layout(tiny, reward):
    from safetensors import safe_open

    with safe_open(str(tiny["checkpoint"]), "pt") as f:
        keys = set(f.keys())
    assert {"visual.patch_embed.proj.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "rm_head.0.weight", "rm_head.3.bias", "rm_head.5.weight"} <= keys
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)
    own = set(reward.model.state_dict())
    assert len(own) == len(keys) - 1  # every key placed but lm_head.weight
    assert reward.model.rm_head[5].out_features == 2 and reward.model.rm_head[0].out_features == 1024


def test_scores_equal_the_official_computation(reward, reference):
    u8 = _u8(2)
    out = reward(u8.float() / 255, PROMPTS)  # different prompt lengths: padding is exercised
    expected = torch.stack([official_score(reference, img, p) for img, p in zip(u8, PROMPTS)])
    torch.testing.assert_close(out.scores, expected[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.components["sigma"], expected[:, 1].exp(), atol=1e-5, rtol=0)
    assert out.scores.dtype == torch.float32 and out.valid.all()
    assert out.scores[0] != out.scores[1]


def test_resizing_to_the_pixel_budget(reward):
    x = torch.rand(2, 3, 48, 20, generator=torch.Generator().manual_seed(3))  # 960 px, off the grid
    out = reward(x, PROMPTS)
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()


def test_batch_order_and_batch_size_invariance(reward, tiny):
    x = _u8(3, seed=1).float() / 255
    prompts = PROMPTS + ["a cat"]
    base = reward(x, prompts).scores
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(reward(x[perm], [prompts[i] for i in perm]).scores, base[perm], atol=1e-5, rtol=0)
    small = hpsv3(str(tiny["checkpoint"]), base=str(tiny["base"]), pixels=PIXELS, batch_size=1)
    torch.testing.assert_close(small(x, prompts).scores, base, atol=1e-5, rtol=0)


def test_gradient_reaches_pixels(reward):
    assert reward.info.differentiable
    x = (_u8(2, seed=2).float() / 255).requires_grad_(True)
    reward(x, PROMPTS).scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_registered_with_facts():
    info = rewards.info("hpsv3")
    assert info.licence == "MIT AND Apache-2.0" and info.differentiable and info.inputs == ("images", "prompts")
    assert "MizzenAI/HPSv3" in info.weights and "Qwen2-VL-7B-Instruct" in info.weights


def test_video_input_is_refused(reward):
    with pytest.raises(ValueError, match="video_frames"):
        reward(torch.rand(1, 2, 3, 32, 32), ["a"])


@pytest.mark.parametrize("edit, message", [
    ("drop", "Missing keys: \\[rm_head.3.bias\\]"),
    ("extra_head", "unexpected keys: \\[rm_head.9.weight\\]"),
    ("extra_other", "no place in the model: \\[extra.weight\\]"),
    ("shape", "shape mismatches: \\[backbone.language_model.norm.weight"),
])
def test_strict_loading_refuses_a_mismatched_checkpoint(tiny, tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny["checkpoint"]))
    if edit == "drop":
        del state["rm_head.3.bias"]
    elif edit == "extra_head":
        state["rm_head.9.weight"] = torch.zeros(2, 2)
    elif edit == "extra_other":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["model.norm.weight"] = torch.zeros(7)
    bad = tmp_path / "HPSv3.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        hpsv3(str(tmp_path), base=str(tiny["base"]), pixels=PIXELS)
    assert str(bad) in str(err.value)


def test_new_transformers_layout_is_read_too(tiny, tmp_path, reward):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny["checkpoint"]))
    renamed = {}
    for k, v in state.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    save_file(renamed, str(tmp_path / "HPSv3.safetensors"))
    other = hpsv3(str(tmp_path), base=str(tiny["base"]), pixels=PIXELS)
    x = _u8(1).float() / 255
    torch.testing.assert_close(other(x, PROMPTS[:1]).scores, reward(x, PROMPTS[:1]).scores, atol=0, rtol=0)
    shutil.rmtree(tmp_path)
