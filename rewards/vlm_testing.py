"""Tiny random-weight chat VLMs built offline, for tests and docs (real classes, tiny configs).

``tiny_qwen2vl(folder)`` and ``tiny_llava(folder)`` save a model, an image processor, a
word-level tokenizer whose vocabulary holds the answer words (``Yes``, ``No``, ``yes``, ``no``,
``1``..``5``) and a chat template, so :func:`visalign.rewards.vlm_backend.load_backend` can load
the folder like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["tiny_qwen2vl", "tiny_llava", "tiny_tokenizer", "QWEN_CHAT_TEMPLATE", "LLAVA_CHAT_TEMPLATE"]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
WORDS = ["Yes", "No", "yes", "no", "1", "2", "3", "4", "5", "user", "assistant", "USER", "ASSISTANT", ":",
         "Does", "this", "figure", "show", '"', "?", ".", ",", "Please", "answer", "or", "a", "red", "cat", "dog",
         "blue", "square", "Rate", "image", "the", "from", "to", "with", "one", "digit", "Is", "there", "any",
         "Rating", "good", "bad", "(", ")"]

# Minimal Qwen2-VL chat template: the parts the rewards rely on (user turn with an image, generation prompt).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_tokenizer(specials: list[str], pad: str, eos: str, bos: str | None = None, words: Sequence[str] = ()):
    """A word-level fast tokenizer from an in-memory vocabulary (no files, no network); ``words``
    are appended to the built-in vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = [w for w in dict.fromkeys(words) if w not in WORDS and w not in specials]
    vocab = {w: i for i, w in enumerate(specials + WORDS + extra + ["[UNK]"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, eos_token=eos, bos_token=bos,
                                   unk_token="[UNK]", additional_special_tokens=specials)


def tiny_qwen2vl(folder: str | Path, *, patch_size: int = 4, merge_size: int = 2, seed: int = 0,
                 version: str = "2", words: Sequence[str] = (), chat_template: str | None = None) -> Path:
    """Save a tiny random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``: windowed vision
    attention) chat model with its processor to ``folder``; returns the folder.  ``words`` extend
    the tokenizer's vocabulary; ``chat_template`` replaces the minimal one."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if version not in ("2", "2.5"):
        raise ValueError(f"tiny_qwen2vl version={version!r}: choose '2' or '2.5'")
    prefix = "Qwen2VL" if version == "2" else "Qwen2_5_VL"
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    processor_cls = getattr(transformers, f"{prefix}Processor")

    folder = Path(folder)
    tok = tiny_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", words=words)
    ids = tok.convert_tokens_to_ids
    factor = patch_size * merge_size
    ip = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                               min_pixels=(2 * factor) ** 2, max_pixels=(4 * factor) ** 2)
    vp = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    processor = processor_cls(image_processor=ip, tokenizer=tok, video_processor=vp,
                              chat_template=chat_template or QWEN_CHAT_TEMPLATE)
    if version == "2":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2)
    else:  # block 0 full attention, block 1 windowed over 2x2 merged units
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=32, num_heads=2,
                      window_size=2 * factor, fullatt_block_indexes=[0])
    config = config_cls(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(**vision, patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_llava(folder: str | Path, *, image_size: int = 16, patch_size: int = 4, seed: int = 0,
               do_pad: bool = False) -> Path:
    """Save a tiny random LLaVA-1.5 style model (tiny CLIP vision + tiny Llama) with its processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    folder = Path(folder)
    tok = tiny_tokenizer(["<pad>", "<s>", "</s>", "<image>"], pad="<pad>", eos="</s>", bos="<s>")
    ip = LlavaImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                             do_pad=do_pad)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAVA_CHAT_TEMPLATE,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    ids = tok.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"), eos_token_id=ids("</s>")),
        image_token_id=ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
