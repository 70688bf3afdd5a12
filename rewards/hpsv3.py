"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", ICCV 2025).

A Qwen2-VL-7B-Instruct fine-tuned on HPDv3 preference pairs with an uncertainty-aware ranking
loss.  Architecture of the released ``MizzenAI/HPSv3`` checkpoint (``HPSv3.safetensors``):

* the tokenizer of ``Qwen/Qwen2-VL-7B-Instruct`` plus one special token ``<|Reward|>``; the
  embeddings (and LM head) grown by one row for it;
* prompt: the image, then :data:`INSTRUCTION` (with the text prompt) followed by
  ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``, in the chat
  template's user turn, with the generation prompt;
* the language model's last hidden state at ``<|Reward|>`` -> ``rm_head`` = Linear(3584, 1024),
  ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2) (float32) -> ``(mu, log_sigma)``: the
  preference score is modelled as N(mu, sigma^2); the score is ``mu`` (as the official
  inferencer returns), ``sigma = exp(log_sigma)`` is its uncertainty;
* images resized so that their area is exactly ``256 * 28 * 28`` pixels (``min_pixels =
  max_pixels = 200704``: 256 merged image tokens), sides multiples of 28;
* rotary positions: sequential (see :mod:`visalign.rewards.qwen_reward`).

The checkpoint is the whole model's state dict, flat (pre-4.52 transformers) key layout:
``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.{0,3,5}.{weight,bias}``.  It is loaded
strictly through :func:`visalign.rewards.anchor_loading.qwen2vl_key`; ``lm_head.weight`` is the
only key left unused (the reward never reads token logits).  The architecture comes from the base
model's ``config.json``, the vocabulary size from the checkpoint.

Preprocessing is done with torch ops, so the score is differentiable w.r.t. the pixels; the
official pipeline resizes with PIL (bicubic on uint8), ours is antialiased bicubic on floats.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .anchor_loading import (
    CheckpointMismatchError,
    build_empty,
    load_strict_assign,
    qwen2vl_key,
    read_tensors,
    rename_state_dict,
    resolve_file,
    resolve_folder,
)
from .base import Reward, RewardInfo, RewardOutput
from .loading import resolve_dtype
from .qwen_reward import QwenRewardModel, encode_chats, image_pixels

__all__ = ["HPSv3", "hpsv3", "hpsv3_prompt", "INSTRUCTION", "REWARD_PROMPT", "REWARD_TOKEN", "PIXELS", "BASE_MODEL",
           "load_hpsv3_model"]

BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT = "MizzenAI/HPSv3"
FILENAME = "HPSv3.safetensors"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels at inference
LICENCE = "MIT AND Apache-2.0"  # HPSv3 (MIT) fine-tuned from Qwen2-VL-7B-Instruct (Apache-2.0)
UNUSED_KEYS = re.compile(r"lm_head\.weight")

INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)
REWARD_PROMPT = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_prompt(prompt: str) -> str:
    """The text HPSv3 reads with the image: :data:`INSTRUCTION` with ``prompt``, then :data:`REWARD_PROMPT`."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_PROMPT


def ranknet_head(sizes: Sequence[int]) -> nn.Sequential:
    """HPSv3's ``rm_head``: Linear, ReLU, Dropout, Linear, ReLU, Linear (keys 0, 3, 5)."""
    d, h1, h2, out = sizes
    return nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Dropout(0.05), nn.Linear(h1, h2), nn.ReLU(),
                         nn.Linear(h2, out))


def load_hpsv3_model(checkpoint: str | Path, base: str | Path, *, filename: str = FILENAME,
                     dtype: Any = None) -> tuple[QwenRewardModel, Any, int]:
    """``(model, processor, reward token id)`` from the official checkpoint and the base model's
    config and processor (strict; see the module docstring)."""
    from transformers import AutoConfig, AutoProcessor

    what = "HPSv3"
    path = resolve_file(checkpoint, filename, what)
    base = resolve_folder(base, f"{what} base model", ("config.json", "preprocessor_config.json"))
    state = read_tensors(path, what)
    config = AutoConfig.from_pretrained(base)
    if config.model_type != "qwen2_vl":
        raise ValueError(f"{what}: base model {base!r} is a {config.model_type!r}; HPSv3 is built on Qwen2-VL "
                         f"({BASE_MODEL})")
    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    tok.padding_side = "right"  # as the official inferencer; positions are computed from the mask anyway
    token_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
    state = rename_state_dict(state, qwen2vl_key, UNUSED_KEYS, what, path)
    try:
        vocab = state["backbone.language_model.embed_tokens.weight"].shape[0]
        sizes = (state["rm_head.0.weight"].shape[1], state["rm_head.0.weight"].shape[0],
                 state["rm_head.3.weight"].shape[0], state["rm_head.5.weight"].shape[0])
    except KeyError as err:
        raise CheckpointMismatchError(f"{what}: checkpoint {str(path)!r} does not match the model. Missing keys: "
                                      f"[{err.args[0]}] (the official file has 'model.embed_tokens.weight' and "
                                      "'rm_head.{0,3,5}.*')") from None
    if token_id >= vocab:
        raise CheckpointMismatchError(f"{what}: the tokenizer puts {REWARD_TOKEN} at id {token_id} but the checkpoint "
                                      f"has {vocab} embeddings; use the base model the checkpoint was trained from")
    if sizes[-1] != 2:
        raise CheckpointMismatchError(f"{what}: rm_head outputs {sizes[-1]} values; HPSv3's outputs (mu, log_sigma)")
    config.text_config.vocab_size = vocab
    model = build_empty(lambda: QwenRewardModel(config, ranknet_head(sizes)))
    load_strict_assign(model, state, what, path)
    if dtype is not None:
        model.backbone.to(resolve_dtype(dtype))
    model.rm_head.float()
    return model.eval().requires_grad_(False), processor, token_id


class HPSv3(Reward):
    """HPSv3 preference score of (image, prompt) pairs; differentiable.

    ``scores`` = ``mu``; ``components``: ``mu``, ``sigma`` (= exp(log_sigma), the model's
    uncertainty about the score).

    Args:
        model (`QwenRewardModel`), processor, token_id: from :func:`load_hpsv3_model`.
        pixels (`int`, *optional*, defaults to 200704): image area after resizing (min = max pixels).
        batch_size (`int`, *optional*): images per forward pass.
    """

    def __init__(self, model: QwenRewardModel, processor: Any, token_id: int, *, pixels: int = PIXELS,
                 batch_size: int | None = None, weights: str = f"{CHECKPOINT} ({FILENAME})") -> None:
        self.model, self.processor, self.token_id = model, processor, token_id
        self.pixels, self.batch_size = int(pixels), batch_size
        self.info = RewardInfo(name="hpsv3", version="v3", licence=LICENCE, modality="image",
                               inputs=("images", "prompts"), native_range=(0.0, 15.0), differentiable=True,
                               weights=weights, description="HPSv3 (Ma et al. 2025): Qwen2-VL + rm_head at <|Reward|>")

    def chat_texts(self, prompts: Sequence[str]) -> list[str]:
        texts = []
        for p in prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_prompt(p)}]}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return texts

    def raw(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 2)`` float32 ``(mu, log_sigma)``."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.backbone.parameters()).dtype
        ip = self.processor.image_processor
        pixel_values, grid = image_pixels(images.to(device), ip, self.pixels, self.pixels)
        patch = int(ip.patch_size)
        size = (int(grid[0, 1]) * patch, int(grid[0, 2]) * patch)
        enc = encode_chats(self.processor, self.chat_texts(prompts), image_size=size)
        if not torch.equal(enc["image_grid_thw"], grid.cpu()):
            raise RuntimeError(f"internal: image grid {grid[0].tolist()} differs from the processor's "
                               f"{enc['image_grid_thw'][0].tolist()}")
        out = self.model(enc["input_ids"].to(device), enc["attention_mask"].to(device), [self.token_id],
                         pixel_values=pixel_values.to(dtype), image_grid_thw=grid)
        return out[:, 0]  # (B, 2)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim == 5:
            raise ValueError(f"reward 'hpsv3' scores images; got video {tuple(images.shape)}: wrap it with "
                             "video_frames:reward=hpsv3 to score frames")
        step = self.batch_size or images.shape[0]
        raw = torch.cat([self.raw(images[s : s + step], list(prompts[s : s + step]))
                         for s in range(0, images.shape[0], step)])
        mu, log_sigma = raw[:, 0], raw[:, 1]
        return RewardOutput(scores=mu, components={"mu": mu, "sigma": log_sigma.exp()})


def hpsv3(checkpoint: str = CHECKPOINT, *, base: str = BASE_MODEL, filename: str = FILENAME, dtype: Any = None,
          device: Any = None, pixels: int = PIXELS, batch_size: int | None = None) -> HPSv3:
    """Registry factory for ``hpsv3`` (``"hpsv3:dtype=bfloat16,device=cuda"``).

    Args:
        checkpoint (`str`, *optional*): hub repo holding ``filename`` (``MizzenAI/HPSv3``), a folder, or
            the ``.safetensors`` file itself.
        base (`str`, *optional*): the base model (hub id or folder) giving the config, the image
            processor, the tokenizer and the chat template: ``Qwen/Qwen2-VL-7B-Instruct``.  Its weights
            are not read.
        dtype, device (*optional*): where the backbone runs (the checkpoint's dtype on CPU by default;
            the head stays float32).
        pixels (`int`, *optional*): image area after resizing; 200704 as in training.
    """
    model, processor, token_id = load_hpsv3_model(checkpoint, base, filename=filename, dtype=dtype)
    if device is not None:
        model.to(device)
    return HPSv3(model, processor, token_id, pixels=pixels, batch_size=batch_size, weights=str(checkpoint))
