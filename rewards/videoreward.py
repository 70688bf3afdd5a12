"""VideoReward / VideoAlign (Liu et al. 2025, "Improving Video Generation with Human Feedback").

A Qwen2-VL-2B-Instruct with LoRA adapters and a linear reward head, trained on pairs of generated
videos with a Bradley-Terry-with-ties loss, separately on three dimensions: visual quality (VQ),
motion quality (MQ) and text alignment (TA).  Architecture of the released ``KlingTeam/VideoReward``
checkpoint (``model_config.json`` and ``checkpoint-11352/model.pth``):

* the tokenizer of ``Qwen/Qwen2-VL-2B-Instruct`` plus three special tokens ``<|VQ_reward|>``,
  ``<|MQ_reward|>``, ``<|TA_reward|>``, the embeddings grown by three rows;
* prompt: the video, then :data:`PROMPT` (the "detailed_special" template: one section per
  dimension, each ending with its special token) in the chat template's user turn;
* the last hidden state at each special token -> ``rm_head`` = Linear(D, 1, bias=False) -> one
  raw score per dimension;
* normalisation (``use_norm``, default on, as in the official inferencer): each score minus the
  mean and divided by the std of ``model_config.json``'s ``inference_config`` (for the release:
  VQ 3.6757 / 2.2476, MQ 1.1646 / 1.3811, TA 2.8105 / 2.5121); ``Overall = VQ + MQ + TA`` (after
  normalisation) is the score;
* video input: frames sampled uniformly at ``fps`` frames per second of video (2.0 in the
  release; ``nframes = total / video_fps * fps`` clamped to [4, 768] and rounded to an even
  number, indices ``linspace(0, total - 1, nframes).round()``), each frame resized to multiples of
  28 with an area within ``[128 * 28 * 28, max_frame_pixels]`` (200704 in the release);
* rotary positions: sequential (see :mod:`visalign.rewards.qwen_reward`).

The checkpoint is the state dict of the PEFT model, saved with ``torch.save``: keys
``base_model.model.`` + the flat (pre-4.52 transformers) layout, LoRA-wrapped layers as
``<layer>.base_layer.weight`` + ``<layer>.lora_A.default.weight`` / ``lora_B``.  It is read with
``torch.load(weights_only=True)`` (it is released as ``.pth``; no arbitrary unpickling), the
adapters are folded into the weights (``W + lora_alpha / lora_r * B @ A``, as PEFT computes them),
and the result is loaded strictly; the LoRA layers must be exactly the language model's Linear
layers named by ``model_config.json``.  ``lm_head.weight`` is the only key left unused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .anchor_loading import (
    CheckpointMismatchError,
    build_empty,
    load_strict_assign,
    merge_lora,
    qwen2vl_key,
    read_tensors,
    rename_state_dict,
    resolve_file,
    resolve_folder,
)
from .base import Reward, RewardInfo, RewardOutput
from .loading import resolve_dtype
from .qwen_reward import QwenRewardModel, encode_chats, qwen2vl_video_pixels

__all__ = ["VideoReward", "videoreward", "videoreward_prompt", "sample_frame_indices", "load_videoreward_model",
           "PROMPT", "DIMENSIONS", "SPECIAL_TOKENS"]

CHECKPOINT = "KlingTeam/VideoReward"
FILENAME = "checkpoint-11352/model.pth"
BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
LICENCE = "MIT AND Apache-2.0"  # VideoAlign (MIT) fine-tuned from Qwen2-VL-2B-Instruct (Apache-2.0)
DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR, MIN_FRAMES, MAX_FRAMES = 2, 4, 768
UNUSED_KEYS = re.compile(r"lm_head\.weight")
PEFT_PREFIX = "base_model.model."

PROMPT = (
    "\nYou are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being "
    "the worst and 10 being the best. Each evaluation should be independent of the others.\n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions "
    "should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.\n\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.\n\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
)


def videoreward_prompt(prompt: str) -> str:
    """The text VideoReward reads with the video (the release's "detailed_special" template)."""
    return PROMPT.format(text_prompt=prompt)


def _round_to(x: float, k: int) -> int:
    return int(round(x / k) * k)


def sample_frame_indices(total: int, video_fps: float | None, fps: float | None = 2.0,
                         num_frames: int | None = None) -> torch.Tensor:
    """The frames VideoReward reads out of ``total``: ``num_frames`` (rounded to an even number) or
    ``total / video_fps * fps`` clamped to ``[4, min(768, total)]`` and rounded to an even number,
    at most ``total``; indices ``linspace(0, total - 1, n).round()`` (the official uniform sampling)."""
    if num_frames is not None:
        n = _round_to(num_frames, FRAME_FACTOR)
    else:
        if video_fps is None or fps is None:
            raise ValueError("videoreward: give video_fps (the frame rate of the videos) to sample at fps, or "
                             "num_frames")
        lo = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = _round_to(min(max(total / float(video_fps) * float(fps), lo), hi), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"videoreward: a video of {total} frames gives {n} frames to read; it needs at least "
                         f"{FRAME_FACTOR}")
    return torch.linspace(0, total - 1, n).round().long()


def _read_config(folder_or_file: Path) -> dict:
    path = folder_or_file if folder_or_file.is_file() else folder_or_file / "model_config.json"
    cfg = json.loads(path.read_text())
    for section in ("data_config", "model_config", "peft_lora_config"):
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"VideoReward: {str(path)!r} has no {section!r} section; pass the release's model_config.json")
    peft = cfg["peft_lora_config"]
    expected = {("data_config", "prompt_template_type"): "detailed_special", ("data_config", "sample_type"): "uniform",
                ("data_config", "eval_dim"): list(DIMENSIONS), ("model_config", "reward_token"): "special",
                ("model_config", "output_dim"): 1, ("model_config", "use_special_tokens"): True}
    for (section, key), want in expected.items():
        got = cfg[section].get(key)
        if got != want:
            raise ValueError(f"VideoReward: {str(path)!r} sets {section}.{key}={got!r}; this loader reads the released "
                             f"configuration ({key}={want!r})")
    if peft.get("lora_enable") and (peft.get("vision_lora") or peft.get("use_rslora")):
        raise ValueError(f"VideoReward: {str(path)!r} asks for vision LoRA or rsLoRA; the release uses neither")
    return cfg


def _model_config(checkpoint: str | Path) -> tuple[dict, Path]:
    path = Path(checkpoint)
    if path.is_dir():
        return _read_config(path), path
    if path.is_file():
        return _read_config(path), path.parent
    cfg_path = resolve_file(checkpoint, "model_config.json", "VideoReward")
    return _read_config(cfg_path), cfg_path.parent


def _latest_step_file(folder: Path) -> Path:
    """``checkpoint-<N>/model.pth`` with the largest N in ``folder`` (the official loader's choice)."""
    steps = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    if not steps:
        raise FileNotFoundError(f"VideoReward: no checkpoint-<step> folder in {str(folder)!r}")
    return steps[-1][1] / "model.pth"


def load_videoreward_model(checkpoint: str | Path, *, base: str | Path | None = None, filename: str | None = None,
                           dtype: Any = None) -> tuple[QwenRewardModel, Any, list[int], dict]:
    """``(model, processor, special token ids, model_config.json)`` (strict; module docstring).

    ``checkpoint``: a hub repo (``KlingTeam/VideoReward``) or the folder holding ``model_config.json``
    and ``checkpoint-<step>/model.pth``; ``filename``: the ``.pth`` inside it (default: the hub
    release's, or the latest step of a local folder); ``base``: the base model (default: the
    configuration's ``model_name_or_path``)."""
    from transformers import AutoConfig, AutoProcessor

    what = "VideoReward"
    cfg, root = _model_config(checkpoint)
    if filename is None:
        path = _latest_step_file(root) if Path(checkpoint).exists() else resolve_file(checkpoint, FILENAME, what)
    else:
        path = resolve_file(root if Path(checkpoint).exists() else checkpoint, filename, what)
    base = resolve_folder(base or cfg["model_config"].get("model_name_or_path") or BASE_MODEL, f"{what} base model",
                          ("config.json", "preprocessor_config.json"))
    config = AutoConfig.from_pretrained(base)
    if config.model_type != "qwen2_vl":
        raise ValueError(f"{what}: base model {base!r} is a {config.model_type!r}; VideoReward is built on Qwen2-VL")
    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.padding_side = "right"
    token_ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))

    state = read_tensors(path, what)
    peft = cfg["peft_lora_config"]
    bad = [k for k in state if not k.startswith(PEFT_PREFIX)] if peft.get("lora_enable") else []
    if bad:
        raise CheckpointMismatchError(f"{what}: checkpoint {str(path)!r} has keys outside the PEFT model "
                                      f"({PEFT_PREFIX}...): {bad[:6]}")
    if peft.get("lora_enable"):
        state = {k[len(PEFT_PREFIX):]: v for k, v in state.items()}
        state, lora_layers = merge_lora(state, float(peft["lora_alpha"]) / float(peft["lora_r"]), what, path)
    else:
        lora_layers = []
    state = rename_state_dict(state, qwen2vl_key, UNUSED_KEYS, what, path)
    try:
        vocab = state["backbone.language_model.embed_tokens.weight"].shape[0]
        head_shape = tuple(state["rm_head.weight"].shape)
    except KeyError as err:
        raise CheckpointMismatchError(f"{what}: checkpoint {str(path)!r} does not match the model. Missing keys: "
                                      f"[{err.args[0]}]") from None
    if max(token_ids) >= vocab:
        raise CheckpointMismatchError(f"{what}: the special tokens get ids {token_ids} but the checkpoint has {vocab} "
                                      "embeddings; use the base model the checkpoint was trained from")
    config.text_config.vocab_size = vocab
    model = build_empty(lambda: QwenRewardModel(config, nn.Linear(head_shape[1], head_shape[0], bias=False)))
    if peft.get("lora_enable"):  # the adapters must sit on exactly the layers the configuration names
        excluded = list(peft.get("lora_namespan_exclude") or [])
        expected = sorted(f"model.{name}" for name, m in model.backbone.language_model.named_modules()
                          if isinstance(m, (nn.Linear, nn.Embedding)) and not any(e in f"model.{name}" for e in excluded))
        if lora_layers != expected:
            missing, extra = sorted(set(expected) - set(lora_layers)), sorted(set(lora_layers) - set(expected))
            raise CheckpointMismatchError(f"{what}: checkpoint {str(path)!r} has LoRA adapters on other layers than "
                                          f"the configuration's: missing {missing[:6]}, unexpected {extra[:6]}")
    load_strict_assign(model, state, what, path)
    if dtype is not None:
        model.backbone.to(resolve_dtype(dtype))
    model.rm_head.float()
    return model.eval().requires_grad_(False), processor, token_ids, cfg


class VideoReward(Reward):
    """VideoReward scores of (video, prompt) pairs; differentiable.

    ``scores`` = ``VQ + MQ + TA`` (normalised when ``use_norm``); ``components``: ``VQ``, ``MQ``,
    ``TA`` (as the scores) and ``raw_VQ``, ``raw_MQ``, ``raw_TA`` (before normalisation).

    Args:
        model, processor, token_ids, config: from :func:`load_videoreward_model`.
        video_fps (`float`, *optional*): frame rate of the videos given (for sampling at ``fps``).
        fps (`float`, *optional*): frames read per second of video; the configuration's by default.
        num_frames (`int`, *optional*): read this many frames instead (overrides ``fps``).
        use_norm (`bool`, *optional*, defaults to `True`): normalise with the configuration's statistics.
        batch_size (`int`, *optional*): videos per forward pass.
    """

    def __init__(self, model: QwenRewardModel, processor: Any, token_ids: Sequence[int], config: dict, *,
                 video_fps: float | None = 24.0, fps: float | None = None, num_frames: int | None = None,
                 use_norm: bool = True, min_frame_pixels: int = VIDEO_MIN_PIXELS, max_frame_pixels: int | None = None,
                 batch_size: int | None = None, weights: str = f"{CHECKPOINT} ({FILENAME})") -> None:
        data = config["data_config"]
        self.model, self.processor, self.token_ids = model, processor, list(token_ids)
        self.video_fps = video_fps
        self.num_frames = num_frames if num_frames is not None else (None if fps is not None else data.get("num_frames"))
        self.fps = fps if fps is not None else data.get("fps")
        self.min_pixels = int(min_frame_pixels)
        self.max_pixels = int(max_frame_pixels or data.get("max_frame_pixels") or 200704)
        self.norm = config.get("inference_config") if use_norm else None
        self.batch_size = batch_size
        self.info = RewardInfo(name="videoreward", version="1", licence=LICENCE, modality="video",
                               inputs=("images", "prompts"), native_range=(-6.0, 6.0), differentiable=True,
                               weights=weights, description="VideoReward / VideoAlign (Liu et al. 2025): VQ + MQ + TA")

    def chat_texts(self, prompts: Sequence[str]) -> list[str]:
        texts = []
        for p in prompts:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": videoreward_prompt(p)}]}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return texts

    def frames(self, videos: torch.Tensor) -> torch.Tensor:
        """The frames read out of ``(B, F, 3, H, W)`` videos (:func:`sample_frame_indices`)."""
        idx = sample_frame_indices(videos.shape[1], self.video_fps, self.fps, self.num_frames)
        return videos.index_select(1, idx.to(videos.device))

    def raw(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 3)`` float32 raw VQ, MQ, TA."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.backbone.parameters()).dtype
        vp = self.processor.video_processor
        frames = self.frames(videos.to(device))
        pixel_values, grid = qwen2vl_video_pixels(frames, vp, self.min_pixels, self.max_pixels)
        p, tps = int(vp.patch_size), int(vp.temporal_patch_size)
        shape = (int(grid[0, 0]) * tps, int(grid[0, 1]) * p, int(grid[0, 2]) * p)
        enc = encode_chats(self.processor, self.chat_texts(prompts), video_shape=shape)
        if not torch.equal(enc["video_grid_thw"], grid.cpu()):
            raise RuntimeError(f"internal: video grid {grid[0].tolist()} differs from the processor's "
                               f"{enc['video_grid_thw'][0].tolist()}")
        out = self.model(enc["input_ids"].to(device), enc["attention_mask"].to(device), self.token_ids,
                         pixel_values_videos=pixel_values.to(dtype), video_grid_thw=grid)
        return out[..., 0]  # (B, 3)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        if images.ndim != 5:
            raise ValueError(f"reward 'videoreward' takes videos (B, F, 3, H, W); got {tuple(images.shape)}")
        step = self.batch_size or images.shape[0]
        raw = torch.cat([self.raw(images[s : s + step], list(prompts[s : s + step]))
                         for s in range(0, images.shape[0], step)])
        components: dict[str, torch.Tensor] = {}
        for i, dim in enumerate(DIMENSIONS):
            value = raw[:, i]
            if self.norm is not None:
                value = (value - float(self.norm[f"{dim}_mean"])) / float(self.norm[f"{dim}_std"])
            components[dim] = value
        components.update({f"raw_{dim}": raw[:, i] for i, dim in enumerate(DIMENSIONS)})
        overall = components["VQ"] + components["MQ"] + components["TA"]
        return RewardOutput(scores=overall, components=components)


def videoreward(checkpoint: str = CHECKPOINT, *, base: str | None = None, filename: str | None = None,
                dtype: Any = None, device: Any = None, video_fps: float | None = 24.0, fps: float | None = None,
                num_frames: int | None = None, use_norm: bool = True, max_frame_pixels: int | None = None,
                min_frame_pixels: int = VIDEO_MIN_PIXELS, batch_size: int | None = None) -> VideoReward:
    """Registry factory for ``videoreward`` (``"videoreward:video_fps=16,dtype=bfloat16,device=cuda"``).

    Args:
        checkpoint (`str`, *optional*): hub repo (``KlingTeam/VideoReward``) or a folder with
            ``model_config.json`` and ``checkpoint-<step>/model.pth``.
        base (`str`, *optional*): base model (config, processor, chat template; weights not read);
            the configuration's ``model_name_or_path`` (``Qwen/Qwen2-VL-2B-Instruct``) by default.
        video_fps (`float`, *optional*, defaults to 24): frame rate of the videos you score; with
            the configuration's ``fps`` (2.0) it sets how many frames are read.
        fps, num_frames (*optional*): override the sampling (``num_frames`` wins).
        use_norm (`bool`, *optional*, defaults to `True`): the official normalisation.
        max_frame_pixels, min_frame_pixels (*optional*): frame area bounds (200704 / 100352).
        dtype, device (*optional*): where the backbone runs (the head stays float32).
    """
    model, processor, token_ids, cfg = load_videoreward_model(checkpoint, base=base, filename=filename, dtype=dtype)
    if device is not None:
        model.to(device)
    return VideoReward(model, processor, token_ids, cfg, video_fps=video_fps, fps=fps, num_frames=num_frames,
                       use_norm=use_norm, min_frame_pixels=min_frame_pixels, max_frame_pixels=max_frame_pixels,
                       batch_size=batch_size, weights=str(checkpoint))
