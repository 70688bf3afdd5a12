"""``shapes-proxy``: a small learned, differentiable reward for the shapes world.

The gold verifier (:mod:`.verify`) segments and counts, so it has no gradient.  The proxy is a
small network that predicts the verifier's verdict from pixels and prompt text, so reward-gradient
methods (DRaFT / AlignProp / ReFL, reward guidance) have something to differentiate, and
optimising it hard while watching the gold verifier measures reward hacking (Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization").

Model (:class:`ShapesProxy`, about 0.3 M parameters, 1.2 MB in float32):

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
- **head**: an MLP on ``[z * W t, z, t]`` (a bilinear prompt-scene interaction) to two outputs,
  the logit of P(strict pass) and the logit of the verifier's partial credit.
- **auxiliary heads** (training only): from ``z`` the per-(shape, colour) object counts and each
  shape's mean centre; from the 16 px features a per-pixel colour map and shape map.  Their targets
  are the gold verifier's own detections; without them the verdict alone, one bit per image, left
  the network at chance for hundreds of steps.

Training (:func:`train_proxy`) labels every image with the gold verifier: renderer images of train
prompts (mostly passes), renderer images of a mutated prompt paired with the original one (hard
negatives: another colour, swapped colours, another shape, count or relation, a dropped object),
and a cached pool of base-model samples.  Loss: binary cross-entropy on the strict verdict, plus
0.5 x binary cross-entropy of the partial logit against the partial credit (a soft label in
[0, 1]), plus the auxiliary losses (MSE on counts and centres, cross-entropy on the two maps).
The reported number is the ROC AUC of P(strict) against the verdicts on held-out base-model
samples of the eval split (fresh noise, all 243 prompts including the held-out compositions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .prompts import COLORS, SHAPES, TAGS, by_tag, mutate, split, vocabulary
from .render import render
from .verify import Detected, check, to_work
from .verify import _objects, _segment  # the verifier's own segmentation, for dense targets

__all__ = [
    "ProxyConfig",
    "ShapesProxy",
    "build",
    "save",
    "load",
    "resize_to_work",
    "mutate",
    "roc_auc",
    "make_pool",
    "train_proxy",
]

WORK_RES = 32
SPECIALS = ("<pad>", "<cls>", "<unk>")
CONFIG_NAME, WEIGHTS_NAME, POOL_NAME = "config.json", "model.safetensors", "pool.safetensors"
ARCH = "ShapesProxy"
#: scene head outputs: object counts per (shape, colour), then mean centre (x, y) per shape
N_AUX = len(SHAPES) * len(COLORS) + 2 * len(SHAPES)
N_SEG = (1 + len(COLORS)) + (1 + len(SHAPES))  # dense classes: colour map, then shape map
IGNORE = -100


@dataclass
class ProxyConfig:
    """Architecture of the proxy; saved as ``config.json`` beside the weights."""

    width: int = 48  # conv channels at 16 px; 2x at 8 px
    text_dim: int = 64  # token / prompt embedding size
    text_layers: int = 2  # transformer encoder layers
    text_heads: int = 4
    hidden: int = 128  # head MLP width
    max_tokens: int = 16  # <cls> + words; the grammar's longest prompt has 10 words
    vocab: list[str] = field(default_factory=lambda: list(SPECIALS) + vocabulary())

    def __post_init__(self) -> None:
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim must be divisible by text_heads: got {self.text_dim} and {self.text_heads}")
        if list(self.vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocab must start with the special tokens {SPECIALS}; got {self.vocab[:3]}")


def normalize_prompt(text: str) -> list[str]:
    """Words of a prompt as :func:`.prompts.parse_prompt` reads it (case, full stop, "a photo of")."""
    words = text.lower().strip().rstrip(".").split()
    if words[:3] == ["a", "photo", "of"] and len(words) > 3:
        words = words[3:]
    return words


class ShapesProxy(nn.Module):
    """Prompt-conditioned CNN predicting the gold verifier's verdict (see the module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.config = config
        c, d = config.width, config.text_dim
        self._index = {w: i for i, w in enumerate(config.vocab)}
        self.tok_emb = nn.Embedding(len(config.vocab), d)
        self.pos_emb = nn.Parameter(torch.zeros(config.max_tokens, d))
        layer = nn.TransformerEncoderLayer(d, config.text_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(d)
        chans = [(12 + 2, c), (c, c), (c, 2 * c), (2 * c, 2 * c)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in chans)
        # dense head on the 16 px features: per-pixel colour (background + palette) and shape
        # (background + SHAPES) logits for the 2x2 pixels of each location
        self.seg = nn.Conv2d(c, 4 * N_SEG, 1)
        self.scene = nn.Sequential(nn.Linear(4 * c, config.hidden), nn.SiLU())
        self.aux = nn.Linear(config.hidden, N_AUX)
        self.gate = nn.Linear(d, config.hidden)
        self.head = nn.Sequential(nn.Linear(2 * config.hidden + d, config.hidden), nn.SiLU(),
                                  nn.Linear(config.hidden, 2))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, L)`` and padding mask ``(B, L)`` (True = padding); unknown words -> ``<unk>``."""
        n = self.config.max_tokens
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
        """Logits ``(B, 2)``: ``[:, 0]`` P(strict pass), ``[:, 1]`` partial credit; images in [0, 1].
        With ``return_aux``, also the scene head's predictions ``(B, N_AUX)`` and the dense logits
        ``(B, N_SEG, 32, 32)`` (see :func:`scene_labels`)."""
        z, seg = self.encode_images(images, dense=True) if return_aux else (self.encode_images(images), None)
        t = self.embed_prompts(prompts)  # (B, D)
        logits = self.head(torch.cat([z * self.gate(t), z, t], 1))  # bilinear prompt-scene interaction
        return (logits, self.aux(z), seg) if return_aux else logits


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
# Build / save / load
# ----------------------------------------------------------------------------------------------


def build(config: ProxyConfig | None = None, seed: int = 0) -> ShapesProxy:
    """A fresh proxy, initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Module initialisers draw from the global generator
        return ShapesProxy(config or ProxyConfig())


def save(model: ShapesProxy, out_dir: str | os.PathLike, extra: Mapping | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / (WEIGHTS_NAME + ".tmp")), metadata={"format": "pt"})
    (out / (WEIGHTS_NAME + ".tmp")).replace(out / WEIGHTS_NAME)
    cfg = {"architecture": ARCH, **asdict(model.config), **(dict(extra) if extra else {})}
    (out / (CONFIG_NAME + ".tmp")).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / (CONFIG_NAME + ".tmp")).replace(out / CONFIG_NAME)
    return out


def load(path: str | os.PathLike) -> ShapesProxy:
    """Load a proxy saved by :func:`save` (strict: every key present, no extra ones), in eval mode."""
    from safetensors.torch import load_file

    root = Path(path)
    cfg_file, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no shapes-proxy at {str(root)!r}: expected {CONFIG_NAME} and {WEIGHTS_NAME}. "
            "Train one with `visalign toy train-proxy --out DIR` and pass path=DIR."
        )
    raw = json.loads(cfg_file.read_text())
    if raw.get("architecture") != ARCH:
        raise ValueError(f"{cfg_file} describes a {raw.get('architecture')!r}, not a {ARCH}")
    fields = ProxyConfig.__dataclass_fields__
    model = ShapesProxy(ProxyConfig(**{k: v for k, v in raw.items() if k in fields}))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Data: hard negatives from the grammar, the base-model pool, ROC AUC
# ----------------------------------------------------------------------------------------------

def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a positive > score of a negative), ties
    counting one half (Hanley & McNeil 1982).  NaN when one class is empty."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    import visalign.samplers as vs
    from safetensors.torch import save_file

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


def _read_pool(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

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


def _loss(net: ShapesProxy, x: torch.Tensor, prompts: Sequence[str], y: Mapping[str, torch.Tensor],
          w_partial: float, w_aux: float) -> torch.Tensor:
    """BCE on the strict verdict + ``w_partial`` BCE of the partial logit against the partial
    credit + ``w_aux`` times the scene losses: masked MSE of the counts and centres, per-pixel
    cross-entropy of the colour and shape maps (all targets from the gold verifier)."""
    logits, aux, seg = net(x, prompts, return_aux=True)
    bce = F.binary_cross_entropy_with_logits
    m = y["aux_mask"].float()
    aux_loss = (((aux - y["aux"]) ** 2) * m).sum() / m.sum().clamp(min=1)
    n_col = 1 + len(COLORS)
    dense = F.cross_entropy(seg[:, :n_col], y["colour_map"]) + F.cross_entropy(
        seg[:, n_col:], y["shape_map"], ignore_index=IGNORE)
    main = bce(logits[:, 0], y["strict"]) + w_partial * bce(logits[:, 1], y["partial"])
    return main + w_aux * (aux_loss + dense)


@torch.no_grad()
def _predict(model: ShapesProxy, images: torch.Tensor, prompts: Sequence[str], batch: int = 256) -> torch.Tensor:
    outs = [model(images[k:k + batch], prompts[k:k + batch]) for k in range(0, len(prompts), batch)]
    return torch.cat(outs) if outs else torch.zeros(0, 2)


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


@contextlib.contextmanager
def _num_threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_proxy(
    out_dir: str | os.PathLike,
    model: str | None = "toy-shapes",
    steps: int = 1200,
    seed: int = 0,
    batch: int = 64,
    pool_fraction: float = 0.5,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    w_partial: float = 0.5,
    w_aux: float = 1.0,
    pool_train: int = 1500,
    pool_eval: int = 480,
    pool_steps: int = 10,
    renderer_eval: int = 480,
    config: ProxyConfig | None = None,
    tags: Sequence[str] | None = None,
    log_every: int = 50,
    threads: int | None = 1,
    log=print,
) -> dict:
    """Train the proxy; write it to ``out_dir`` (``config.json``, ``model.safetensors``) with
    ``metrics.json`` and ``log.jsonl``; return the metrics.

    Args:
        model (`str`, *optional*): the base model (``toy-shapes`` or a folder) whose samples make
            the pool, cached in ``out_dir/pool.safetensors`` (reused when present and made from the
            same model).  ``None``: renderer data only, no base-model AUC.
        steps (`int`): AdamW steps; ``batch`` images each, ``pool_fraction`` of them from the pool.
        lr (`float`): peak learning rate; linear warm-up over 5% of the steps, cosine decay to 0.
        w_partial (`float`): weight of the partial-credit loss.
        w_aux (`float`): weight of the scene head's loss (counts and centres of the verifier's
            detections); it teaches the image tower what the verdict depends on.
        pool_train, pool_eval (`int`): base-model samples of train prompts (trained on) and of
            eval prompts (held out for the ROC AUC); ``pool_steps`` ODE steps, CFG 3.0.
        renderer_eval (`int`): held-out renderer images (eval prompts, half hard negatives).
        tags (`Sequence[str]`, *optional*): train (and test on renderer images) only these prompt
            categories; default all of :data:`.prompts.TAGS`.  The base-model pool is not filtered.
        threads (`int`, *optional*): ``torch.set_num_threads`` while training (restored after);
            1 keeps a shared machine usable, ``None`` leaves the setting alone.
    """
    with _num_threads(threads):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        pool = info = None
        if model is not None:
            pool_path = out / POOL_NAME
            if pool_path.is_file():
                pool, info = _read_pool(pool_path)
                if info["model"] != str(model):
                    raise ValueError(f"{pool_path} holds samples of {info['model']!r}, not {model!r}: "
                                     "delete it or use another --out")
                log(f"pool: reusing {pool_path} ({len(info['prompts'])} samples)")
            else:
                make_pool(pool_path, model, pool_train, pool_eval, seed=seed, num_steps=pool_steps, log=log)
                pool, info = _read_pool(pool_path)
        t_pool = time.time() - t_start
        train_idx = torch.nonzero(~pool["is_eval"]).flatten() if pool else torch.zeros(0, dtype=torch.long)
        n_pool = int(round(batch * pool_fraction)) if len(train_idx) else 0

        net = build(config, seed).train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(steps, 1)))))
        train_by_tag = _by_tag("train", tags)
        g = torch.Generator().manual_seed(seed)
        logf = open(out / "log.jsonl", "w")
        losses, t0 = [], time.time()
        for step in range(steps):
            rng = np.random.default_rng([seed, step, 3])
            x, prompts, y, _ = _renderer_batch(_balanced(train_by_tag, batch - n_pool, rng), rng)
            if n_pool:
                idx = train_idx[torch.randint(len(train_idx), (n_pool,), generator=g)]
                x = torch.cat([x, pool["images"][idx].float() / 255])
                prompts = prompts + [info["prompts"][i] for i in idx.tolist()]
                y = {k: torch.cat([v, pool[k][idx]]) for k, v in y.items()}
            loss = _loss(net, x, prompts, y, w_partial, w_aux)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                rec = {"step": step + 1, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                       "elapsed_s": round(time.time() - t0, 1)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(f"step {step + 1}/{steps} loss {rec['loss']:.4f} ({rec['elapsed_s']:.0f}s)")
                losses = []
        logf.close()
        t_train = time.time() - t0
        net.eval()
        metrics = {"steps": steps, "seed": seed, "batch": batch, "pool_fraction": pool_fraction if n_pool else 0.0,
                   "params": sum(p.numel() for p in net.parameters()), "pool_seconds": round(t_pool, 1),
                   "train_seconds": round(t_train, 1), "threads": torch.get_num_threads(),
                   "tags": list(tags) if tags is not None else list(TAGS)}
        rx, rp, rs, _ = renderer_eval_set(renderer_eval, seed + 1, tags)
        r_logit = _predict(net, rx, rp)[:, 0]
        metrics["renderer_auc"] = roc_auc(r_logit.numpy(), rs.numpy() > 0.5)
        metrics["renderer_positive_rate"] = float(rs.mean())
        if pool:
            ev = torch.nonzero(pool["is_eval"]).flatten()
            prompts = [info["prompts"][i] for i in ev.tolist()]
            logits = _predict(net, pool["images"][ev].float() / 255, prompts)
            gold, partial = pool["strict"][ev].numpy() > 0.5, pool["partial"][ev].numpy()
            p = torch.sigmoid(logits).numpy()
            sample_tags = np.array([info["tags"][i] for i in ev.tolist()])
            held = pool["heldout"][ev].numpy()
            metrics.update({
                "model": str(model),
                "pool_train": int(len(train_idx)), "pool_eval": int(len(ev)),
                "heldout_auc": roc_auc(p[:, 0], gold),
                "heldout_auc_unseen_compositions": roc_auc(p[:, 0][held], gold[held]),
                "heldout_accuracy_at_0.5": float(((p[:, 0] > 0.5) == gold).mean()),
                "heldout_gold_pass_rate": float(gold.mean()),
                "heldout_partial_mae": float(np.abs(p[:, 1] - partial).mean()),
                "heldout_partial_pearson": (float(np.corrcoef(p[:, 1], partial)[0, 1]) if partial.std() > 0
                                            else float("nan")),
                "heldout_auc_by_tag": {t: roc_auc(p[:, 0][sample_tags == t], gold[sample_tags == t]) for t in TAGS},
                "train_pool_gold_pass_rate": float(pool["strict"][train_idx].mean()),
            })
        headline = {k: metrics[k] for k in ("heldout_auc", "renderer_auc") if k in metrics}
        save(net, out, extra={"trained_on": str(model), "metrics": headline})
        metrics["weights_bytes"] = (out / WEIGHTS_NAME).stat().st_size
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
