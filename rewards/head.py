"""Reward heads trained with the kit (:mod:`.head_train`): an ensemble of small MLPs on features.

A saved head is a folder with ``config.json`` (format, task, backbone, head and ensemble settings,
held-out metrics) and ``model.safetensors`` (the heads, the input statistics and, for a trainable
backbone, the backbone's weights).  It is loaded strictly: a missing or unexpected key is an
error that lists the keys.  Use it by path in any reward spec: ``head:path=DIR``.

Scores (docs/reward_training.md, "What a head returns").  Member ``k`` of the ensemble gives a raw
output ``o_k`` and a score ``s_k``:

- ``pairwise`` (Bradley-Terry): ``s_k = o_k``, a reward whose differences are preference log-odds;
- ``rating`` (regression): ``s_k = mu + sigma * o_k`` in the ratings' units (the head learns the
  standardised rating);
- ``binary``: ``o_k`` is a logit and ``s_k = sigmoid(o_k)``, the probability of the positive label.

The reward is the ensemble mean ``s = mean_k s_k`` and ``components["uncertainty"]`` is the
ensemble's spread ``std_k s_k`` (population standard deviation, in the score's units), the
epistemic uncertainty of Lakshminarayanan et al. 2017 ("Simple and Scalable Predictive
Uncertainty Estimation using Deep Ensembles") that uncertainty-aware rewards penalise (Ctrl-U).

Backbones.  A *frozen* backbone is one the zoo loads (:mod:`.backbones`: open_clip CLIP or SigLIP,
transformers CLIP, DINOv2); it is shared with other rewards and never saved in the head.  A
*trainable* backbone is a small network trained end to end with the heads (``cnn`` below, or one
registered with :func:`register_backbone`); its weights are saved with the heads.
Either way images go through torch ops only, so the score is differentiable in the pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visalign.registry import Registry

from .base import Reward, RewardOutput
from .loading import load_strict, resolve_device, resolve_dtype
from .registry import info as registry_info

__all__ = [
    "TASKS",
    "BackboneConfig",
    "EnsembleMLP",
    "SmallCNN",
    "RewardHeadModel",
    "HeadReward",
    "head",
    "build_model",
    "save_head",
    "load_head",
    "TRAINABLE_BACKBONES",
    "register_backbone",
]

FORMAT = "visalign-reward-head"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
TASKS = ("pairwise", "rating", "binary")
FROZEN_KINDS = ("open_clip", "transformers-clip", "dinov2")
#: trainable backbones: name -> Entry(the class, or "package.module:Class"); the class takes the
#: config's ``backbone.options`` as keyword arguments and has ``feature_dim`` and ``uses_prompts``.
TRAINABLE_BACKBONES = Registry("trainable backbone", unique=True)


def register_backbone(name: str, target: str | type) -> None:
    """Make ``name`` a trainable backbone kind (``backbone.kind: name`` in a reward recipe):
    ``target`` is an ``nn.Module`` class or its absolute ``"package.module:Class"``."""
    TRAINABLE_BACKBONES.register(name, target)


register_backbone("cnn", "visalign.rewards.head:SmallCNN")
_DEFAULT_FEATURE = {"open_clip": "embeds", "transformers-clip": "embeds", "dinov2": "cls"}


@dataclass
class BackboneConfig:
    """Which features the head reads.

    Args:
        kind (`str`): ``"open_clip"`` (CLIP or SigLIP through open_clip), ``"transformers-clip"``,
            ``"dinov2"`` (frozen, from the zoo), or a trainable backbone of
            :data:`TRAINABLE_BACKBONES` (``"cnn"``, or one registered with :func:`register_backbone`).
        model (`str`, *optional*): open_clip architecture (``"ViT-L-14"``), or a hub id / folder
            for transformers models.  Required for frozen kinds.
        pretrained (`str`, *optional*): open_clip tag or weights file (``"openai"``).
        processor (`str`, *optional*): transformers CLIP: the tokenizer / processor folder or id.
        feature (`str`, *optional*): which image feature: ``"embeds"`` (CLIP), ``"cls"`` or
            ``"patch_mean"`` (DINOv2); defaults to the kind's first.
        options (`dict`): keyword arguments of a trainable backbone's constructor.
    """

    kind: str = "open_clip"
    model: str | None = None
    pretrained: str | None = None
    processor: str | None = None
    feature: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = (*FROZEN_KINDS, *TRAINABLE_BACKBONES)
        if self.kind not in kinds:
            raise ValueError(f"backbone.kind={self.kind!r}: choose one of {list(kinds)}")
        if self.frozen:
            if not self.model:
                example = {"open_clip": "ViT-L-14", "transformers-clip": "openai/clip-vit-large-patch14",
                           "dinov2": "facebook/dinov2-base"}[self.kind]
                raise ValueError(f"backbone.kind={self.kind!r} needs backbone.model (e.g. {example!r} or a local folder)")
            if self.kind == "open_clip" and not self.pretrained:
                raise ValueError("backbone.kind='open_clip' needs backbone.pretrained (an open_clip tag such as "
                                 "'openai' or a weights file)")
            self.feature = self.feature or _DEFAULT_FEATURE[self.kind]
            valid = ("cls", "patch_mean") if self.kind == "dinov2" else ("embeds",)
            if self.feature not in valid:
                raise ValueError(f"backbone.feature={self.feature!r} for {self.kind}: choose one of {list(valid)}")
            if self.options:
                raise ValueError(f"backbone.options are for trainable backbones; {self.kind} takes none "
                                 f"(got {sorted(self.options)})")

    @property
    def frozen(self) -> bool:
        return self.kind in FROZEN_KINDS

    @property
    def has_text(self) -> bool:
        return self.kind in ("open_clip", "transformers-clip")

    def identity(self) -> str:
        """A string that changes when the features would: kind, model, weights (and a local weights
        file's size and modification time), feature.  Keys the embedding cache."""
        parts: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}
        for key in ("model", "pretrained"):
            value = parts.get(key)
            if value and os.path.exists(value):
                p = Path(value)
                files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
                parts[key + "_stat"] = [(q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files]
                parts[key] = str(p.resolve())
        return json.dumps(parts, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.identity().encode()).hexdigest()[:20]


def load_frozen_backbone(cfg: BackboneConfig, dtype: Any = None, device: Any = None, batch_size: int | None = None):
    """The zoo's shared backbone for a frozen ``cfg`` (:func:`.backbones.get_backbone`)."""
    from .backbones import get_backbone

    kw = dict(dtype=dtype, device=device, batch_size=batch_size)
    if cfg.kind == "open_clip":
        return get_backbone("open_clip", cfg.model, cfg.pretrained, **kw)
    if cfg.kind == "transformers-clip":
        return get_backbone("transformers-clip", cfg.model, cfg.processor, **kw)
    return get_backbone("dinov2", cfg.model, **kw)


def build_trainable_backbone(cfg: BackboneConfig) -> nn.Module:
    cls = TRAINABLE_BACKBONES.get(cfg.kind)
    try:
        return cls(**cfg.options)
    except TypeError as err:
        raise ValueError(f"backbone.options {cfg.options} do not fit the {cfg.kind!r} backbone: {err}") from None


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class EnsembleMLP(nn.Module):
    """``members`` independent MLPs ``in_dim -> hidden... -> 1`` (SiLU between), run as one batched
    matrix product.  Parameters ``weight.i`` ``(K, d_i, d_{i+1})`` and ``bias.i`` ``(K, d_{i+1})``.

    Each member is initialised like ``nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``) from its own
    seed, so members differ even when trained on the same data.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], members: int, seed: int = 0) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.members = int(in_dim), [int(h) for h in hidden], int(members)
        dims = [self.in_dim, *self.hidden, 1]
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        g = torch.Generator().manual_seed(int(seed))
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)
            self.weight.append(nn.Parameter((torch.rand(members, d_in, d_out, generator=g) * 2 - 1) * bound))
            self.bias.append(nn.Parameter((torch.rand(members, d_out, generator=g) * 2 - 1) * bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` -> ``(K, B)`` raw outputs."""
        h = torch.einsum("bi,kio->kbo", x, self.weight[0]) + self.bias[0][:, None]  # (K, B, d1)
        for w, b in zip(list(self.weight)[1:], list(self.bias)[1:]):
            h = torch.baddbmm(b[:, None], F.silu(h), w)  # (K, B, d_next)
        return h.squeeze(-1)


class SmallCNN(nn.Module):
    """A small image-only CNN trained end to end with the heads, for when no pretrained backbone
    fits (or none can be downloaded): images resized to ``size`` px with torch ops (area average
    down, bilinear up), with ``highpass`` its high-pass residual ``x - avgpool3x3(x)`` as three more
    channels (the noise residual that image-forensics CNNs read, Fridrich & Kodovsky 2012, "Rich
    Models for Steganalysis of Digital Images"; it makes blur, grids and noise easy to see),
    ``depth`` 3x3 conv + SiLU blocks with a 2x average pool after every other one, then mean- and
    max-pooling to a ``2 * width * 2**((depth - 1) // 2)`` feature.  No normalisation layer, so
    absolute colour and contrast (what artifact detectors look at) survive.
    """

    uses_prompts = False

    def __init__(self, size: int = 32, width: int = 32, depth: int = 4, highpass: bool = True) -> None:
        super().__init__()
        if size < 8 or width < 1 or depth < 2:
            raise ValueError(f"SmallCNN: need size >= 8, width >= 1, depth >= 2; got {size}, {width}, {depth}")
        self.options = dict(size=size, width=width, depth=depth, highpass=highpass)
        self.highpass = bool(highpass)
        self.size, chans, c_in = int(size), [], 6 if highpass else 3
        for i in range(depth):
            c_out = width * 2 ** (i // 2)
            chans.append((c_in, c_out))
            c_in = c_out
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in chans)
        self.feature_dim = 2 * c_in

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None, return_aux: bool = False):
        x = resize_square(images, self.size)
        if self.highpass:
            residual = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            x = torch.cat([x * 2 - 1, residual * 8], 1)
        else:
            x = x * 2 - 1
        for i, conv in enumerate(self.convs):
            x = F.silu(conv(x))
            if i % 2 == 1 and i + 1 < len(self.convs):
                x = F.avg_pool2d(x, 2)
        feats = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return (feats, {}) if return_aux else feats


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, size, size)``: area average when shrinking, bilinear when
    enlarging; differentiable."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h >= size and w >= size:
        return F.adaptive_avg_pool2d(images, size)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class RewardHeadModel(nn.Module):
    """Backbone features -> input statistics -> :class:`EnsembleMLP` -> per-member scores.

    Args:
        task (`str`): ``"pairwise"``, ``"rating"`` or ``"binary"``.
        backbone (`BackboneConfig`): where the features come from.
        in_dim (`int`): feature size the head reads (see :meth:`head_input`).
        hidden (`Sequence[int]`): hidden widths of each member's MLP (``[]`` is a linear head).
        members (`int`): ensemble size.
        use_prompt (`bool`): frozen CLIP backbones: read ``[i, t, i * t]`` of the L2-normalised image
            and text embeddings; otherwise the normalised image embedding alone.  Trainable
            backbones condition on the prompt themselves (``uses_prompts``).
        seed (`int`): initialisation seed of the heads (and of a trainable backbone).
    """

    def __init__(self, task: str, backbone: BackboneConfig, in_dim: int, hidden: Sequence[int], members: int,
                 use_prompt: bool, seed: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}: choose one of {list(TASKS)}")
        if members < 1:
            raise ValueError(f"ensemble members must be at least 1, got {members}")
        self.task, self.backbone_config, self.use_prompt = task, backbone, bool(use_prompt)
        self.trainable: nn.Module | None = None
        if not backbone.frozen:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # nn.Module initialisers draw from the global generator
                self.trainable = build_trainable_backbone(backbone)
            if self.trainable.feature_dim != in_dim:
                raise ValueError(f"the {backbone.kind} backbone gives {self.trainable.feature_dim}-d features, "
                                 f"the head was built for {in_dim}")
        self.heads = EnsembleMLP(in_dim, hidden, members, seed=seed)
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.register_buffer("score_mean", torch.zeros(()))  # rating: native units of the ratings
        self.register_buffer("score_std", torch.ones(()))
        self.frozen_backbone = None  # the zoo's shared Backbone (not part of the state dict)

    # -- features ------------------------------------------------------------------------------
    @property
    def uses_prompts(self) -> bool:
        return bool(getattr(self.trainable, "uses_prompts", False)) if self.trainable is not None else self.use_prompt

    def head_input(self, image_feats: torch.Tensor, text_feats: torch.Tensor | None) -> torch.Tensor:
        """The head's input ``(B, in_dim)`` from backbone features, standardised with the stored
        training statistics."""
        x = image_feats.float()
        if self.trainable is None:
            x = F.normalize(x, dim=-1)
            if self.use_prompt:
                if text_feats is None:
                    raise ValueError("this head reads the prompt: pass prompts")
                t = F.normalize(text_feats.float(), dim=-1)
                x = torch.cat([x, t, x * t], -1)
        return (x - self.input_mean) / self.input_std

    def features(self, images: torch.Tensor, prompts: Sequence[str] | None, return_aux: bool = False):
        """Backbone features ``(image_feats, text_feats or None)`` of images in [0, 1]; with
        ``return_aux`` also a trainable backbone's auxiliary outputs (a dict)."""
        if self.trainable is not None:
            device = next(self.trainable.parameters()).device
            out = self.trainable(images.to(device), list(prompts) if prompts is not None else None, return_aux=return_aux)
            feats, aux = out if return_aux else (out, {})
            return (feats, None, aux) if return_aux else (feats, None)
        if self.frozen_backbone is None:
            raise RuntimeError("the head's frozen backbone is not attached: load heads with load_head()")
        bb = self.frozen_backbone
        img = bb.image_features(images)[self.backbone_config.feature]
        txt = bb.text_features(list(prompts)) if self.use_prompt else None
        return (img, txt, {}) if return_aux else (img, txt)

    # -- outputs -------------------------------------------------------------------------------
    def raw(self, image_feats: torch.Tensor, text_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Member outputs ``(K, B)`` (logits for ``binary``, standardised ratings for ``rating``)."""
        return self.heads(self.head_input(image_feats, text_feats))

    def member_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw member outputs -> scores in the task's units (see the module docstring)."""
        if self.task == "binary":
            return torch.sigmoid(raw)
        if self.task == "rating":
            return self.score_mean + self.score_std * raw
        return raw

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{"score", "uncertainty", "raw_mean", "members"}`` for images in [0, 1]."""
        raw = self.raw(*self.features(images, prompts))
        members = self.member_scores(raw)  # (K, B)
        std = members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(members[0])
        return {"score": members.mean(0), "uncertainty": std, "raw_mean": raw.mean(0), "members": members}

    def to(self, *args: Any, **kwargs: Any) -> "RewardHeadModel":
        super().to(*args, **kwargs)
        device = self.input_mean.device
        if self.frozen_backbone is not None and self.frozen_backbone.device != device:
            self.frozen_backbone.to(device)
        return self


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------
def build_model(meta: dict) -> RewardHeadModel:
    """An untrained model from a head's ``config.json`` mapping (the ``model`` section)."""
    m = meta["model"]
    return RewardHeadModel(m["task"], BackboneConfig(**m["backbone"]), m["in_dim"], m["hidden"], m["members"],
                           m["use_prompt"], seed=m.get("seed", 0))


def model_meta(model: RewardHeadModel, seed: int = 0) -> dict:
    backbone = dataclasses.asdict(model.backbone_config)
    if model.trainable is not None and hasattr(model.trainable, "options"):
        backbone["options"] = dict(model.trainable.options)  # every constructor argument, defaults included
    return {"task": model.task, "backbone": backbone, "in_dim": model.heads.in_dim,
            "hidden": model.heads.hidden, "members": model.heads.members, "use_prompt": model.use_prompt, "seed": seed}


def save_head(model: RewardHeadModel, out_dir: str | os.PathLike, extra: dict | None = None, seed: int = 0) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (each atomically) to ``out_dir``."""
    from safetensors.torch import save_file

    from visalign.io import atomic_write, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_meta(model, seed), **(extra or {})}
    atomic_write_json(out / CONFIG_NAME, meta)
    return out


def read_meta(path: str | os.PathLike) -> dict:
    root = Path(path)
    cfg_file, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no reward head at {str(root)!r}: expected {CONFIG_NAME} and {WEIGHTS_NAME}. Train one with "
            "`visalign rewards train CONFIG` (docs/reward_training.md) and pass its output folder."
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a reward head saved by visalign (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {meta['format_version']}; this visalign reads up to "
                         f"{FORMAT_VERSION}: upgrade visalign")
    return meta


def load_head(path: str | os.PathLike, device: Any = None, dtype: Any = None,
              batch_size: int | None = None) -> tuple[RewardHeadModel, dict]:
    """Load a saved head strictly (every key present, none extra), in eval mode with frozen
    parameters, its frozen backbone attached from the zoo; returns ``(model, config mapping)``."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    model = build_model(meta)
    load_strict(model, load_file(str(Path(path) / WEIGHTS_NAME)), f"reward head {str(path)!r}")
    device = resolve_device(device)
    model.to(device)
    if model.backbone_config.frozen:
        model.frozen_backbone = load_frozen_backbone(model.backbone_config, dtype=resolve_dtype(dtype), device=device,
                                                     batch_size=batch_size)
    model.eval().requires_grad_(False)  # a reward: gradients go to the pixels, not to these weights
    return model, meta


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------
class HeadReward(Reward):
    """A trained reward head as a :class:`Reward` (registered as ``head``: ``head:path=DIR``).

    Score: the ensemble mean (module docstring); components ``uncertainty`` (the ensemble's standard
    deviation, in score units) and ``raw`` (the mean raw output: the logit for ``binary``).
    Differentiable in the pixels whatever the backbone; the caller chooses grad mode.

    Args:
        path (`str`): the folder written by ``visalign rewards train``.
        device, dtype: where and in which dtype a frozen backbone runs (heads run in float32).
        batch_size (`int`, *optional*): images per backbone forward chunk.
    """

    def __init__(self, path: str | os.PathLike, device: Any = None, dtype: Any = None,
                 batch_size: int | None = None, _registered: str = "head") -> None:
        self.path = str(path)
        self.model, self.meta = load_head(path, device=device, dtype=dtype, batch_size=batch_size)
        base = registry_info(_registered)
        task = self.model.task
        native = {"binary": (0.0, 1.0), "rating": tuple(self.meta.get("score_range", (-math.inf, math.inf))),
                  "pairwise": (-math.inf, math.inf)}[task]
        self.info = dataclasses.replace(
            base,
            inputs=("images", "prompts") if self.model.uses_prompts else ("images",),
            native_range=native,
            description=base.description if _registered != "head" else
            f"{task} reward head ({self.model.heads.members} members) on {self.model.backbone_config.kind} "
            f"features, from {self.path}",
        )

    @property
    def backbones(self) -> list:
        return [self.model.frozen_backbone] if self.model.frozen_backbone is not None else []

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        if images.ndim != 4:
            raise ValueError(f"reward {self.info.name!r} scores images (B, 3, H, W); got {tuple(images.shape)}. "
                             "For video wrap it: video_frames:reward=...")
        out = self.model(images, prompts if self.model.uses_prompts else None)
        return RewardOutput(out["score"].float(), components={"uncertainty": out["uncertainty"].float(),
                                                              "raw": out["raw_mean"].float()})

    def to(self, device) -> "HeadReward":
        self.model.to(device)
        return self


def head(path: str | None = None, device: Any = None, dtype: Any = None, batch_size: int | None = None) -> HeadReward:
    """A reward head trained with ``visalign rewards train``, loaded from its folder ``path``."""
    if path is None:
        raise ValueError("reward 'head' needs path=DIR, the folder written by `visalign rewards train` "
                         "(e.g. --rewards head:path=runs/my_head)")
    return HeadReward(path, device=device, dtype=dtype, batch_size=batch_size)
