"""A loaded chat VLM with a differentiable pixel path, shared by the VLM rewards.

The VLM rewards (:mod:`visalign.rewards.vlm`, :mod:`visalign.rewards.vlm_artifact`) ask a chat
VLM one question per image and read the next-token distribution at the answer position
(teacher-forced, right after the chat template's generation prompt), or let it generate.

Why the pixel path is ours and not the processor's: a Hugging Face image processor works on
``uint8`` pictures (it rescales by 1/255 unless ``do_rescale=False``) and leaves the autograd
graph.  Here ``pixel_values`` are built from the ``[0, 1]`` float tensor with torch ops, so the
score is differentiable with respect to the pixels:

* Qwen2-VL / Qwen2.5-VL (``Qwen2VLImageProcessor``): ``smart_resize`` to a multiple of
  ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``, bicubic resize, CLIP
  normalisation, then the processor's patch flattening: the ``(B, C, H, W)`` image becomes
  ``(B * grid_h * grid_w, C * temporal_patch_size * patch * patch)`` rows in merge-window order,
  the frame repeated ``temporal_patch_size`` times; ``image_grid_thw = (1, grid_h, grid_w)``.
* LLaVA-1.5 (``CLIPImageProcessor`` / ``LlavaImageProcessor``): optional pad-to-square with the
  mean colour, shortest side to ``size``, centre crop, CLIP normalisation
  (:func:`visalign.rewards.preprocess.preprocess`).

The text side (chat template, image-token expansion, left padding) is the processor's own: it is
given placeholder images of the same size, so the number of image tokens always agrees.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["VLMBackend", "load_backend", "qwen2vl_pixels", "clip_style_pixels"]

_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes the processors store


def _interp_mode(resample: Any) -> str:
    code = int(getattr(resample, "value", resample)) if resample is not None else 3
    if code not in _INTERPOLATION:
        raise ValueError(f"image processor resample={resample!r} has no torch equivalent; use bicubic or bilinear")
    return _INTERPOLATION[code]


def _smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible (same rule as the processor's ``smart_resize``)."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"Qwen2-VL takes aspect ratios below 200; got an image of {h}x{w}")
    h_bar, w_bar = round(h / factor) * factor, round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def qwen2vl_pixels(images: torch.Tensor, image_processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[0, 1]`` images -> Qwen2-VL ``(pixel_values, image_grid_thw)``, differentiably.

    Args:
        images (`torch.Tensor`): ``(B, 3, H, W)`` floats in ``[0, 1]``.
        image_processor: a ``Qwen2VLImageProcessor`` (read for sizes, patching and mean/std).

    Returns:
        ``pixel_values`` ``(B * gh * gw, 3 * T * p * p)`` float32 and ``image_grid_thw`` ``(B, 3)`` long.
    """
    ip = image_processor
    p, m, tps = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    size = ip.size if isinstance(ip.size, dict) else vars(ip.size)
    min_pixels = int(size.get("shortest_edge") or getattr(ip, "min_pixels", 56 * 56))
    max_pixels = int(size.get("longest_edge") or getattr(ip, "max_pixels", 28 * 28 * 1280))
    b, c, h, w = images.shape
    x = images.float()
    if getattr(ip, "do_resize", True):
        rh, rw = _smart_resize(h, w, p * m, min_pixels, max_pixels)
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode=_interp_mode(ip.resample), align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # the processor resizes uint8, which clamps the bicubic overshoot
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    # (B, C, gh/m, m, p, gw/m, m, p) -> (B, gh/m, gw/m, m, m, C, p, p): merge windows are contiguous rows
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    # a still image is a clip of `temporal_patch_size` identical frames: (..., C, T, p, p)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tps, -1, -1)
    pixel_values = x.reshape(b * gh * gw, c * tps * p * p)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)
    return pixel_values, grid


def _pad_to_square(x: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """LLaVA's ``pad_to_square``: centre the image on a square canvas of the mean colour."""
    h, w = x.shape[-2:]
    if h == w:
        return x
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    canvas = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    canvas = canvas.expand(x.shape[0], 3, side, side)
    # padding by concatenation keeps the graph to the original pixels
    mask = torch.zeros(1, 1, side, side, dtype=x.dtype, device=x.device)
    mask[..., top : top + h, left : left + w] = 1.0
    placed = F.pad(x, (left, side - w - left, top, side - h - top))
    return placed * mask + canvas * (1.0 - mask)


def clip_style_pixels(images: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """``[0, 1]`` images -> ``(B, 3, S, S)`` for a CLIP-style processor (LLaVA-1.5), differentiably."""
    from .preprocess import PreprocessSpec, preprocess

    ip = image_processor
    size = ip.size if isinstance(ip.size, dict) else {k: v for k, v in vars(ip.size).items() if v is not None}
    crop = ip.crop_size if isinstance(ip.crop_size, dict) else vars(ip.crop_size)
    x = images.float()
    if getattr(ip, "do_pad", False):
        # the processor pads uint8 with int(mean * 255)
        x = _pad_to_square(x, [int(v * 255) / 255.0 for v in ip.image_mean])
    if size.get("shortest_edge"):
        short, side = int(size["shortest_edge"]), int(crop["height"])
        if not getattr(ip, "do_center_crop", True) or int(crop["width"]) != side:
            raise ValueError(
                f"image processor {type(ip).__name__} with size={size} crop_size={crop}: only square centre "
                "crops are supported on the differentiable path"
            )
        spec = PreprocessSpec(size=side, resize="shortest_crop", resize_to=short, crop_offset="floor",
                              mean=tuple(ip.image_mean), std=tuple(ip.image_std),
                              interpolation=_interp_mode(ip.resample))
    elif size.get("height") and size["height"] == size.get("width"):
        spec = PreprocessSpec(size=int(size["height"]), resize="squash", mean=tuple(ip.image_mean),
                              std=tuple(ip.image_std), interpolation=_interp_mode(ip.resample))
    else:
        raise ValueError(f"image processor {type(ip).__name__} size={size} is not supported on the differentiable path")
    return preprocess(x, spec)


@dataclass
class VLMBackend:
    """A chat VLM and its processor, with batched teacher-forced scoring and generation.

    Build with :func:`load_backend` (hub id or local path) or directly from a model and processor.
    """

    model: Any
    processor: Any

    def __post_init__(self) -> None:
        ip = self.processor.image_processor
        if hasattr(ip, "merge_size") and hasattr(ip, "temporal_patch_size"):
            self.family = "qwen2vl"
        elif hasattr(ip, "image_grid_pinpoints"):
            raise ValueError(
                f"{type(ip).__name__} (LLaVA-NeXT 'anyres' tiling) has no differentiable pixel path yet; "
                "use a Qwen2-VL / Qwen2.5-VL or LLaVA-1.5 model"
            )
        elif hasattr(ip, "crop_size"):
            self.family = "clip"
        else:
            raise ValueError(
                f"no differentiable pixel path for image processor {type(ip).__name__}; supported: "
                "Qwen2VLImageProcessor (Qwen2-VL, Qwen2.5-VL) and CLIP-style processors (LLaVA-1.5)"
            )
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the VLM's processor has no chat_template; pass a chat model "
                             "(an *-Instruct / *-hf checkpoint)")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the answer position is the last one in every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._word_ids: dict[str, list[int]] = {}

    @property
    def name(self) -> str:
        """Where the weights came from (hub id or folder)."""
        return str(getattr(self.model, "name_or_path", "") or "in-memory")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- tokens ---------------------------------------------------------------------------------
    def word_ids(self, word: str) -> list[int]:
        """Vocabulary ids whose token is ``word`` with or without a leading-space marker
        (``"Yes"``, ``"ĠYes"``, ``"▁Yes"``): the ways an answer's first token can be spelt."""
        if word not in self._word_ids:
            ids = sorted({i for tok, i in self.tokenizer.get_vocab().items() if tok.lstrip("Ġ▁ ") == word and tok})
            if not ids:
                raise ValueError(f"the VLM's tokenizer has no single token for {word!r}; pick answer words it has")
            self._word_ids[word] = ids
        return self._word_ids[word]

    # -- inputs ---------------------------------------------------------------------------------
    def pixels(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs from ``[0, 1]`` images, differentiably."""
        ip = self.processor.image_processor
        if self.family == "qwen2vl":
            pixel_values, grid = qwen2vl_pixels(images, ip)
            return {"pixel_values": pixel_values.to(self.dtype), "image_grid_thw": grid}
        return {"pixel_values": clip_style_pixels(images, ip).to(self.dtype)}

    def chat_texts(self, questions: Sequence[str]) -> list[str]:
        texts = []
        for q in questions:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return texts

    def inputs(self, images: torch.Tensor, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for one question per image; left-padded, pixels differentiable."""
        images = images.to(self.device)
        b, _, h, w = images.shape
        # placeholder images of the same size give the processor's own image-token expansion
        blank = [torch.zeros(3, h, w, dtype=torch.uint8)] * b
        enc = self.processor(text=self.chat_texts(questions), images=blank, padding=True, return_tensors="pt")
        out = {k: v for k, v in enc.items() if k != "pixel_values"}
        pix = self.pixels(images)
        if "image_grid_thw" in out and not torch.equal(out["image_grid_thw"], pix["image_grid_thw"].cpu()):
            raise RuntimeError(
                f"internal: image grid {pix['image_grid_thw'][0].tolist()} differs from the processor's "
                f"{out['image_grid_thw'][0].tolist()}"
            )
        out = {k: v.to(self.device) for k, v in out.items()}
        out.update(pix)
        return out

    # -- scoring --------------------------------------------------------------------------------
    def answer_logprobs(self, images: torch.Tensor, questions: Sequence[str],
                        batch_size: int | None = None) -> torch.Tensor:
        """``(B, V)`` float32 log-softmax of the first answer token (teacher-forced after the
        generation prompt).  Differentiable w.r.t. ``images``; grad mode is the caller's."""
        images = images.to(self.device)
        step = batch_size or images.shape[0]
        rows = []
        for s in range(0, images.shape[0], step):
            batch = self.inputs(images[s : s + step], questions[s : s + step])
            logits = self.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]  # (b, V)
            rows.append(torch.log_softmax(logits.float(), dim=-1))
        return torch.cat(rows)

    def generate(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 64,
                 batch_size: int | None = None) -> list[str]:
        """Greedy answers, one string per image (no gradient: decoding is not differentiable)."""
        images = images.detach().to(self.device)
        step = batch_size or images.shape[0]
        answers: list[str] = []
        with torch.no_grad():
            for s in range(0, images.shape[0], step):
                batch = self.inputs(images[s : s + step], questions[s : s + step])
                out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
                new = out[:, batch["input_ids"].shape[1] :]
                answers += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [a.strip() for a in answers]


_CACHE: "weakref.WeakValueDictionary[tuple, VLMBackend]" = weakref.WeakValueDictionary()


def load_backend(model: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 trust_remote_code: bool = False, min_pixels: int | None = None,
                 max_pixels: int | None = None, strict: bool = False) -> VLMBackend:
    """Load a chat VLM (hub id or local path) once; rewards on the same model share the copy.

    Args:
        model (`str`): hub id (``"Qwen/Qwen2.5-VL-7B-Instruct"``, ``"llava-hf/llava-1.5-7b-hf"``) or
            a local folder in transformers layout.
        dtype (`str` or `torch.dtype`, *optional*): ``"bfloat16"``, ``"float16"``, ``"float32"``;
            defaults to the checkpoint's.
        device (*optional*): where to put the model; defaults to CPU.
        trust_remote_code (`bool`, *optional*, defaults to `False`): only if you trust the repository.
        min_pixels, max_pixels (`int`, *optional*): Qwen2-VL resize bounds (fewer pixels = fewer
            image tokens = faster); default to the processor's.
        strict (`bool`, *optional*, defaults to `False`): refuse a checkpoint whose weights miss
            model keys, carry unexpected ones or mismatch in shape (transformers otherwise warns and
            initialises the missing weights at random).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'bfloat16', 'float16' or 'float32'")
        dtype = getattr(torch, dtype)
    key = (str(model), dtype, str(device), trust_remote_code, min_pixels, max_pixels, strict)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        proc_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, **proc_kwargs)
        net, loading = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype or "auto",
                                                                   trust_remote_code=trust_remote_code,
                                                                   output_loading_info=True)
    except OSError as err:
        raise OSError(
            f"could not load the VLM {model!r}: {err}. Pass a hub id you can download (or have cached; "
            "unset HF_HUB_OFFLINE) or a local folder with the model, processor and chat template."
        ) from err
    if strict:
        problems = {k: sorted(map(str, loading.get(k) or ())) for k in ("missing_keys", "unexpected_keys",
                                                                         "mismatched_keys", "error_msgs")}
        if any(problems.values()):
            shown = "; ".join(f"{k.replace('_', ' ')}: {v[:8]}" for k, v in problems.items() if v)
            raise ValueError(f"the weights of {model!r} do not match {type(net).__name__}: {shown}. Pass the official "
                             "checkpoint (strict loading: nothing is initialised at random)")
    if len(processor.tokenizer) < 10:
        raise ValueError(f"tokenizer of {model!r} has only {len(processor.tokenizer)} tokens: a broken offline load; "
                         "download the model first")
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    backend = VLMBackend(net, processor)
    _CACHE[key] = backend
    return backend
