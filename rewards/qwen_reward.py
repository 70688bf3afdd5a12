"""Qwen2-VL reward-head models (HPSv3, VideoReward): a Qwen2-VL backbone read at special tokens.

Both reward models are a Qwen2-VL whose last hidden state, at the positions of special tokens
placed in the prompt (``<|Reward|>`` for HPSv3; ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` for VideoReward), goes through a small head (``rm_head``).  Their trainers run
the language model on ``inputs_embeds`` with no ``position_ids``; in the transformers versions the
checkpoints were trained with, that gives plain sequential rotary positions ``0, 1, 2, ...`` to
every token (images included) instead of Qwen2-VL's multimodal (M-RoPE) positions, so the
checkpoints expect them.  :class:`QwenRewardModel` does the same: positions are
``cumsum(attention_mask) - 1``, which equals the reference's ``arange`` on its right-padded rows
and stays correct on left-padded ones.

Pixels are built from ``[0, 1]`` tensors with torch ops (``visalign.rewards.vlm_backend``), so the
scores are differentiable with respect to the pixels; the text side (chat template, image / video
token expansion) is the processor's own.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vlm_backend import _interp_mode, _smart_resize, qwen2vl_pixels

__all__ = ["QwenRewardModel", "sequential_positions", "qwen2vl_video_pixels", "image_pixels", "bounded_image_processor",
           "encode_chats", "pool_at_tokens"]


def sequential_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` rotary positions ``0, 1, 2, ...`` over each row's real tokens (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class QwenRewardModel(nn.Module):
    """A Qwen2-VL backbone (vision tower + language model, no LM head) and a reward head.

    Args:
        config: a ``Qwen2VLConfig``.
        head (`nn.Module`): maps hidden states ``(..., D)`` to reward outputs ``(..., N)``; run in float32.
    """

    def __init__(self, config: Any, head: nn.Module) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = head

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision: Any) -> torch.Tensor:
        """``(B, L, D)`` last hidden states, with sequential positions (module docstring)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=sequential_positions(attention_mask), use_cache=False, **vision)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: Sequence[int],
                **vision: Any) -> torch.Tensor:
        """``(B, len(token_ids), N)`` float32 head outputs at each row's special tokens, in the order
        of ``token_ids``."""
        hidden = self.hidden_states(input_ids, attention_mask, **vision)
        pooled = pool_at_tokens(hidden, input_ids, token_ids)  # (B, K, D)
        head_dtype = next(self.rm_head.parameters()).dtype
        return self.rm_head(pooled.to(head_dtype)).float()


def pool_at_tokens(hidden: torch.Tensor, input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``(B, K, D)``: the hidden state at the (single) occurrence of each of the ``K`` tokens in every row."""
    rows = []
    for tid in token_ids:
        hits = input_ids == tid
        count = hits.sum(-1)
        if not bool((count == 1).all()):
            raise ValueError(f"reward token id {tid} occurs {count.tolist()} times per row; each prompt must hold it "
                             "exactly once (a prompt containing the special token's text?)")
        rows.append(hidden[hits])  # (B, D), rows in batch order
    return torch.stack(rows, dim=1)


def bounded_image_processor(image_processor: Any, min_pixels: int, max_pixels: int) -> Any:
    """A copy of a ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` resizing into ``[min_pixels, max_pixels]``."""
    ip = copy.copy(image_processor)
    ip.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    ip.min_pixels, ip.max_pixels = int(min_pixels), int(max_pixels)
    return ip


def qwen2vl_video_pixels(frames: torch.Tensor, video_processor: Any, min_pixels: int,
                         max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[0, 1]`` videos ``(B, T, 3, H, W)`` -> Qwen2-VL ``(pixel_values_videos, video_grid_thw)``,
    differentiably.

    Each frame is resized to the ``smart_resize`` size within ``[min_pixels, max_pixels]``
    (antialiased, the processor's interpolation), normalised with the processor's mean / std, the
    last frame is repeated up to a multiple of ``temporal_patch_size``, and the clip is cut into the
    processor's patches: rows ``(grid_t, gh/m, gw/m, m, m)``, columns ``(C, temporal, p, p)``.
    """
    vp = video_processor
    p, m, tps = int(vp.patch_size), int(vp.merge_size), int(vp.temporal_patch_size)
    b, t, c, h, w = frames.shape
    rh, rw = _smart_resize(h, w, p * m, min_pixels, max_pixels)
    x = frames.float().reshape(b * t, c, h, w)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode=_interp_mode(vp.resample), align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)  # the reference resizes uint8 frames, which clamps the bicubic overshoot
    mean = torch.tensor(vp.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(vp.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).reshape(b, t, c, rh, rw)
    if pad := -t % tps:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        t += pad
    gt, gh, gw = t // tps, rh // p, rw // p
    x = x.reshape(b, gt, tps, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = x.reshape(b * gt * gh * gw, c * tps * p * p)
    grid = torch.tensor([[gt, gh, gw]] * b, dtype=torch.long, device=frames.device)
    return pixel_values, grid


def image_pixels(images: torch.Tensor, image_processor: Any, min_pixels: int,
                 max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[0, 1]`` images ``(B, 3, H, W)`` -> ``(pixel_values, image_grid_thw)`` resized into
    ``[min_pixels, max_pixels]`` (:func:`visalign.rewards.vlm_backend.qwen2vl_pixels`)."""
    return qwen2vl_pixels(images, bounded_image_processor(image_processor, min_pixels, max_pixels))


def encode_chats(processor: Any, texts: Sequence[str], *, image_size: tuple[int, int] | None = None,
                 video_shape: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """Token ids and attention mask of chat texts whose images (or videos) have already been resized
    to ``image_size`` (``video_shape`` = frames, height, width): the processor expands the image /
    video tokens from placeholder inputs of that size, with its own resizing turned off."""
    kwargs: dict[str, Any] = {}
    n = len(texts)
    if image_size is not None:
        kwargs["images"] = [torch.zeros(3, *image_size, dtype=torch.uint8)] * n
        kwargs["images_kwargs"] = {"do_resize": False}
    if video_shape is not None:
        frames, h, w = video_shape
        kwargs["videos"] = [torch.zeros(frames, 3, h, w, dtype=torch.uint8)] * n
        kwargs["videos_kwargs"] = {"do_resize": False, "do_sample_frames": False, "cap_pixels_per_frame": False}
    enc = processor(text=list(texts), padding=True, return_tensors="pt", **kwargs)
    return dict(enc)
