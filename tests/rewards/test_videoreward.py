"""VideoReward on a tiny random Qwen2-VL saved in the released layout (model_config.json +
checkpoint-<step>/model.pth holding a PEFT LoRA model's state dict).

The reference numbers come from transformers' Qwen2VLForConditionalGeneration wrapped by PEFT with
the release's LoRA targets, loaded with PEFT's own state dict (adapters not merged), run as the
official inferencer runs it: processor inputs from uint8 frames, language model on inputs_embeds
without position ids, rm_head at the three special tokens.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from visalign import rewards
from visalign.rewards.anchor_loading import CheckpointMismatchError
from visalign.rewards.anchor_testing import tiny_videoreward
from visalign.rewards.qwen_reward import qwen2vl_video_pixels
from visalign.rewards.videoreward import (
    SPECIAL_TOKENS,
    VideoReward,
    sample_frame_indices,
    videoreward,
    videoreward_prompt,
)

PROMPTS = ["a red cat", "a blue dog on the square with a cat"]
SIDE = 24  # frames of 24x24 are on the tiny grid (factor 8) and within [16*16, 24*24] pixels: not resized


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_videoreward(tmp_path_factory.mktemp("videoreward"))


def _load(tiny, **kw) -> VideoReward:
    return videoreward(str(tiny["checkpoint"]), min_frame_pixels=16 * 16, video_fps=8.0, **kw)


@pytest.fixture(scope="module")
def reward(tiny) -> VideoReward:
    return _load(tiny)


@pytest.fixture(scope="module")
def reference(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    cfg = json.loads((tiny["checkpoint"] / "model_config.json").read_text())
    processor = AutoProcessor.from_pretrained(tiny["base"])
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny["base"])
    model.resize_token_embeddings(len(processor.tokenizer))
    model.rm_head = torch.nn.Linear(model.config.text_config.hidden_size, 1, bias=False)
    peft_cfg = cfg["peft_lora_config"]
    excluded = peft_cfg["lora_namespan_exclude"]
    targets = [n for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and not any(e in n for e in excluded)]
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=peft_cfg["lora_r"],
                                                  lora_alpha=peft_cfg["lora_alpha"], lora_dropout=0.0, bias="none"))
    state = torch.load(tiny["model"], weights_only=True)
    new = {}
    for k, v in state.items():  # the release's flat layout -> transformers >= 4.52 names
        k = re.sub(r"^base_model\.model\.visual\.", "base_model.model.model.visual.", k)
        k = re.sub(r"^base_model\.model\.model\.(?!visual)", "base_model.model.model.language_model.", k)
        new[k] = v
    peft_model.load_state_dict(new, strict=True)
    return peft_model.eval(), processor, cfg


def official_raw(reference, frames_u8: torch.Tensor, prompt: str) -> torch.Tensor:
    """Raw (VQ, MQ, TA) of one video as the official inferencer computes them."""
    peft_model, processor, _ = reference
    model = peft_model.base_model.model
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": videoreward_prompt(prompt)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], videos=[frames_u8], return_tensors="pt",
                    videos_kwargs={"do_resize": False, "cap_pixels_per_frame": False})
    ids = enc["input_ids"]
    with torch.no_grad():
        lm = model.model.language_model
        embeds = lm.embed_tokens(ids)
        video_embeds = model.model.visual(enc["pixel_values_videos"], grid_thw=enc["video_grid_thw"]).pooler_output
        mask = (ids == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, video_embeds)
        hidden = lm(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).last_hidden_state
        logits = model.rm_head(hidden)  # (1, L, 1)
        token_ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for tid in token_ids:
            mask |= ids == tid
        return logits[mask].view(3)  # in sequence order: VQ, MQ, TA


def _videos(b: int, f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)


def test_frame_sampling_follows_the_official_rule():
    # 33 frames at 16 fps read at 2 fps: 4.1 -> 4 frames, linspace(0, 32, 4).round()
    assert sample_frame_indices(33, 16, 2.0).tolist() == [0, 11, 21, 32]
    assert sample_frame_indices(121, 24, 2.0).tolist() == torch.linspace(0, 120, 10).round().long().tolist()
    assert sample_frame_indices(3, 24, 2.0).tolist() == [0, 2]  # at most min(768, total) rounded down to even
    assert sample_frame_indices(10, None, None, num_frames=5).tolist() == [0, 3, 6, 9]  # round(5 / 2) * 2 = 4
    assert len(sample_frame_indices(2000, 24, 2.0)) == 166
    with pytest.raises(ValueError, match="at least 2"):
        sample_frame_indices(1, 24, 2.0)
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(10, None, 2.0)


def test_prompt_is_the_official_template():
    text = videoreward_prompt("a red cat")
    assert text.startswith("\nYou are tasked with evaluating a generated video based on three distinct criteria: "
                           "Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10")
    assert "possible. \n\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n**Motion Quality:**  \n" in text
    assert "quality.\n\nPlease provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n**Text Alignment:**  \n" in text
    assert text.endswith("prompt.\n\nTextual prompt - a red cat\nPlease provide the ratings of Text Alignment: "
                         "<|TA_reward|>\nEND\n")
    assert all(text.count(t) == 1 for t in SPECIAL_TOKENS)


def test_video_pixels_equal_the_processor(reward):
    vp = reward.processor.video_processor
    for frames in (4, 3):  # an odd count: the last frame is repeated, as the processor does
        u8 = _videos(2, frames, seed=frames)
        ref = vp(videos=list(u8), do_resize=False, return_tensors="pt")
        mine, grid = qwen2vl_video_pixels(u8.float() / 255, vp, 16 * 16, SIDE * SIDE)
        assert torch.equal(grid, ref["video_grid_thw"])
        torch.testing.assert_close(mine, ref["pixel_values_videos"], atol=1e-5, rtol=0)


def test_scores_equal_the_official_computation(reward, reference):
    videos = _videos(2, 9, seed=1)  # 9 frames at 8 fps read at 2 fps -> 2.25 -> clamp to 4 -> 4 frames
    idx = sample_frame_indices(9, 8.0, 2.0)
    assert idx.tolist() == [0, 3, 5, 8]
    out = reward(videos.float() / 255, PROMPTS)
    raw = torch.stack([official_raw(reference, v[idx], p) for v, p in zip(videos, PROMPTS)])
    torch.testing.assert_close(torch.stack([out.components[f"raw_{d}"] for d in ("VQ", "MQ", "TA")], 1), raw,
                               atol=1e-5, rtol=0)
    norm = reference[2]["inference_config"]
    expected = {d: (raw[:, i] - norm[f"{d}_mean"]) / norm[f"{d}_std"] for i, d in enumerate(("VQ", "MQ", "TA"))}
    for d, value in expected.items():
        torch.testing.assert_close(out.components[d], value, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, expected["VQ"] + expected["MQ"] + expected["TA"], atol=1e-5, rtol=0)
    assert out.valid.all() and out.scores.dtype == torch.float32


def test_without_normalisation_the_components_are_raw(tiny, reward):
    x = _videos(1, 4).float() / 255
    plain = _load(tiny, use_norm=False)(x, PROMPTS[:1])
    normed = reward(x, PROMPTS[:1])
    for d in ("VQ", "MQ", "TA"):
        torch.testing.assert_close(plain.components[d], normed.components[f"raw_{d}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.scores, sum(plain.components[d] for d in ("VQ", "MQ", "TA")))


def test_batch_order_invariance_and_gradient(reward):
    x = (_videos(3, 6, seed=2).float() / 255).requires_grad_(True)
    prompts = PROMPTS + ["a cat"]
    out = reward(x, prompts)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(reward(x[perm], [prompts[i] for i in perm]).scores, out.scores[perm].detach(),
                                   atol=1e-5, rtol=0)
    out.scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_images_are_refused(reward):
    with pytest.raises(ValueError, match=r"takes videos \(B, F, 3, H, W\)"):
        reward(torch.rand(1, 3, SIDE, SIDE), ["a"])


def test_registered_with_facts():
    info = rewards.info("videoreward")
    assert info.modality == "video" and info.differentiable and info.licence == "MIT AND Apache-2.0"
    assert "KlingTeam/VideoReward" in info.weights


def _write(tiny, tmp_path, state, config_edit=None):
    folder = tmp_path / "reward"
    (folder / "checkpoint-3").mkdir(parents=True)
    cfg = json.loads((tiny["checkpoint"] / "model_config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (folder / "model_config.json").write_text(json.dumps(cfg))
    torch.save(state, folder / "checkpoint-3" / "model.pth")
    return folder


@pytest.mark.parametrize("edit, error, message", [
    ("drop_b", CheckpointMismatchError, "incomplete LoRA adapter on 'model.layers.1.mlp.up_proj'"),
    ("drop_head", CheckpointMismatchError, "Missing keys: \\[rm_head.weight\\]"),
    ("extra", CheckpointMismatchError, "no place in the model: \\[extra.weight\\]"),
    ("lora_elsewhere", CheckpointMismatchError, "LoRA adapters on other layers"),
    ("outside_peft", CheckpointMismatchError, "outside the PEFT model"),
    ("pickle", ValueError, "weights_only=True"),
])
def test_strict_loading_refuses_a_mismatched_checkpoint(tiny, tmp_path, edit, error, message):
    state = torch.load(tiny["model"], weights_only=True)
    p = "base_model.model."
    if edit == "drop_b":
        del state[p + "model.layers.1.mlp.up_proj.lora_B.default.weight"]
    elif edit == "drop_head":
        del state[p + "rm_head.weight"]
    elif edit == "extra":
        state[p + "extra.weight"] = torch.zeros(2)
    elif edit == "lora_elsewhere":
        for k in [k for k in state if ".layers.0.self_attn.q_proj." in k]:
            del state[k]
        state[p + "model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    elif edit == "outside_peft":
        state["rm_head.weight"] = state.pop(p + "rm_head.weight")
    else:
        state["config"] = re.compile("not a tensor")
    folder = _write(tiny, tmp_path, state)
    with pytest.raises(error, match=message) as err:
        videoreward(str(folder), min_frame_pixels=16 * 16)
    if error is CheckpointMismatchError:
        assert str(folder / "checkpoint-3" / "model.pth") in str(err.value)


def test_an_unsupported_configuration_is_refused(tiny, tmp_path):
    state = torch.load(tiny["model"], weights_only=True)
    folder = _write(tiny, tmp_path, state, lambda c: c["data_config"].update(prompt_template_type="simple"))
    with pytest.raises(ValueError, match="prompt_template_type='simple'"):
        videoreward(str(folder))
