"""The toy-shapes model: a small text-conditional rectified-flow model from diffusers parts.

Layout on disk is diffusers' (``model_index.json`` with ``"_class_name": "ToyShapesPipeline"``):

- ``unet``: :class:`diffusers.UNet2DConditionModel` in pixel space, 3 channels, images in [-1, 1];
- ``text_encoder``: a tiny :class:`transformers.CLIPTextModel`, trained jointly;
- ``tokenizer``: a :class:`transformers.PreTrainedTokenizerFast` over a word-level vocabulary of
  the prompt grammar (``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` + the words), padded to
  :data:`MAX_LENGTH` tokens;
- ``scheduler``: :class:`diffusers.FlowMatchEulerDiscreteScheduler` (1000 train steps, shift 1).

Convention (rectified flow, Liu et al. 2022; SD3, Esser et al. 2024): ``x_s = (1 - s) x0 + s eps``;
the unet predicts ``v = eps - x0`` from ``timestep = 1000 s`` and
``encoder_hidden_states = text_encoder(input_ids, attention_mask).last_hidden_state``.
Classifier-free guidance uses the empty prompt ``""`` as the unconditional input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .prompts import vocabulary

__all__ = [
    "MAX_LENGTH",
    "RESOLUTION",
    "ToyShapes",
    "build_tokenizer",
    "build",
    "save",
    "load",
    "encode_prompts",
]

MAX_LENGTH = 16
RESOLUTION = 32
#: the UNet works on 2x2 space-to-depth pixels: (3, 32, 32) images <-> (12, 16, 16) "latents".
#: A pixel permutation, so flow matching on it is flow matching on pixels; it makes every conv
#: run at 16x16, about 5x cheaper on a CPU than the same widths at 32x32 (docs/toy_world.md).
PATCH = 2
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PIPELINE_CLASS = "ToyShapesPipeline"

UNET_CONFIG = dict(
    sample_size=RESOLUTION // PATCH,
    in_channels=3 * PATCH * PATCH,
    out_channels=3 * PATCH * PATCH,
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=96,
    attention_head_dim=32,
    norm_num_groups=8,
    transformer_layers_per_block=1,
)
TEXT_CONFIG = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=96,
)


@dataclass
class ToyShapes:
    """The four components, as saved and loaded."""

    unet: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler: object

    def parameters(self):
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()


def build_tokenizer():
    """A word-level fast tokenizer over the grammar's words, built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )


def build(seed: int = 0) -> ToyShapes:
    """Fresh random-weight components (seeded), ready to pretrain."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)  # diffusers / transformers initialise from the global generator
    unet = UNet2DConditionModel(**UNET_CONFIG)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return ToyShapes(unet, text_encoder, tokenizer, scheduler)


def save(model: ToyShapes, out_dir: str | os.PathLike) -> Path:
    """Write the components in diffusers layout (safetensors weights) to ``out_dir``."""
    import diffusers
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "tokenizer")
    model.scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "_transformers_version": transformers.__version__,
        "resolution": RESOLUTION,
        "max_length": MAX_LENGTH,
        "pixel_shuffle": PATCH,
    }
    tmp = out / "model_index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / "model_index.json")
    return out


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> ToyShapes:
    """Load components saved by :func:`save` (strict, safetensors only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    root = Path(path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        from visalign.assets import asset_path

        raise FileNotFoundError(
            f"no toy-shapes model at {str(root)!r}: expected {index_file}. "
            "Pretrain one with `python -m visalign.toy.pretrain --out DIR`, or use the shipped one: by name, "
            f"`--model toy-shapes`, or by folder, {str(asset_path('toy-shapes'))!r}."
        )
    index = json.loads(index_file.read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{index_file} is a {index.get('_class_name')!r}, not a {PIPELINE_CLASS}")
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, **kw)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True, **kw)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    return ToyShapes(unet, text_encoder, tokenizer, scheduler)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels in [-1, 1] -> ``(B, 3 P^2, H / P, W / P)`` (space-to-depth)."""
    return torch.nn.functional.pixel_unshuffle(images, PATCH)


def from_latent(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_latent`."""
    return torch.nn.functional.pixel_shuffle(latents, PATCH)


def encode_prompts(model: ToyShapes, prompts: Sequence[str]) -> torch.Tensor:
    """``encoder_hidden_states`` ``(B, MAX_LENGTH, D)`` for a list of prompts ("" = unconditional)."""
    tok = model.tokenizer(
        list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    device = next(model.text_encoder.parameters()).device
    out = model.text_encoder(
        input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
    )
    return out.last_hidden_state
