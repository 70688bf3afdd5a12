"""Image/text backbones shared between rewards: one loaded copy, one forward pass per batch.

A backbone wraps one loaded model (open_clip CLIP, transformers CLIP, transformers DINOv2) with
its preprocessing.  :func:`get_backbone` caches backbones by ``(kind, model, weights, dtype,
device, ...)``, so two rewards on the same weights hold the same object.  Inside
``backbone.sharing()`` (entered by :func:`visalign.rewards.combine`), image and text features are
memoised per input tensor / prompt list, so rewards on one backbone cost one forward pass.

Heavy libraries (open_clip, transformers) are imported inside the loaders only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .loading import (
    MissingWeightsError,
    hub_download,
    is_offline,
    load_state_dict_file,
    load_strict,
    missing_weights,
    resolve_device,
    resolve_dtype,
)
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, preprocess

__all__ = ["Backbone", "get_backbone", "clear_backbone_cache", "backbones_of", "share_forward"]


class Backbone:
    """One loaded model + its preprocessing; subclasses set ``model``, ``spec`` and the encoders.

    ``image_features(images)`` returns a dict of ``(B, D)`` features (``"embeds"`` for CLIP;
    ``"cls"`` and ``"patch_mean"`` for DINOv2); ``text_features(prompts)`` returns ``(B, D)``.
    Features are unnormalised, in the model's dtype; gradients flow back to ``images``.
    """

    key: tuple
    spec: PreprocessSpec
    model: torch.nn.Module

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size
        self._image_memo: dict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
        self._text_memo: dict[tuple[str, ...], torch.Tensor] | None = None
        self._depth = 0

    # -- subclass hooks -------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} does not encode images")

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} has no text tower")

    # -- public ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _chunks(self, n: int) -> list[slice]:
        step = self.batch_size or n or 1
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of ``(B, 3, H, W)`` images in ``[0, 1]`` (memoised while :meth:`sharing`)."""
        memo_key = (id(images), images._version, tuple(images.shape))
        if self._image_memo is not None and memo_key in self._image_memo:
            return self._image_memo[memo_key][1]
        parts = []
        for sl in self._chunks(images.shape[0]):
            pixels = preprocess(images[sl].to(self.device), self.spec).to(self.dtype)
            parts.append(self._encode_pixels(pixels))
        feats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self._image_memo is not None:
            self._image_memo[memo_key] = (images, feats)  # keep images alive so the id is not reused
        return feats

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(B, D)`` (memoised while :meth:`sharing`)."""
        key = tuple(prompts)
        if self._text_memo is not None and key in self._text_memo:
            return self._text_memo[key]
        feats = torch.cat([self._encode_text(list(key[sl])) for sl in self._chunks(len(key))])
        if self._text_memo is not None:
            self._text_memo[key] = feats
        return feats

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """Memoise features for the duration of the block (nested use is fine)."""
        if self._depth == 0:
            self._image_memo, self._text_memo = {}, {}
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._image_memo = self._text_memo = None

    def to(self, device: torch.device | str) -> "Backbone":
        """Move the model (and re-key the cache entry, so later loads for ``device`` find it)."""
        device = torch.device(device)
        self.model.to(device)
        for key, value in list(_CACHE.items()):
            if value is self:
                del _CACHE[key]
                kind, *pairs = key
                _CACHE[(kind, *((k, str(device) if k == "device" else v) for k, v in pairs))] = self
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key}"


def _freeze(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------
class OpenClipBackbone(Backbone):
    """An open_clip CLIP model.

    Args:
        arch: open_clip model name (``"ViT-L-14"``, ``"ViT-H-14"``, or a config added with
            ``open_clip.add_model_config``).
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s32b_b79k"``), a local checkpoint
            file, or ``"hf-hub:<repo>/<file>"``.  The state dict may sit under ``"state_dict"``
            (HPSv2); it is loaded strictly.
        resize: preprocessing resize mode (``"shortest_crop"``; HPSv2 uses ``"letterbox"``).
    """

    def __init__(self, arch: str, pretrained: str, dtype: torch.dtype, device: torch.device,
                 resize: str = "shortest_crop", batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        import open_clip

        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if not os.path.exists(pretrained) else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        with _quiet_random_init_warning():  # weights are loaded (strictly) right below
            model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
        what = f"open_clip {arch} (pretrained={pretrained!r})"
        path = _open_clip_weights(arch, pretrained, tag_cfg, what)
        load_strict(model, load_state_dict_file(path, key="state_dict"), what)
        self.model = _freeze(model, dtype, device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.spec = PreprocessSpec(
            int(size), resize=resize,
            mean=tuple(tag_cfg.get("mean", CLIP_MEAN)), std=tuple(tag_cfg.get("std", CLIP_STD)),
            interpolation=tag_cfg.get("interpolation", "bicubic"),
        )
        self.key = ("open_clip", arch, pretrained, dtype, device, resize)

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeds": self.model.encode_image(pixels)}

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("No pretrained weights loaded")

    root, filt = logging.getLogger(), _Filter()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _open_clip_weights(arch: str, pretrained: str, tag_cfg: dict, what: str) -> str:
    if os.path.isfile(pretrained):
        return pretrained
    if pretrained.startswith("hf-hub:"):
        repo, _, filename = pretrained[len("hf-hub:"):].rpartition("/")
        return hub_download(repo, filename, what)
    if not tag_cfg:
        import open_clip

        raise ValueError(
            f"pretrained={pretrained!r} for open_clip {arch} is neither a file nor a known tag; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}"
        )
    hf_hub = tag_cfg.get("hf_hub", "")
    if not hf_hub:
        raise missing_weights(what, tag_cfg.get("url", pretrained))
    parts = [p for p in hf_hub.split("/") if p]
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    candidates = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for name in candidates:
        try:
            return hub_download(repo_id, name, what)
        except MissingWeightsError as err:
            last = err
    raise missing_weights(what, repo_id, " or ".join(candidates), last.__cause__)


# ---------------------------------------------------------------------------------------------
# transformers CLIP and DINOv2
# ---------------------------------------------------------------------------------------------
def _hf_from_pretrained(cls: Any, path: str, what: str, strict: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` offline-aware; with ``strict`` a missing / unexpected / mis-shaped key is an error
    (transformers would only warn and leave random weights)."""
    try:
        loaded = cls.from_pretrained(path, local_files_only=is_offline() or os.path.isdir(path),
                                     **({"output_loading_info": True} if strict else {}), **kwargs)
    except OSError as err:
        if os.path.isdir(path):
            raise FileNotFoundError(f"{what}: {path!r} is not a complete {cls.__name__} folder ({err})") from err
        raise missing_weights(what, path, cause=err) from err
    if not strict:
        return loaded
    model, report = loaded
    bad = {k: sorted(map(str, report.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise ValueError(
            f"weights for {what} do not match the model: " + "; ".join(f"{k.replace('_', ' ')} {v[:12]}" for k, v in bad.items())
            + ". Check that the checkpoint is a " + cls.__name__ + " (visalign never loads with strict=False)."
        )
    return model


def _processor_spec(path: str, default: PreprocessSpec) -> PreprocessSpec:
    """Read size/crop/mean/std from a ``preprocessor_config.json`` (local folder or cached hub id)."""
    cfg_path = Path(path) / "preprocessor_config.json"
    if not cfg_path.is_file():
        try:
            cfg_path = Path(hub_download(path, "preprocessor_config.json", f"image processor {path}"))
        except FileNotFoundError:
            return default
    cfg = json.loads(cfg_path.read_text())
    crop = cfg.get("crop_size", default.size)
    crop = crop.get("height", default.size) if isinstance(crop, dict) else int(crop)
    size = cfg.get("size", crop)
    short = size.get("shortest_edge", crop) if isinstance(size, dict) else int(size)
    return PreprocessSpec(
        int(crop), resize="shortest_crop", resize_to=int(short) if short != crop else None,
        mean=tuple(cfg.get("image_mean", default.mean)), std=tuple(cfg.get("image_std", default.std)),
        interpolation="bicubic" if cfg.get("resample", 3) == 3 else "bilinear", crop_offset="floor",
    )


def _check_tokenizer(tokenizer: Any, vocab_size: int, what: str) -> None:
    # An offline hub lookup can yield a 2-token stub instead of an error (transformers 5; seen in practice).
    n = len(tokenizer)
    if n <= 2 or n > vocab_size:
        raise ValueError(
            f"the tokenizer of {what} has {n} tokens but the model expects at most {vocab_size}: it is "
            "incomplete (an offline hub lookup can do this). Pass processor=<local folder with the tokenizer files>."
        )


class HFClipBackbone(Backbone):
    """A transformers ``CLIPModel`` (PickScore, or CLIPScore with ``backend="transformers"``)."""

    def __init__(self, model: str, processor: str | None, dtype: torch.dtype, device: torch.device,
                 batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        from transformers import AutoTokenizer, CLIPModel

        what = f"transformers CLIPModel {model!r}"
        clip = _hf_from_pretrained(CLIPModel, model, what, strict=True)
        processor = processor or model
        self.tokenizer = _hf_from_pretrained(AutoTokenizer, processor, f"tokenizer {processor!r}")
        _check_tokenizer(self.tokenizer, clip.config.text_config.vocab_size, what)
        self.max_length = min(int(clip.config.text_config.max_position_embeddings), 77)
        self.model = _freeze(clip, dtype, device)
        default = PreprocessSpec(int(clip.config.vision_config.image_size), crop_offset="floor")
        self.spec = _processor_spec(processor, default)
        self.key = ("transformers-clip", model, processor, dtype, device)

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns an output object whose pooler_output is the projected embedding.
        return {"embeds": out if isinstance(out, torch.Tensor) else out.pooler_output}

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()


class DinoBackbone(Backbone):
    """A transformers ``Dinov2Model``; features ``cls`` (``pooler_output``) and ``patch_mean``."""

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device, batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        from transformers import Dinov2Model

        dino = _hf_from_pretrained(Dinov2Model, model, f"DINOv2 {model!r}", strict=True)
        self.model = _freeze(dino, dtype, device)
        default = PreprocessSpec(224, resize_to=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_offset="floor")
        self.spec = _processor_spec(model, default)
        self.key = ("dinov2", model, dtype, device)

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(pixel_values=pixels)
        patches = out.last_hidden_state[:, 1:]  # (B, N, D): drop CLS (Dinov2Model has no register tokens)
        return {"cls": out.pooler_output, "patch_mean": patches.mean(dim=1)}


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
_LOADERS: dict[str, Callable[..., Backbone]] = {
    "open_clip": OpenClipBackbone,
    "transformers-clip": HFClipBackbone,
    "dinov2": DinoBackbone,
}
_CACHE: dict[tuple, Backbone] = {}


def get_backbone(kind: str, *args: Any, dtype: Any = None, device: Any = None, batch_size: int | None = None,
                 **kwargs: Any) -> Backbone:
    """The cached backbone for these arguments, loading it on first use.

    ``kind`` is ``"open_clip"``, ``"transformers-clip"`` or ``"dinov2"``; other arguments are the
    backbone class's.  ``batch_size`` (images per forward chunk) is a setting of the shared object:
    the last caller's value wins.
    """
    if kind not in _LOADERS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {sorted(_LOADERS)}")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    # Bind to the loader's signature so positional, keyword and default spellings share one key.
    bound = inspect.signature(_LOADERS[kind]).bind(*args, dtype=dtype, device=device, **kwargs)
    bound.apply_defaults()
    bound.arguments.pop("batch_size", None)
    key = (kind, *((k, str(v) if k == "device" else v) for k, v in bound.arguments.items()))
    if key not in _CACHE:
        _CACHE[key] = _LOADERS[kind](*bound.args, **bound.kwargs)
    backbone = _CACHE[key]
    if batch_size is not None:
        backbone.batch_size = batch_size
    return backbone


def clear_backbone_cache() -> None:
    """Forget cached backbones (their memory is freed once no reward holds them)."""
    _CACHE.clear()


def backbones_of(reward: Any) -> list[Backbone]:
    """The backbones a reward (or a wrapper of rewards) uses, without duplicates."""
    found: list[Backbone] = []
    for b in getattr(reward, "backbones", ()):
        if all(b is not f for f in found):
            found.append(b)
    return found


@contextlib.contextmanager
def share_forward(rewards: Sequence[Any]) -> Iterator[None]:
    """Within the block, rewards on one backbone share its forward passes."""
    with contextlib.ExitStack() as stack:
        seen: list[Backbone] = []
        for r in rewards:
            for b in backbones_of(r):
                if all(b is not s for s in seen):
                    seen.append(b)
                    stack.enter_context(b.sharing())
        yield
