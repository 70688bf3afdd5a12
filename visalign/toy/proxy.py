"""``shapes-proxy``'s toy-specific parts: the prompt-conditioned backbone and the labelled data.

The gold verifier (:mod:`.verify`) segments and counts, so it has no gradient.  The proxy is a
small network that predicts the verifier's verdict from pixels and prompt text, so reward-gradient
methods (DRaFT / AlignProp / ReFL, reward guidance) have something to differentiate, and
optimising it hard while watching the gold verifier measures reward hacking (Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization").  It is trained with the reward-head kit
(``visalign rewards train shapes-proxy``, docs/reward_training.md): this module supplies the
kit's trainable backbone (:class:`ProxyBackbone`) and its data provider (:func:`training_data`);
the toy world imports nothing from the kit.

Backbone (:class:`ProxyBackbone`, about 0.3 M parameters):

- **text**: the prompt's words (the grammar's vocabulary, :func:`.prompts.vocabulary`) after a
  ``<cls>`` token, with learned positions, through a 2-layer pre-norm transformer encoder; the
  ``<cls>`` output ``t`` (D,) is the prompt embedding.  Word order matters ("a red square and a
  blue circle" vs "a blue square and a red circle"), which a bag of words would lose.
- **image** (prompt-independent): pixels in [0, 1], resized to 32 px as the verifier resizes (area
  average down, bilinear up; both differentiable), the background (mean of the one-pixel border)
  subtracted, 2x2 space-to-depth to ``(12, 16, 16)`` plus two coordinate channels (CoordConv,
  Liu et al. 2018, for the position prompts), four 3x3 conv + SiLU blocks at 16 then 8 px (no
  normalisation layer: a per-image norm would erase the object count), mean- and max-pooled to a
  scene vector ``z``.
- **features** for the kit's heads: ``[z * W t, z, t]`` (a bilinear prompt-scene interaction).
- **auxiliary heads** (trained through the provider's extra loss): the verifier's partial credit
  (from the features; the reward reports it as ``partial``), per-(shape, colour) object counts and
  each shape's mean centre (from ``z``), and a per-pixel colour and shape map (from the 16 px
  features).  Their targets are the gold verifier's own detections; without them the verdict
  alone, one bit per image, left the network at chance for hundreds of steps.

Data (:func:`training_data`), every image labelled by the gold verifier: renderer images of train
prompts, half of them drawn for a mutated prompt and paired with the original one (hard negatives:
another colour, swapped colours, another shape, count or relation, a dropped object), and a cached
pool of base-model samples of train prompts (:func:`make_pool`).  Held out: fresh base-model
samples of eval-split prompts (all 243 prompts, including the held-out compositions).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..stats import roc_auc  # noqa: F401  (re-exported: visalign.toy.artifacts and older scripts)
from .prompts import COLORS, SHAPES, TAGS, by_tag, mutate, split, vocabulary
from .render import render
from .verify import Detected, _objects, _segment, check, to_work  # the verifier's own segmentation, for dense targets

__all__ = [
    "ProxyBackbone",
    "resize_to_work",
    "mutate",
    "roc_auc",
    "make_pool",
    "read_pool",
    "label",
    "renderer_set",
    "renderer_eval_set",
    "training_data",
    "extra_loss",
]

WORK_RES = 32
SPECIALS = ("<pad>", "<cls>", "<unk>")
POOL_NAME = "pool.safetensors"
#: scene head outputs: object counts per (shape, colour), then mean centre (x, y) per shape
N_AUX = len(SHAPES) * len(COLORS) + 2 * len(SHAPES)
N_SEG = (1 + len(COLORS)) + (1 + len(SHAPES))  # dense classes: colour map, then shape map
IGNORE = -100


def normalize_prompt(text: str) -> list[str]:
    """Words of a prompt as :func:`.prompts.parse_prompt` reads it (case, full stop, "a photo of")."""
    words = text.lower().strip().rstrip(".").split()
    if words[:3] == ["a", "photo", "of"] and len(words) > 3:
        words = words[3:]
    return words


class ProxyBackbone(nn.Module):
    """Prompt-conditioned CNN features for the kit's heads (see the module docstring).

    Args:
        width (`int`, *optional*, defaults to 48): conv channels at 16 px (twice that at 8 px).
        text_dim (`int`, *optional*, defaults to 64): token / prompt embedding size.
        text_layers (`int`, *optional*, defaults to 2): transformer encoder layers.
        text_heads (`int`, *optional*, defaults to 4): attention heads.
        hidden (`int`, *optional*, defaults to 128): scene vector size.
        max_tokens (`int`, *optional*, defaults to 16): ``<cls>`` + words (the longest prompt has 10).
        vocab (`list[str]`, *optional*): the token list (special tokens first); defaults to the
            grammar's, and is saved with the weights so a later grammar change cannot shift ids.
    """

    uses_prompts = True

    def __init__(self, width: int = 48, text_dim: int = 64, text_layers: int = 2, text_heads: int = 4,
                 hidden: int = 128, max_tokens: int = 16, vocab: Sequence[str] | None = None) -> None:
        super().__init__()
        vocab = list(vocab) if vocab is not None else list(SPECIALS) + vocabulary()
        if text_dim % text_heads:
            raise ValueError(f"text_dim must be divisible by text_heads: got {text_dim} and {text_heads}")
        if vocab[: len(SPECIALS)] != list(SPECIALS):
            raise ValueError(f"vocab must start with the special tokens {SPECIALS}; got {vocab[:3]}")
        self.options = dict(width=width, text_dim=text_dim, text_layers=text_layers, text_heads=text_heads,
                            hidden=hidden, max_tokens=max_tokens, vocab=vocab)
        c, d = width, text_dim
        self.max_tokens = max_tokens
        self._index = {w: i for i, w in enumerate(vocab)}
        self.tok_emb = nn.Embedding(len(vocab), d)
        self.pos_emb = nn.Parameter(torch.zeros(max_tokens, d))
        layer = nn.TransformerEncoderLayer(d, text_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(d)
        chans = [(12 + 2, c), (c, c), (c, 2 * c), (2 * c, 2 * c)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in chans)
        # dense head on the 16 px features: per-pixel colour (background + palette) and shape
        # (background + SHAPES) logits for the 2x2 pixels of each location
        self.seg = nn.Conv2d(c, 4 * N_SEG, 1)
        self.scene = nn.Sequential(nn.Linear(4 * c, hidden), nn.SiLU())
        self.aux = nn.Linear(hidden, N_AUX)
        self.gate = nn.Linear(d, hidden)
        self.feature_dim = 2 * hidden + d
        self.partial = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, L)`` and padding mask ``(B, L)`` (True = padding); unknown words -> ``<unk>``."""
        n = self.max_tokens
        ids = torch.zeros(len(prompts), n, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = normalize_prompt(p)
            if len(words) + 1 > n:
                raise ValueError(f"prompt {p!r} has {len(words)} words; the proxy reads at most {n - 1}")
            row = [self._index["<cls>"]] + [self._index.get(w, self._index["<unk>"]) for w in words]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids == self._index["<pad>"]

    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings ``(B, D)``: the ``<cls>`` output of the text encoder."""
        ids, pad = self.tokenize(prompts)
        ids, pad = ids.to(self.pos_emb.device), pad.to(self.pos_emb.device)
        h = self.tok_emb(ids) + self.pos_emb  # (B, L, D)
        h = self.text(h, src_key_padding_mask=pad)
        return self.text_norm(h[:, 0])

    def encode_images(self, images: torch.Tensor, dense: bool = False):
        """Prompt-independent scene features ``(B, hidden)`` of images in [0, 1]; with ``dense``,
        also the per-pixel logits ``(B, N_SEG, 32, 32)`` of the segmentation head."""
        x = resize_to_work(images).to(self.pos_emb.dtype)  # (B, 3, 32, 32)
        # subtract the background, estimated (as the verifier does) from the one-pixel border, so
        # empty canvas reads as zero whatever its tint; the mean keeps the gradient smooth
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], -1)  # (B, 3, P)
        x = (x - border.mean(-1)[..., None, None]) * 2.0
        x = F.pixel_unshuffle(x, 2)  # (B, 12, 16, 16)
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)
        x = torch.cat([x, coords], 1)  # (B, 14, 16, 16)
        seg = None
        for i, conv in enumerate(self.convs):
            if i == 2:
                if dense:
                    seg = F.pixel_shuffle(self.seg(x), 2)  # (B, N_SEG, 32, 32)
                x = F.avg_pool2d(x, 2)  # (B, C, 8, 8)
            # no normalisation: a per-image norm would erase the object count from the pooled mean
            x = F.silu(conv(x))
        z = self.scene(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))  # (B, hidden)
        return (z, seg) if dense else z

    def forward(self, images: torch.Tensor, prompts: Sequence[str], return_aux: bool = False):
        """Features ``(B, 2 * hidden + text_dim)`` = ``[z * W t, z, t]`` of images in [0, 1]; with
        ``return_aux`` also ``{"partial": (B,) logit, "scene": (B, N_AUX), "seg": (B, N_SEG, 32, 32)}``."""
        if prompts is None:
            raise ValueError("the shapes-proxy backbone reads the prompt: pass prompts")
        z, seg = self.encode_images(images, dense=True) if return_aux else (self.encode_images(images), None)
        t = self.embed_prompts(prompts)  # (B, D)
        feats = torch.cat([z * self.gate(t), z, t], 1)  # bilinear prompt-scene interaction
        if not return_aux:
            return feats
        return feats, {"partial": self.partial_logit(feats), "scene": self.aux(z), "seg": seg}

    def partial_logit(self, feats: torch.Tensor) -> torch.Tensor:
        """Logit ``(B,)`` of the verifier's partial credit, from :meth:`forward`'s features."""
        return self.partial(feats).squeeze(-1)


def resize_to_work(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, 32, 32)`` as the gold verifier resizes (area average when
    shrinking, bilinear when enlarging), with torch ops so the gradient reaches the pixels."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the shapes proxy takes images (B, 3, H, W); got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) == (WORK_RES, WORK_RES):
        return images
    if h >= WORK_RES and w >= WORK_RES:
        return F.adaptive_avg_pool2d(images, WORK_RES)
    return F.interpolate(images, size=(WORK_RES, WORK_RES), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Data: hard negatives from the grammar, the base-model pool
# ----------------------------------------------------------------------------------------------

def _balanced(metas_by_tag: dict, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` prompts drawn category-balanced: a category uniformly, then a prompt in it."""
    tags = list(metas_by_tag)
    return [dict(metas_by_tag[tags[t]][int(rng.integers(len(metas_by_tag[tags[t]])))])
            for t in rng.integers(len(tags), size=n)]


@torch.no_grad()
def make_pool(path: str | os.PathLike, model: str, n_train: int = 1500, n_eval: int = 480, seed: int = 0,
              num_steps: int = 10, guidance_scale: float = 3.0, batch: int = 100, log=print) -> Path:
    """Sample base-model images for category-balanced prompts and label them with the gold verifier.

    The first ``n_train`` samples use prompts of the ``train`` split, the next ``n_eval`` fresh
    samples prompts of the ``eval`` split (the held-out set for the ROC AUC).  Saved to ``path`` as
    safetensors: ``images`` uint8 ``(N, 3, 32, 32)``, ``strict`` and ``partial`` float32, ``is_eval``
    and ``heldout`` bool (the scene targets are recomputed when the pool is read); prompts and
    settings as JSON in the file's metadata.  The verdicts are computed on the stored uint8 images,
    so the labels match what the proxy sees.
    """
    from safetensors.torch import save_file

    import visalign.samplers as vs

    sampler = vs.load(model)
    rng = np.random.default_rng([seed, 7])
    metas = _balanced(by_tag(split("train")), n_train, rng) + _balanced(by_tag(split("eval")), n_eval, rng)
    chunks, t0 = [], time.time()

    def keep(start, out):
        chunks.append((out.images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        log(f"pool: {start + len(out)}/{len(metas)} samples, {time.time() - t0:.0f}s")

    vs.collect(sampler, [m["prompt"] for m in metas], num_steps=num_steps, guidance_scale=guidance_scale,
               seeds=[seed * 1_000_003 + k for k in range(len(metas))], batch_size=batch, keep_images=False,
               on_batch=keep)
    images = torch.cat(chunks)
    tensors = {
        "images": images,
        **{k: v for k, v in label(images.float() / 255, metas).items() if k in ("strict", "partial")},
        "is_eval": torch.arange(len(metas)) >= n_train,
        "heldout": torch.tensor([bool(m.get("heldout", False)) for m in metas]),
    }
    info = {"prompts": json.dumps([m["prompt"] for m in metas]), "tags": json.dumps([m["tag"] for m in metas]),
            "model": str(model), "num_steps": str(num_steps), "guidance_scale": str(guidance_scale),
            "seed": str(seed), "n_train": str(n_train), "n_eval": str(n_eval)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out) + ".tmp", metadata=info)
    Path(str(out) + ".tmp").replace(out)
    return out


def read_pool(path: str | os.PathLike) -> tuple[dict, dict]:
    from safetensors import safe_open

    """The pool's tensors (with the scene targets recomputed) and its metadata (prompts, tags, model)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = dict(f.metadata())
    info["prompts"], info["tags"] = json.loads(info["prompts"]), json.loads(info["tags"])
    tensors.update(scene_labels(tensors["images"].float() / 255)[1])
    return tensors, info


def scene_targets(objects: Sequence[Detected]) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary targets from the gold verifier's detections of one image: counts per (shape,
    colour) and each shape's mean centre in [-1, 1] (x right, y down); and the mask ``(N_AUX,)``
    that is False for the centres of absent shapes."""
    target, mask = torch.zeros(N_AUX), torch.ones(N_AUX, dtype=torch.bool)
    colours, base = list(COLORS), len(SHAPES) * len(COLORS)
    for k, shape in enumerate(SHAPES):
        mine = [o for o in objects if o.shape == shape]
        for o in mine:
            target[k * len(colours) + colours.index(o.color)] += 1
        if mine:
            target[base + 2 * k] = float(np.mean([(o.box[0] + o.box[2]) / WORK_RES - 1 for o in mine]))
            target[base + 2 * k + 1] = float(np.mean([(o.box[1] + o.box[3]) / WORK_RES - 1 for o in mine]))
        else:
            mask[base + 2 * k: base + 2 * k + 2] = False
    return target, mask


def scene_labels(images: torch.Tensor) -> tuple[list[list[Detected]], dict[str, torch.Tensor]]:
    """The gold verifier's view of a batch, as training targets for the image tower: its detected
    objects, ``aux`` ``(B, N_AUX)`` with ``aux_mask`` (:func:`scene_targets`), ``colour_map``
    ``(B, 32, 32)`` (0 background, 1 + palette index) and ``shape_map`` (0 background, 1 + shape
    index; foreground outside a recognised object is ignored)."""
    label_map, alpha = _segment(to_work(images))  # (B, 32, 32) colour index or -1
    objects = [_objects(lab, al) for lab, al in zip(label_map, alpha)]
    shape_map = np.where(label_map >= 0, IGNORE, 0)
    colours = list(COLORS)
    for i, objs in enumerate(objects):
        for o in objs:
            if o.shape not in SHAPES:
                continue
            x0, y0, x1, y1 = (int(v) for v in o.box)
            win = label_map[i, y0:y1, x0:x1] == colours.index(o.color)
            shape_map[i, y0:y1, x0:x1][win] = 1 + SHAPES.index(o.shape)
    aux, mask = zip(*(scene_targets(o) for o in objects)) if objects else ((), ())
    return objects, {
        "aux": torch.stack(aux) if aux else torch.zeros(0, N_AUX),
        "aux_mask": torch.stack(mask) if mask else torch.zeros(0, N_AUX, dtype=torch.bool),
        "colour_map": torch.from_numpy(label_map + 1).long(),
        "shape_map": torch.from_numpy(shape_map).long(),
    }


def label(images: torch.Tensor, metas: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Gold-verifier labels of a batch: ``strict`` and ``partial`` ``(B,)`` plus :func:`scene_labels`."""
    objects, scene = scene_labels(images)
    verdicts = [check(o, m) for o, m in zip(objects, metas)]
    return {"strict": torch.tensor([float(v.strict) for v in verdicts]),
            "partial": torch.tensor([v.partial for v in verdicts], dtype=torch.float32), **scene}


def _renderer_batch(metas: Sequence[Mapping], rng: np.random.Generator, p_negative: float = 0.5):
    """Renderer images for ``metas``: each one drawn for its prompt or, with ``p_negative``, for a
    mutation of it; prompts are the originals; labels from the gold verifier (:func:`label`);
    ``kinds`` marks the images drawn from a mutation."""
    images, kinds = [], []
    for m in metas:
        neg = rng.random() < p_negative
        scene_meta = mutate(m, rng) if neg else m
        try:
            images.append(render(scene_meta, rng))
        except RuntimeError:  # a mutation that cannot be placed: fall back to the prompt itself
            images.append(render(m, rng))
            neg = False
        kinds.append(neg)
    x = torch.from_numpy(np.stack(images))
    return x, [m["prompt"] for m in metas], label(x, metas), torch.tensor(kinds)


def _by_tag(name: str, tags: Sequence[str] | None) -> dict:
    groups = by_tag(split(name))
    if tags is None:
        return groups
    unknown = sorted(set(tags) - set(TAGS))
    if unknown or not tags:
        raise ValueError(f"unknown prompt categories {unknown or list(tags)}: choose from {list(TAGS)}")
    return {t: groups[t] for t in tags}


def renderer_eval_set(n: int, seed: int, tags: Sequence[str] | None = None):
    """Held-out renderer images of ``eval``-split prompts (category-balanced, only ``tags`` if
    given), half of them hard negatives: images ``(n, 3, 32, 32)``, prompts, gold strict labels
    ``(n,)``, and which images were drawn from a mutation ``(n,)``."""
    rng = np.random.default_rng([seed, 11])
    x, prompts, y, kinds = _renderer_batch(_balanced(_by_tag("eval", tags), n, rng), rng)
    return x, prompts, y["strict"], kinds




def renderer_set(n: int, seed: int, tags: Sequence[str] | None = None, split_name: str = "train",
                 p_negative: float = 0.5, chunk: int = 256):
    """``n`` renderer images of ``split_name`` prompts (category-balanced), ``p_negative`` of them
    drawn for a mutated prompt; returns images uint8 ``(n, 3, 32, 32)``, prompts and the
    :func:`label` dict."""
    rng = np.random.default_rng([seed, 5])
    by = _by_tag(split_name, tags)
    xs, prompts, labels = [], [], []
    for s in range(0, n, chunk):
        x, p, y, _ = _renderer_batch(_balanced(by, min(chunk, n - s), rng), rng, p_negative)
        xs.append((x * 255).round().to(torch.uint8))
        prompts += p
        labels.append(y)
    return torch.cat(xs), prompts, {k: torch.cat([y[k] for y in labels]) for k in labels[0]}


_EXTRAS = ("partial", "aux", "aux_mask", "colour_map", "shape_map")


def extra_loss(aux: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], w_partial: float = 0.5) -> torch.Tensor:
    """The auxiliary losses (the kit adds them to its verdict loss): ``w_partial`` x binary
    cross-entropy of the partial-credit logit against the verifier's partial credit (a soft label
    in [0, 1]), masked MSE of the object counts and centres, per-pixel cross-entropy of the colour
    and shape maps; all targets from the gold verifier."""
    m = targets["aux_mask"].float()
    aux_loss = (((aux["scene"] - targets["aux"]) ** 2) * m).sum() / m.sum().clamp(min=1)
    n_col = 1 + len(COLORS)
    seg = aux["seg"]
    dense = F.cross_entropy(seg[:, :n_col], targets["colour_map"]) + F.cross_entropy(
        seg[:, n_col:], targets["shape_map"], ignore_index=IGNORE)
    partial = F.binary_cross_entropy_with_logits(aux["partial"], targets["partial"])
    return w_partial * partial + aux_loss + dense


def _default_pool_path(model: str, seed: int, n_train: int, n_eval: int, steps: int) -> Path:
    root = Path(os.environ.get("VISALIGN_CACHE", Path.home() / ".cache" / "visalign")) / "toy_pools"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model))[-60:]
    return root / f"{name}-s{seed}-{n_train}+{n_eval}-{steps}steps.safetensors"


def training_data(seed: int = 0, log=print, model: str | None = "toy-shapes", pool: str | None = None,
                  pool_train: int = 1500, pool_eval: int = 480, pool_steps: int = 10, renderer: int = 6000,
                  renderer_eval: int = 480, pool_share: float = 0.5, tags: Sequence[str] | None = None,
                  w_partial: float = 0.5) -> dict:
    """The kit's data provider for ``shapes-proxy`` (``data: {provider: shapes-proxy, options: ...}``).

    Args:
        model (`str`, *optional*): base model whose samples make the pool (``toy-shapes`` or a
            folder); ``None``: renderer images only, held out on renderer images of eval prompts.
        pool (`str`, *optional*): the pool file; made with :func:`make_pool` when absent, reused
            when present (and made from ``model``).  Default: under ``$VISALIGN_CACHE/toy_pools``.
        pool_train, pool_eval (`int`): base-model samples of train prompts (trained on) and of eval
            prompts (held out); ``pool_steps`` ODE steps, CFG 3.
        renderer (`int`): renderer images of train prompts (half hard negatives), drawn once.
        renderer_eval (`int`): without a model, held-out renderer images of eval prompts.
        pool_share (`float`): expected share of pool samples in each batch.
        tags: train on these prompt categories only (renderer images); default all.

    Returns the kit's provider mapping: ``train`` and ``val`` (uint8 images, prompts, strict
    verdicts as targets, the auxiliary targets as extras), ``sample_probs``, ``extra_loss`` and
    ``report`` (held-out AUC by category and on the held-out compositions).
    """
    if not 0.0 <= pool_share < 1.0:
        raise ValueError(f"pool_share must be in [0, 1), got {pool_share}")
    if model is None and not renderer:
        raise ValueError("shapes-proxy data: without a model (no pool) renderer must be > 0")
    t0 = time.time()
    tensors = info = None
    pool_path = None
    if model is not None:
        pool_path = Path(pool) if pool else _default_pool_path(model, seed, pool_train, pool_eval, pool_steps)
        if pool_path.is_file():
            tensors, info = read_pool(pool_path)
            if info["model"] != str(model):
                raise ValueError(f"{pool_path} holds samples of {info['model']!r}, not {model!r}: delete it, pass "
                                 "another pool path, or set model to the pool's")
            log(f"pool: reusing {pool_path} ({len(info['prompts'])} samples)")
        else:
            make_pool(pool_path, model, pool_train, pool_eval, seed=seed, num_steps=pool_steps, log=log)
            tensors, info = read_pool(pool_path)
    t_pool = time.time() - t0
    t1 = time.time()
    rx, rp, ry = renderer_set(renderer, seed, tags) if renderer else (None, [], None)
    log(f"renderer: {renderer} labelled images in {time.time() - t1:.0f}s")

    def part(idx):
        return {"images": tensors["images"][idx], "prompts": [info["prompts"][i] for i in idx.tolist()],
                "targets": tensors["strict"][idx].float(), "extras": {k: tensors[k][idx] for k in _EXTRAS}}

    if tensors is None:
        vx, vp, vy, _ = _renderer_batch(_balanced(_by_tag("eval", tags), renderer_eval, np.random.default_rng([seed, 11])),
                                        np.random.default_rng([seed, 12]))
        val = {"images": (vx * 255).round().to(torch.uint8), "prompts": vp, "targets": vy["strict"],
               "extras": {k: vy[k] for k in _EXTRAS}}
        return {"train": {"images": rx, "prompts": rp, "targets": ry["strict"], "extras": {k: ry[k] for k in _EXTRAS}},
                "val": val, "extra_loss": lambda aux, targets: extra_loss(aux, targets, w_partial)}
    tr = torch.nonzero(~tensors["is_eval"]).flatten()
    ev = torch.nonzero(tensors["is_eval"]).flatten()
    train = part(tr)
    if rx is not None:
        train = {"images": torch.cat([rx, train["images"]]), "prompts": rp + train["prompts"],
                 "targets": torch.cat([ry["strict"], train["targets"]]),
                 "extras": {k: torch.cat([ry[k], train["extras"][k]]) for k in _EXTRAS}}
    n_r, n_p = len(rp), len(tr)
    probs = None
    if n_r and n_p:
        probs = torch.cat([torch.full((n_r,), (1 - pool_share) / n_r), torch.full((n_p,), pool_share / n_p)])
    val = part(ev)
    val_tags = np.array([info["tags"][i] for i in ev.tolist()])
    held = tensors["heldout"][ev].numpy()
    gold = val["targets"].numpy() > 0.5

    def report(scores: np.ndarray) -> dict:
        return {"heldout_auc_by_tag": {t: roc_auc(scores[val_tags == t], gold[val_tags == t]) for t in TAGS},
                "heldout_auc_unseen_compositions": roc_auc(scores[held], gold[held]),
                "heldout_gold_pass_rate": float(gold.mean()), "pool_seconds": round(t_pool, 1),
                "renderer_images": n_r, "pool_train": n_p, "pool_eval": len(ev), "pool": str(pool_path)}

    return {"train": train, "val": val, "sample_probs": probs, "report": report,
            "extra_loss": lambda aux, targets: extra_loss(aux, targets, w_partial)}
