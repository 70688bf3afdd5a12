"""The reward-head training kit: ``visalign rewards train CONFIG`` and :func:`train` / :func:`update`.

Losses (docs/reward_training.md, "Losses"), per ensemble member ``k`` and training unit ``i``:

- ``pairwise``: Bradley-Terry (Bradley & Terry 1952; as in InstructGPT's and PickScore's reward
  models): ``-[y log sigmoid(r_k(a) - r_k(b)) + (1 - y) log sigmoid(r_k(b) - r_k(a))]`` with ``y``
  the probability that ``a`` is preferred (1 for a plain pair, 0.5 for a tie);
- ``rating``: squared error on the standardised rating ``(score - mu) / sigma``;
- ``binary``: binary cross-entropy of the logit against the 0/1 label.

Ensemble: ``members`` heads, each from its own initialisation seed and, with ``bootstrap``, its
own bootstrap resample of the training units (Efron 1979; "bagging"): member ``k``'s loss weights
unit ``i`` by how many times a draw of ``U`` units with replacement picked it, so the members
train in one batched pass.  The spread of the members is the reward's uncertainty
(Lakshminarayanan et al. 2017).

Frozen backbones embed every image once; features are cached by content
(:class:`.head_data.EmbeddingCache`), so training many heads on one data set embeds it once.  A
trainable backbone (``cnn``, or a registered one) is trained with the heads, with a
data provider's optional extra loss (auxiliary targets) weighted by ``optim.extra_loss_weight``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from visalign.registry import Registry

from .head import TASKS, BackboneConfig, RewardHeadModel, load_frozen_backbone, load_head, save_head
from .head_data import EmbeddingCache, LabelledSet, read_dataset
from .head_metrics import binary_metrics, calibration_plot, pairwise_metrics, rating_metrics

__all__ = ["DataConfig", "HeadConfig", "EnsembleConfig", "OptimSettings", "RewardTrainConfig", "PROVIDERS",
           "register_provider", "train", "update", "finetune", "evaluate", "load_train_config"]

#: named data providers: name -> Entry(function, or "package.module:function"); the function takes
#: ``seed``, ``log`` and the config's ``data.options`` and returns {"train": {...}, "val": {...}}
#: (each: uint8 ``images``, ``prompts``, ``targets`` or ``pairs``, optional ``extras``) with optional
#: ``sample_probs`` (per training unit), ``extra_loss(aux, extras)`` (for a trainable backbone's
#: auxiliary outputs) and ``report(val_scores) -> dict`` (more held-out measures).
PROVIDERS = Registry("data provider", unique=True)


def register_provider(name: str, target) -> None:
    """Make ``name`` a data provider (``data: {provider: name}`` in a reward recipe); ``target`` is
    the function or its absolute ``"package.module:function"``."""
    PROVIDERS.register(name, target)


@dataclass
class DataConfig:
    """Where the labels come from: files, or a named provider.

    Args:
        train (`str`, *optional*): JSONL (or Pick-a-Pic parquet) of training rows; a relative path
            is relative to the config file's folder.
        val (`str`, *optional*): held-out rows; without it ``val_fraction`` of the training units
            are held out (drawn with ``optim.seed``).
        val_fraction (`float`): share of units held out when ``val`` is not given.
        provider (`str`, *optional*): a name of :data:`PROVIDERS` instead of files.
        options (`dict`): the provider's keyword arguments.
        max_rows (`int`, *optional*): read only the first N rows of each file (a hub dataset
            ``hub:OWNER/NAME[:SPLIT]`` is streamed, so this bounds what is downloaded).
    """

    train: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    max_rows: int | None = None
    provider: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.train is None) == (self.provider is None):
            raise ValueError("data: give exactly one of data.train (a JSONL / parquet file) or data.provider "
                             f"(one of {PROVIDERS.available()})")
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ValueError(f"data.provider={self.provider!r}: choose one of {PROVIDERS.available()}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class HeadConfig:
    """Each member's MLP.  ``hidden``: hidden widths (``[]`` = linear).  ``use_prompt``: whether
    the score depends on the prompt.  With a frozen CLIP backbone the head reads ``[i, t, i * t]``
    of the image and prompt embeddings; a trainable backbone conditions on the prompt itself or
    not at all (``shapes-proxy`` does, ``cnn`` reads images only).  Unset (``null``), it follows
    the backbone: true for CLIP and prompt-reading backbones, false for DINOv2 and ``cnn``.  A
    value the backbone cannot honour (``true`` on an image-only backbone, ``false`` on one that
    always reads the prompt) is an error."""

    hidden: list[int] = field(default_factory=lambda: [256])
    use_prompt: bool | None = None

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"head.hidden widths must be positive, got {self.hidden}")


@dataclass
class EnsembleConfig:
    """``members``: heads in the ensemble (1 = no uncertainty).  ``bootstrap``: each member trains
    on its own bootstrap resample of the training units (otherwise only the seeds differ)."""

    members: int = 5
    bootstrap: bool = True

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"ensemble.members must be at least 1, got {self.members}")


@dataclass
class OptimSettings:
    """AdamW with linear warm-up and cosine decay to 0.

    Args:
        steps (`int`): optimiser steps.
        batch (`int`): training units (pairs or items) per step.
        lr (`float`): peak learning rate.
        weight_decay (`float`): AdamW weight decay.
        warmup (`float`): share of the steps spent warming up.
        grad_clip (`float`): gradient-norm clip (0 = off).
        seed (`int`): seed of the initialisation, the bootstrap, the held-out split and the batches.
        extra_loss_weight (`float`): weight of a provider's extra loss (trainable backbones).
    """

    steps: int = 400
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    extra_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"optim.steps and optim.batch must be at least 1, got {self.steps} and {self.batch}")
        if self.lr <= 0 or not 0 <= self.warmup < 1:
            raise ValueError(f"optim.lr must be > 0 and optim.warmup in [0, 1); got {self.lr} and {self.warmup}")


@dataclass
class RewardTrainConfig:
    """A ``visalign rewards train`` recipe (docs/reward_training.md has an example of each task).

    Args:
        task (`str`): ``"pairwise"``, ``"rating"`` or ``"binary"``.
        out (`str`, *optional*): output folder (``--out`` overrides).
        cache_dir (`str`, *optional*): embedding cache; defaults to ``$VISALIGN_CACHE/embeddings``
            (``~/.cache/visalign/embeddings``).
        device (`str`, *optional*): ``cpu`` (default), ``cuda``...
        dtype (`str`, *optional*): a frozen backbone's dtype (heads train in float32).
        embed_batch (`int`): images per backbone forward when embedding.
        log_every (`int`): steps between log lines.
    """

    task: str = "pairwise"
    out: str | None = None
    data: DataConfig = field(default_factory=lambda: DataConfig(train="train.jsonl"))
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig("open_clip", "ViT-L-14", "openai"))
    head: HeadConfig = field(default_factory=HeadConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    cache_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    embed_batch: int = 64
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {list(TASKS)}")
        kind = self.backbone.kind
        reads = self.backbone.has_text if self.backbone.frozen else _trainable_reads_prompts(kind)
        if self.head.use_prompt is None:
            self.head.use_prompt = bool(reads)
        elif self.head.use_prompt and not reads:
            what = "has no text tower" if self.backbone.frozen else "reads images only"
            raise ValueError(f"head.use_prompt: true cannot be honoured: backbone.kind={kind!r} {what}, so the "
                             "score could not depend on the prompt. Set head.use_prompt: false (or leave it unset) "
                             "for an image-only head, or use a backbone that reads the prompt (a frozen CLIP: "
                             "backbone.kind: open_clip)")
        elif not self.head.use_prompt and reads and not self.backbone.frozen:
            raise ValueError(f"head.use_prompt: false cannot be honoured: backbone.kind={kind!r} always reads the "
                             "prompt. Leave head.use_prompt unset (or true), or use an image-only backbone (cnn)")


def _trainable_reads_prompts(kind: str) -> bool:
    """Whether a trainable backbone conditions on the prompt (its class's ``uses_prompts``)."""
    from .head import TRAINABLE_BACKBONES

    if kind not in TRAINABLE_BACKBONES:  # BackboneConfig names the valid kinds
        return False
    return bool(getattr(TRAINABLE_BACKBONES.get(kind), "uses_prompts", False))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file, or the name of a shipped one (the ``reward_recipes`` folder of
    :mod:`visalign.assets`)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix:
        return path
    from visalign.assets import asset_path

    shipped = asset_path(f"reward_recipes/{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped.parent.glob("*.yaml")) if shipped.parent.is_dir() else []
    raise FileNotFoundError(f"reward recipe {str(name_or_path)!r} is neither a file nor a shipped recipe "
                            f"(shipped: {names}); pass the path of a YAML recipe (docs/reward_training.md)")


def load_train_config(path: str | os.PathLike | None, overrides=()) -> RewardTrainConfig:
    """Read a recipe (a file, or a shipped recipe's name); relative data paths become relative to
    the recipe's folder."""
    from visalign.config import apply_overrides, from_dict, read_yaml

    if path is not None:
        path = recipe_path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    base = Path(path).parent if path is not None else Path.cwd()
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "val"):
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]) and not data[key].startswith("hub:"):
                data[key] = str(base / data[key])
    return from_dict(RewardTrainConfig, raw)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _from_provider(d: dict) -> LabelledSet:
    return LabelledSet(d["images"], list(d["prompts"]), d.get("targets"), d.get("pairs"), d.get("pair_labels"),
                       dict(d.get("extras", {})))


def load_data(cfg: RewardTrainConfig, log: Callable[[str], None]) -> tuple[LabelledSet, LabelledSet, dict]:
    """(train, val, provider extras) for a recipe."""
    d = cfg.data
    if d.provider is not None:
        fn = PROVIDERS.get(d.provider)
        got = fn(seed=cfg.optim.seed, log=log, **d.options)
        return _from_provider(got["train"]), _from_provider(got["val"]), got
    full = read_dataset(d.train, cfg.task, d.max_rows)
    if d.val is not None:
        return full, read_dataset(d.val, cfg.task, d.max_rows), {}
    g = torch.Generator().manual_seed(cfg.optim.seed)
    perm = torch.randperm(full.units, generator=g)
    n_val = max(1, int(round(full.units * d.val_fraction)))
    if full.units - n_val < 2:
        raise ValueError(f"{d.train} has {full.units} units: too few to hold out {d.val_fraction:.0%}; add rows or "
                         "pass data.val")
    return full.select(perm[n_val:]), full.select(perm[:n_val]), {}


def _check_targets(task: str, data: LabelledSet, what: str) -> None:
    if task == "pairwise" and data.pairs is None:
        raise ValueError(f"task 'pairwise' needs pairs; the {what} set has none")
    if task != "pairwise" and data.targets is None:
        raise ValueError(f"task {task!r} needs a score or label per item; the {what} set has none")


class _Features:
    """Batches of backbone features for a set: from the cache (frozen) or the trainable backbone."""

    def __init__(self, model: RewardHeadModel, data: LabelledSet, cache: EmbeddingCache | None, embed_batch: int,
                 log: Callable[[str], None]) -> None:
        self.model, self.data = model, data
        self.img = self.txt = None
        if model.trainable is None:
            bb = model.frozen_backbone
            feature = model.backbone_config.feature
            cache = cache or EmbeddingCache(None, model.backbone_config.digest())
            self.img, self.txt = cache.features(
                data, lambda x: bb.image_features(x.to(bb.device))[feature],
                (lambda p: bb.text_features(p)) if model.use_prompt else None, batch=embed_batch, log=log)

    def __call__(self, items: torch.Tensor, aux: bool = False):
        if self.img is not None:
            return self.img[items], (self.txt[items] if self.txt is not None else None), {}
        prompts = [self.data.prompts[i] for i in items.tolist()] if self.model.uses_prompts else None
        out = self.model.features(self.data.image_batch(items), prompts, return_aux=aux)
        return out if aux else (*out, {})


def _unit_items(data: LabelledSet, units: torch.Tensor) -> torch.Tensor:
    if data.pairs is not None:
        pairs = data.pairs[units]
        return torch.cat([pairs[:, 0], pairs[:, 1]])
    return units


def _unit_losses(task: str, raw: torch.Tensor, data: LabelledSet, units: torch.Tensor,
                 model: RewardHeadModel) -> torch.Tensor:
    """Per-member, per-unit losses ``(K, n)`` from raw outputs of :func:`_unit_items`' items."""
    if task == "pairwise":
        n = len(units)
        delta = raw[:, :n] - raw[:, n:]
        y = data.pair_labels[units].to(raw).expand_as(delta)
        return F.binary_cross_entropy_with_logits(delta, y, reduction="none")
    y = data.targets[units].to(raw)
    if task == "rating":
        z = (y - model.score_mean) / model.score_std
        return (raw - z) ** 2
    return F.binary_cross_entropy_with_logits(raw, y.expand_as(raw), reduction="none")


def _fit(model: RewardHeadModel, data: LabelledSet, feats: _Features, *, steps: int, batch: int, lr: float,
         weight_decay: float, warmup: float, grad_clip: float, seed: int, bootstrap: bool,
         unit_probs: torch.Tensor | None = None, extra_loss: Callable | None = None, extra_weight: float = 1.0,
         train_backbone: bool = True, log_every: int = 50, log: Callable[[str], None] = print,
         logf=None) -> list[dict]:
    """The training loop shared by :func:`train` and :func:`update`; returns the log records."""
    device = model.input_mean.device
    g = torch.Generator().manual_seed(seed)
    k, u = model.heads.members, data.units
    if bootstrap and k > 1:  # member k's multiplicity of each unit in its own resample
        draws = torch.randint(u, (k, u), generator=g)
        weights = torch.zeros(k, u).scatter_add_(1, draws, torch.ones(k, u))
    else:
        weights = torch.ones(k, u)
    weights = weights.to(device)
    params = list(model.heads.parameters())
    if model.trainable is not None and train_backbone:
        params += list(model.trainable.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = max(1, int(steps * warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / n_warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    records, losses, extras, t0 = [], [], [], time.time()
    for step in range(steps):
        if unit_probs is None:
            units = torch.randint(u, (batch,), generator=g)
        else:
            units = torch.multinomial(unit_probs, batch, replacement=True, generator=g)
        items = _unit_items(data, units)
        img, txt, aux = feats(items, aux=extra_loss is not None)
        raw = model.raw(img.to(device), txt.to(device) if txt is not None else None)  # (K, n_items)
        per = _unit_losses(model.task, raw, data, units, model)  # (K, n_units)
        loss = (weights[:, units.to(device)] * per).mean()
        extra = None
        if extra_loss is not None and aux:
            extra = extra_loss(aux, {name: v[items].to(device) for name, v in data.extras.items()})
            loss = loss + extra_weight * extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(float(per.detach().mean()))
        if extra is not None:
            extras.append(float(extra.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t0, 1)}
            if extras:
                rec["extra_loss"] = float(np.mean(extras))
            records.append(rec)
            if logf is not None:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            log(f"step {step + 1}/{steps} loss {rec['loss']:.4f}" + (f" extra {rec['extra_loss']:.4f}" if extras else "")
                + f" ({rec['elapsed_s']:.0f}s)")
            losses, extras = [], []
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return records


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_members(model: RewardHeadModel, feats: _Features, n_items: int, batch: int = 256) -> torch.Tensor:
    """Member scores ``(K, N)`` of every item of ``feats``' set."""
    device = model.input_mean.device
    outs = []
    for s in range(0, n_items, batch):
        img, txt, _ = feats(torch.arange(s, min(s + batch, n_items)))
        outs.append(model.member_scores(model.raw(img.to(device), txt.to(device) if txt is not None else None)).cpu())
    return torch.cat(outs, 1)


def evaluate(model: RewardHeadModel, data: LabelledSet, feats: _Features | None = None, plot: str | Path | None = None,
             seed: int = 0, title: str = "", cache: EmbeddingCache | None = None) -> tuple[dict, torch.Tensor]:
    """Held-out metrics (:mod:`.head_metrics`) and the member scores ``(K, N)``; with ``plot``, the
    calibration PNG."""
    feats = feats or _Features(model, data, cache, 64, lambda s: None)
    members = predict_members(model, feats, len(data))
    mean, std = members.mean(0).numpy(), members.std(0, unbiased=False).numpy()
    task = model.task
    if task == "pairwise":
        a, b = data.pairs[:, 0], data.pairs[:, 1]
        d_members = members[:, a] - members[:, b]  # (K, P)
        delta = d_members.mean(0).numpy()
        unc = d_members.std(0, unbiased=False).numpy()
        flip = torch.rand(len(a), generator=torch.Generator().manual_seed(seed)).numpy() < 0.5
        label = data.pair_labels.numpy()
        metrics = pairwise_metrics(delta, label, unc, flip)
        p = 1 / (1 + np.exp(-delta))
        pred, outcome = np.where(flip, 1 - p, p), np.where(flip, 1 - label, label)
        wrong = ((delta > 0) != (label > 0.5)) & (label != 0.5)
    elif task == "binary":
        y = data.targets.numpy()
        metrics = binary_metrics(mean, y, std)
        pred, outcome, unc, wrong = mean, y, std, (mean > 0.5) != (y > 0.5)
    else:
        y = data.targets.numpy()
        metrics = rating_metrics(mean, y, std)
        pred, outcome, unc, wrong = mean, y, std, np.abs(mean - y)
    if plot is not None:
        calibration_plot(plot, task, pred, outcome, unc, wrong, title=title)
    return metrics, members


# ---------------------------------------------------------------------------------------------
# Train / update / finetune
# ---------------------------------------------------------------------------------------------
def _default_cache_dir() -> Path:
    return Path(os.environ.get("VISALIGN_CACHE", Path.home() / ".cache" / "visalign")) / "embeddings"


def _input_stats(model: RewardHeadModel, feats: _Features, n_items: int) -> None:
    if model.trainable is not None:
        return  # the backbone learns its own scale
    x = model.head_input(feats.img, feats.txt)  # with the initial mean 0 / std 1
    model.input_mean.copy_(x.mean(0))
    model.input_std.copy_(x.std(0).clamp_min(1e-4))


def train(cfg: RewardTrainConfig, out: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict:
    """Train a reward head (ensemble) from a recipe; write ``config.json``, ``model.safetensors``,
    ``metrics.json``, ``log.jsonl`` and ``calibration.png`` to ``out`` (or ``cfg.out``); return the
    held-out metrics."""
    from visalign.config import to_dict
    from visalign.io import atomic_write_json

    out = Path(out or cfg.out or "")
    if not str(out) or str(out) == ".":
        raise ValueError("no output folder: pass --out DIR or set out: in the recipe")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train_set, val_set, provided = load_data(cfg, log)
    _check_targets(cfg.task, train_set, "training")
    _check_targets(cfg.task, val_set, "held-out")
    t_data = time.time() - t_start
    device = torch.device(cfg.device or "cpu")
    bb_cfg = cfg.backbone
    frozen = load_frozen_backbone(bb_cfg, dtype=cfg.dtype, device=device, batch_size=cfg.embed_batch) \
        if bb_cfg.frozen else None
    cache = EmbeddingCache(cfg.cache_dir or _default_cache_dir(), bb_cfg.digest()) if frozen is not None else None
    # the head's input size: frozen -> from one embedded item; trainable -> the backbone's
    if frozen is not None:
        probe = RewardHeadModel(cfg.task, bb_cfg, 1, [], 1, cfg.head.use_prompt)
        probe.frozen_backbone = frozen
        t0 = time.time()
        tr_feats = _Features(probe, train_set, cache, cfg.embed_batch, log)
        va_feats = _Features(probe, val_set, cache, cfg.embed_batch, log)
        t_embed = time.time() - t0
        d_img = tr_feats.img.shape[1]
        in_dim = 3 * d_img if cfg.head.use_prompt else d_img
    else:
        in_dim, t_embed = None, 0.0
    if in_dim is None:
        from .head import build_trainable_backbone

        in_dim = build_trainable_backbone(bb_cfg).feature_dim
    model = RewardHeadModel(cfg.task, bb_cfg, in_dim, cfg.head.hidden, cfg.ensemble.members, cfg.head.use_prompt,
                            seed=cfg.optim.seed).to(device)
    model.frozen_backbone = frozen
    if frozen is not None:
        tr_feats.model = va_feats.model = model
    else:
        tr_feats, va_feats = _Features(model, train_set, None, 0, log), _Features(model, val_set, None, 0, log)
    if cfg.task == "rating":
        model.score_mean.fill_(float(train_set.targets.mean()))
        model.score_std.fill_(float(train_set.targets.std().clamp_min(1e-6)) if len(train_set) > 1 else 1.0)
    _input_stats(model, tr_feats, len(train_set))
    o = cfg.optim
    t0 = time.time()
    with open(out / "log.jsonl", "w") as logf:
        _fit(model, train_set, tr_feats, steps=o.steps, batch=o.batch, lr=o.lr, weight_decay=o.weight_decay,
             warmup=o.warmup, grad_clip=o.grad_clip, seed=o.seed, bootstrap=cfg.ensemble.bootstrap,
             unit_probs=provided.get("sample_probs"), extra_loss=provided.get("extra_loss"),
             extra_weight=o.extra_loss_weight, log_every=cfg.log_every,
             log=log, logf=logf)
    t_train = time.time() - t0
    metrics, members = evaluate(model, val_set, va_feats, plot=out / "calibration.png", seed=o.seed,
                                title=f"{len(val_set) if cfg.task != 'pairwise' else val_set.units} held out")
    if "report" in provided:
        metrics.update(provided["report"](members.mean(0).numpy()))
    metrics.update({"train_units": train_set.units, "val_units": val_set.units, "data_seconds": round(t_data, 1),
                    "embed_seconds": round(t_embed, 1), "train_seconds": round(t_train, 1),
                    "total_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads()})
    if cache is not None:
        metrics.update({"cache_hits": cache.hits, "cache_misses": cache.misses})
    extra = {"recipe": to_dict(cfg), "metrics": metrics}
    if cfg.task == "rating":
        extra["score_range"] = [float(train_set.targets.min()), float(train_set.targets.max())]
    save_head(model, out, extra=extra, seed=o.seed)
    metrics["weights_bytes"] = (out / "model.safetensors").stat().st_size
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def update(model: RewardHeadModel, data: LabelledSet, *, steps: int = 200, batch: int = 64, lr: float = 5e-4,
           replay: LabelledSet | None = None, replay_fraction: float = 0.5, train_backbone: bool = False,
           bootstrap: bool = True, seed: int = 0, weight_decay: float = 1e-4, extra_loss: Callable | None = None,
           extra_weight: float = 1.0, cache: EmbeddingCache | None = None, log: Callable[[str], None] = print,
           log_every: int = 50) -> list[dict]:
    """Fine-tune a loaded head (and ensemble) in place on newly labelled samples.

    Every member keeps training from its current weights on ``data``; with ``replay`` (e.g. the
    original training set, or earlier labels) each batch draws ``replay_fraction`` of its units from
    ``replay`` in expectation, which keeps the head from forgetting.  The input statistics, rating
    scale and architecture stay as trained.  ``train_backbone`` also updates a trainable backbone.
    Returns the log records; the caller saves with :func:`.head.save_head` (or uses
    :func:`finetune`).  For reward refresh in a training loop: label a batch of generated images
    (``LabelledSet.from_tensors(images, prompts, labels)``), call this, keep scoring with the model.
    """
    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    _check_targets(model.task, data, "new")
    probs = None
    if replay is not None and replay.units and replay_fraction > 0:
        _check_targets(model.task, replay, "replay")
        n_new = data.units
        data = LabelledSet.concat(data, replay)
        probs = torch.cat([torch.full((n_new,), (1 - replay_fraction) / n_new),
                           torch.full((data.units - n_new,), replay_fraction / (data.units - n_new))])
    feats = _Features(model, data, cache, 64, log)
    return _fit(model, data, feats, steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, warmup=0.05,
                grad_clip=1.0, seed=seed, bootstrap=bootstrap, unit_probs=probs, extra_loss=extra_loss,
                extra_weight=extra_weight, train_backbone=train_backbone, log_every=log_every, log=log)


def finetune(path: str | os.PathLike, data: LabelledSet | str | os.PathLike, out: str | os.PathLike | None = None,
             val: LabelledSet | str | os.PathLike | None = None, replay: LabelledSet | str | os.PathLike | None = None,
             device: Any = None, log: Callable[[str], None] = print, **kwargs: Any) -> dict:
    """Load the head saved at ``path``, :func:`update` it with ``data`` (a :class:`LabelledSet` or a
    data file of the head's task), and save it to ``out`` (default: back to ``path``, each file
    atomically).  ``replay`` and the keyword arguments are :func:`update`'s.  Returns the held-out
    metrics on ``val`` when given (else ``{}``); the saved ``config.json`` lists every fine-tuning."""
    model, meta = load_head(path, device=device)
    task = model.task
    as_set = lambda d: read_dataset(d, task) if isinstance(d, (str, os.PathLike)) else d  # noqa: E731
    data, replay, val = as_set(data), as_set(replay) if replay is not None else None, \
        as_set(val) if val is not None else None
    records = update(model, data, replay=replay, log=log, **kwargs)
    metrics = evaluate(model, val)[0] if val is not None else {}
    history = list(meta.get("finetuned", [])) + [{"units": data.units, "replay_units": replay.units if replay else 0,
                                                 "steps": records[-1]["step"] if records else 0,
                                                 "final_loss": records[-1]["loss"] if records else None,
                                                 "metrics": metrics}]
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model")}
    extra["finetuned"] = history
    save_head(model, out or path, extra=extra, seed=meta["model"].get("seed", 0))
    return metrics
