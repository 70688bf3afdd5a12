"""Tiny random reward anchors saved in their released on-disk layouts, for tests and docs.

Each builder makes the real model classes from tiny configs (a Qwen2-VL / Qwen2.5-VL of
:func:`visalign.rewards.vlm_testing.tiny_qwen2vl`, with the chat-template layout of the released
Instruct models) and writes the files the way the official checkpoints are written, so the
factories' real loading path runs on them:

* :func:`tiny_hpsv3`: a base model folder (config, processor; stands for ``Qwen/Qwen2-VL-7B-Instruct``)
  and ``HPSv3.safetensors``: the whole reward model's state dict in the flat layout of
  transformers < 4.52 (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.{0,3,5}.*``), the
  embeddings grown by one row for ``<|Reward|>``;
* :func:`tiny_videoreward`: a base folder (for ``Qwen/Qwen2-VL-2B-Instruct``) and a reward folder
  with ``model_config.json`` and ``checkpoint-<step>/model.pth``: a PEFT (LoRA) model's state dict
  (``base_model.model.*``, ``lora_A`` / ``lora_B`` / ``base_layer``), written with ``torch.save``;
* :func:`tiny_unifiedreward`: a Qwen2.5-VL chat model folder in transformers layout (the released
  UnifiedReward-qwen checkpoints are plain fine-tuned Qwen2.5-VL-Instruct folders).

Random weights: the scores mean nothing; the tests compare them with independent computations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .vlm_testing import tiny_qwen2vl

__all__ = ["tiny_hpsv3", "tiny_videoreward", "tiny_unifiedreward", "QWEN_VL_CHAT_TEMPLATE", "legacy_qwen2vl_key"]

# The layout of the Qwen2-VL / Qwen2.5-VL Instruct chat template: a default system turn, images and
# videos as <|vision_start|><|image_pad|> / <|video_pad|><|vision_end|>, the generation prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# words of the anchors' prompts and answers, so the tiny tokenizer spells them (the rest is [UNK])
ANCHOR_WORDS = ["Final", "Score", "Image", "Both", "images", "are", "equally", "is", "better", "element", "value",
                "Text", "Caption", "[", "]", "rating", "ratings", "quality", "video", "Visual", "Motion", "Alignment",
                "END", "Textual", "prompt", "-", "system", "You", "helpful", "assistant"]


def legacy_qwen2vl_key(key: str) -> str:
    """transformers >= 4.52 Qwen2-VL key -> the flat layout of earlier versions (how the released
    reward checkpoints name their tensors)."""
    key = re.sub(r"^model\.visual\.", "visual.", key)
    return re.sub(r"^model\.language_model\.", "model.", key)


def _base(folder: Path, seed: int, version: str = "2") -> Path:
    return tiny_qwen2vl(folder, seed=seed, version=version, words=ANCHOR_WORDS, chat_template=QWEN_VL_CHAT_TEMPLATE)


def _grown_vlm(base: Path, new_tokens: list[str], seed: int) -> tuple[Any, Any, list[int]]:
    """The base model with its embeddings grown for ``new_tokens`` (as the official trainers do)
    and perturbed so random scores differ visibly; returns (model, tokenizer, token ids)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": new_tokens})
    ids = tok.convert_tokens_to_ids(new_tokens)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base).eval()
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tok, ids


def tiny_hpsv3(folder: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """A tiny HPSv3: ``{"base": folder/base, "checkpoint": folder/HPSv3.safetensors}``.

    The head has the released layout (``rm_head``: Linear(D, 1024), ReLU, Dropout, Linear(1024, 16),
    ReLU, Linear(16, 2); keys ``rm_head.0``, ``rm_head.3``, ``rm_head.5``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    base = _base(folder / "base", seed)
    model, _, _ = _grown_vlm(base, ["<|Reward|>"], seed)
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(seed + 1)
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    state = {legacy_qwen2vl_key(k): v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"rm_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(folder / "HPSv3.safetensors"))
    return {"base": base, "checkpoint": folder / "HPSv3.safetensors"}


# The released model_config.json's sections, with the values of the official checkpoint.
VIDEOREWARD_CONFIG: dict[str, Any] = {
    "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200704, "sample_type": "uniform",
                    "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special"},
    "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "use_special_tokens": True,
                     "reward_token": "special"},
    "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 64, "lora_alpha": 128,
                         "lora_dropout": 0.05, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                         "num_lora_modules": -1, "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens",
                                                                           "visual"]},
    "inference_config": {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                         "TA_mean": 2.8105, "TA_std": 2.5121},
}


def tiny_videoreward(folder: str | Path, *, seed: int = 0, step: int = 12, lora_r: int = 4, lora_alpha: int = 8,
                     max_frame_pixels: int = 24 * 24) -> dict[str, Path]:
    """A tiny VideoReward: ``{"base": ..., "checkpoint": reward folder, "model": .../model.pth}``.

    The reward folder holds ``model_config.json`` (the released schema; the base model path, LoRA
    rank / alpha and the frame pixel budget set for the tiny model) and
    ``checkpoint-<step>/model.pth``: the state dict of the PEFT model (LoRA on every Linear of the
    language model; ``lora_B`` randomised so the adapters matter), keys in the flat layout."""
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    base = _base(folder / "base", seed)
    model, _, _ = _grown_vlm(base, ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"], seed)
    hidden = model.config.text_config.hidden_size
    model.rm_head = torch.nn.Linear(hidden, 1, bias=False)
    excluded = ("lm_head", "rm_head", "embed_tokens", "visual")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not any(e in name for e in excluded)]
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=lora_r, lora_alpha=lora_alpha,
                                                  lora_dropout=0.05, bias="none"))
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "rm_head" in name:
                p.copy_(0.1 * torch.randn_like(p))
    prefix = "base_model.model."
    state = {}
    for key, value in peft_model.state_dict().items():
        assert key.startswith(prefix), key
        state[prefix + legacy_qwen2vl_key(key[len(prefix):])] = value.clone().contiguous()
    reward = folder / "reward"
    (reward / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
    torch.save(state, reward / f"checkpoint-{step}" / "model.pth")
    config = json.loads(json.dumps(VIDEOREWARD_CONFIG))
    config["model_config"]["model_name_or_path"] = str(base)
    config["peft_lora_config"].update(lora_r=lora_r, lora_alpha=lora_alpha)
    config["data_config"]["max_frame_pixels"] = max_frame_pixels
    (reward / "model_config.json").write_text(json.dumps(config, indent=2))
    return {"base": base, "checkpoint": reward, "model": reward / f"checkpoint-{step}" / "model.pth"}


def tiny_unifiedreward(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL chat model standing for ``CodeGoat24/UnifiedReward-qwen-7b``."""
    return _base(Path(folder), seed, version="2.5")
