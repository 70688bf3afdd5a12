"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation") on transformers' BLIP classes.

Architecture (the official ``ImageReward.pt``, hub ``THUDM/ImageReward``):

* image: BLIP ViT-L/16 at 224 px (``blip.visual_encoder.*``) -> ``(B, 197, 1024)`` tokens;
* text: BERT-base with cross-attention to the image tokens in every layer
  (``blip.text_encoder.*``), prompt tokenised by ``bert-base-uncased``, padded / truncated to 35;
* head: the text ``[CLS]`` state -> MLP 768-1024-128-64-16-1 with dropout between and no
  activations (``mlp.layers.{0,2,4,6,7}``, the LAION aesthetic head's layout);
* score: ``(r - 0.16717) / 1.03334`` (the training set's reward mean and std).

Preprocessing: shortest side to 224 bicubic, centre crop 224, CLIP mean / std, done with torch
ops (:mod:`visalign.rewards.preprocess`) so the score is differentiable w.r.t. the pixels.

Weights are loaded strictly through an explicit key map (official name -> module name); the
only official keys left unused are listed in :data:`UNUSED_OFFICIAL_KEYS` (BLIP's contrastive
projections, which the reward never calls, and a position-id buffer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .base import Reward, RewardInfo, RewardOutput

__all__ = ["ImageRewardModel", "ImageReward", "imagereward", "official_to_module", "module_to_official",
           "load_official_state_dict", "REWARD_MEAN", "REWARD_STD", "MAX_TOKENS", "UNUSED_OFFICIAL_KEYS"]

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
UNUSED_OFFICIAL_KEYS = re.compile(
    r"^blip\.(vision_proj|text_proj)\.(weight|bias)$"  # BLIP's contrastive projections: the reward never calls them
    r"|^blip\.text_encoder\.embeddings\.position_ids$"  # a buffer (arange), rebuilt by the model
)

# BLIP's timm-style ViT names (official, under "blip.visual_encoder.") <-> transformers BlipVisionModel
# names (under "vision."); {i} is a block index, {p} is weight / bias.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]


def _as_regex(fmt: str) -> re.Pattern:
    return re.compile(re.escape(fmt).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


_TO_MODULE = [(_as_regex(a), b) for a, b in _VISION_NAMES]
_TO_OFFICIAL = [(_as_regex(b), a) for a, b in _VISION_NAMES]


def _rename(name: str, rules: list) -> str | None:
    for pattern, template in rules:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


def official_to_module(key: str) -> str | None:
    """Official ``ImageReward.pt`` key -> :class:`ImageRewardModel` key (``None`` if it has no place)."""
    if key.startswith("blip.visual_encoder."):
        rest = _rename(key[len("blip.visual_encoder."):], _TO_MODULE)
        return None if rest is None else "vision." + rest
    if key.startswith("blip.text_encoder."):  # BLIP's med.py BERT and BlipTextModel share their names
        rest = key[len("blip.text_encoder."):]
        return None if rest.startswith("pooler.") or rest.endswith("position_ids") else "text." + rest
    if re.fullmatch(r"mlp\.layers\.[0-9]+\.(weight|bias)", key):
        return key
    return None


def module_to_official(key: str) -> str:
    """Inverse of :func:`official_to_module` (to write a checkpoint in the official layout)."""
    if key.startswith("vision."):
        rest = _rename(key[len("vision."):], _TO_OFFICIAL)
        if rest is None:
            raise KeyError(f"no official name for {key!r}")
        return "blip.visual_encoder." + rest
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    return key


class _MLP(nn.Module):
    """The ImageReward / LAION-aesthetic head: Linear layers with dropout between, no activations."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder (cross-attention) + MLP head; ``forward`` gives the raw reward."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = _MLP(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, Dv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state  # (B, T, Dt)
        return self.mlp(hidden[:, 0].float()).squeeze(-1)  # (B,) raw reward from the [CLS] state


def _configs_from_state_dict(sd: dict[str, torch.Tensor], med_config: dict | None) -> tuple[Any, Any]:
    """Architecture read off the official checkpoint's shapes (heads: 64 channels each, as in BLIP/BERT)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v = "blip.visual_encoder."
    try:
        width = sd[v + "cls_token"].shape[-1]
        patch = sd[v + "patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd[v + "pos_embed"].shape[1] - 1) ** 0.5))
        depth = len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})
        vision = BlipVisionConfig(hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
                                  num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
                                  image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        t = "blip.text_encoder."
        words = sd[t + "embeddings.word_embeddings.weight"]
        text_kwargs = dict(
            vocab_size=words.shape[0], hidden_size=words.shape[1],
            max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0],
            num_hidden_layers=len({k.split(".")[4] for k in sd if k.startswith(t + "encoder.layer.")}),
            intermediate_size=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            encoder_hidden_size=sd[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
            num_attention_heads=max(1, words.shape[1] // 64), layer_norm_eps=1e-12, hidden_act="gelu",
            # transformers builds the cross-attention blocks only for decoders; forward runs it bidirectionally
            is_decoder=True,
        )
    except KeyError as err:
        raise ValueError(f"not an ImageReward checkpoint: key {err} is missing (expected the official "
                         "'blip.visual_encoder.*', 'blip.text_encoder.*', 'mlp.layers.*' names)") from None
    if med_config:
        text_kwargs["num_attention_heads"] = med_config.get("num_attention_heads", text_kwargs["num_attention_heads"])
        text_kwargs["layer_norm_eps"] = med_config.get("layer_norm_eps", text_kwargs["layer_norm_eps"])
    return vision, BlipTextConfig(**text_kwargs)


def load_official_state_dict(model: ImageRewardModel, sd: dict[str, torch.Tensor]) -> None:
    """Load an official-layout state dict strictly: every official key is placed (or listed in
    :data:`UNUSED_OFFICIAL_KEYS`) and every module key is filled, else a ``ValueError`` lists them."""
    mapped: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in sd.items():
        target = official_to_module(key)
        if target is None:
            if not UNUSED_OFFICIAL_KEYS.match(key):
                unmapped.append(key)
            continue
        mapped[target] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    bad_shape = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(mapped))
                 if mapped[k].shape != own[k].shape]
    if unmapped or missing or unexpected or bad_shape:
        raise ValueError(
            "ImageReward checkpoint does not match the model: "
            f"official keys with no place: {unmapped or 'none'}; model keys missing from the checkpoint: "
            f"{missing or 'none'}; mapped keys the model lacks: {unexpected or 'none'}; shape mismatches: "
            f"{bad_shape or 'none'}. Use the official ImageReward.pt (hub THUDM/ImageReward)."
        )
    model.load_state_dict(mapped, strict=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _resolve(checkpoint: str, filename: str) -> Path:
    path = Path(checkpoint)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (filename, Path(filename).with_suffix(".safetensors").name):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"ImageReward: no {filename} in folder {checkpoint!r}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(checkpoint, filename))
    except (OSError, ValueError) as err:  # offline (LocalEntryNotFoundError), bad repo id (HFValidationError)
        raise FileNotFoundError(
            f"ImageReward checkpoint {checkpoint!r} is neither a local file/folder nor downloadable ({err}). "
            f"Download {filename} from the hub repo THUDM/ImageReward and pass checkpoint=/path/to/{filename}."
        ) from err


class ImageReward(Reward):
    """ImageReward score of (image, prompt) pairs; differentiable.

    Args:
        model (`ImageRewardModel`): loaded weights.
        tokenizer: a BERT tokenizer (``bert-base-uncased`` for the official weights).
        batch_size (`int`, *optional*): images per forward pass.
    """

    def __init__(self, model: ImageRewardModel, tokenizer: Any, *, batch_size: int | None = None,
                 weights: str = "THUDM/ImageReward") -> None:
        from .preprocess import PreprocessSpec

        self.model, self.tokenizer, self.batch_size = model.eval().requires_grad_(False), tokenizer, batch_size
        self.spec = PreprocessSpec(size=model.image_size, resize="shortest_crop", interpolation="bicubic")
        self.info = RewardInfo(name="imagereward", version="1.0", licence="Apache-2.0", modality="image",
                               inputs=("images", "prompts"), native_range=(-2.5, 2.0), differentiable=True,
                               weights=weights, description="ImageReward (Xu et al. 2023)")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        from .preprocess import preprocess

        if images.ndim == 5:
            raise ValueError(f"reward 'imagereward' scores images; got video {tuple(images.shape)}: pass frames")
        param = next(self.model.parameters())
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        step = self.batch_size or images.shape[0]
        raw = []
        for s in range(0, images.shape[0], step):
            pixels = preprocess(images[s : s + step].to(param.device), self.spec).to(param.dtype)  # (b, 3, S, S)
            raw.append(self.model(pixels, tokens["input_ids"][s : s + step].to(param.device),
                                  tokens["attention_mask"][s : s + step].to(param.device)))
        raw = torch.cat(raw).float()
        return RewardOutput(scores=(raw - REWARD_MEAN) / REWARD_STD, components={"raw": raw})


def imagereward(checkpoint: str = "THUDM/ImageReward", *, filename: str = "ImageReward.pt",
                tokenizer: str | Any = "google-bert/bert-base-uncased", dtype: Any = None, device: Any = None,
                batch_size: int | None = None) -> ImageReward:
    """Registry factory for ``imagereward``.

    Args:
        checkpoint (`str`, *optional*): hub repo holding ``filename``, a folder, or the file itself
            (``.pt`` read with ``weights_only=True``, or ``.safetensors``).  A ``med_config.json``
            beside it sets the text encoder's heads / epsilon; otherwise they follow the shapes.
        tokenizer (`str` or tokenizer, *optional*): BERT tokenizer (hub id, folder or object).
        dtype, device (*optional*): where the model runs (float32 on CPU by default).
    """
    from transformers import AutoTokenizer

    path = _resolve(checkpoint, filename)
    sd = _read_checkpoint(path)
    med_path = path.parent / "med_config.json"
    med = json.loads(med_path.read_text()) if med_path.is_file() else None
    vision_config, text_config = _configs_from_state_dict(sd, med)
    model = ImageRewardModel(vision_config, text_config)
    load_official_state_dict(model, sd)
    if isinstance(tokenizer, str):
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except OSError as err:
            raise OSError(f"ImageReward: could not load the BERT tokenizer {tokenizer!r} ({err}); pass "
                          "tokenizer=<folder with bert-base-uncased's vocab.txt>") from err
    if tokenizer.cls_token_id is None or len(tokenizer) < 10:
        raise ValueError(f"ImageReward: tokenizer {type(tokenizer).__name__} with {len(tokenizer)} tokens is not a "
                         "BERT tokenizer (a broken offline load?); pass bert-base-uncased's")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model.to(device=device, dtype=dtype)
    return ImageReward(model, tokenizer, batch_size=batch_size, weights=str(checkpoint))
