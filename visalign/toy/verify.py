"""The gold verifier of the shapes world: finds objects from pixels and checks every clause.

Pipeline per image (all at the working resolution, 32 px; any input size is resized first):

1. **Background**: the per-channel median of the one-pixel border.
2. **Colour segmentation**: every pixel ``p`` is explained as a blend of the background ``b`` and
   one palette colour ``c_k``: ``alpha_k = <p - b, c_k - b> / |c_k - b|^2`` (clipped to [0, 1]),
   residual ``r_k = |p - b - alpha_k (c_k - b)|``.  The pixel takes the colour with the smallest
   residual and is foreground when that colour's ``alpha >= 0.5`` and ``r < 0.3``.  Blending along
   the line to the background (not nearest-palette colour) keeps antialiased edges of a red shape
   from reading as another colour.
3. **Objects**: 8-connected foreground components (``scipy.ndimage.label``) of at least
   :data:`MIN_AREA` pixels, coloured by majority (GenEval detects first, then classifies colour);
   a component that is no known shape and holds several colours (touching objects) is split into
   its per-colour components.
4. **Shape**: moments of the component's soft mask (the colour's alpha), which blur and noise
   barely move: the diagonal-over-axis kurtosis ratio (square 4/3, disc 1), the skewness of the
   vertical marginal (upright triangle -0.57, others 0) and the elongation var_x / var_y.  Blobs
   too elongated or skewed the wrong way are ``"unknown"`` and match no class.
5. **Clauses** (GenEval metadata, see :mod:`.prompts`): objects of the clause's class are
   ``found``.  Strict pass needs ``found == count`` for every include clause, every found object of
   a coloured clause in that colour, every position relation to hold (GenEval's
   ``relative_position`` rule, :func:`.render.relations`) and no exclude clause reached.
   Partial credit is Flow-GRPO's GenEval reward: per include clause ``max(0, 1 - |count - found| /
   count)``, plus a 0/1 term per colour clause (at least ``count`` found objects in the colour) and
   per position clause, averaged over the terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .prompts import COLORS, parse_prompt
from .render import relations

__all__ = ["Detected", "Verdict", "WORK_RES", "MIN_AREA", "to_work", "detect", "detect_batch", "check", "verify"]

WORK_RES = 32
MIN_AREA = 8  # pixels at 32 px; the smallest rendered object (a 7 px triangle) covers about 24
_PALETTE = np.asarray(list(COLORS.values()), np.float32)  # (K, 3)
_NAMES = list(COLORS)
_ALPHA_MIN = 0.5
_RESID_MAX = 0.3
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Detected:
    shape: str  # one of SHAPES or "unknown"
    color: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in working pixels, x1/y1 exclusive
    area: int
    kurtosis_ratio: float
    skew: float


@dataclass
class Verdict:
    strict: bool
    partial: float
    terms: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def to_work(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images ``(B, 3, H, W)`` (or one ``(3, H, W)``) in [0, 1], any size -> float32
    ``(B, WORK_RES, WORK_RES, 3)``.  Downsizing averages areas; upsizing is bilinear."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"the shapes verifier takes images (B, 3, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) != (WORK_RES, WORK_RES):
        if h >= WORK_RES and w >= WORK_RES:
            x = F.adaptive_avg_pool2d(x, WORK_RES)
        else:
            x = F.interpolate(x, size=(WORK_RES, WORK_RES), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.clamp(0, 1).permute(0, 2, 3, 1).numpy())


def _segment(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour label (-1 = background) ``(B, H, W)`` and the alpha of each pixel's best colour
    ``(B, H, W)`` for a batch ``(B, H, W, 3)``."""
    b, h, w, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (B, P, 3)
    bg = np.median(border, axis=1)  # (B, 3)
    p = x.reshape(b, -1, 3) - bg[:, None, :]  # (B, N, 3)
    d = _PALETTE[None] - bg[:, None, :]  # (B, K, 3)
    pd = p @ d.transpose(0, 2, 1)  # (B, N, K)
    dd = (d * d).sum(-1)[:, None, :]  # (B, 1, K)
    alpha = np.clip(pd / np.maximum(dd, 1e-6), 0.0, 1.0)  # (B, N, K)
    # |p - alpha d|^2 expanded, to avoid a (B, N, K, 3) temporary
    resid2 = (p * p).sum(-1)[..., None] - 2 * alpha * pd + alpha * alpha * dd  # (B, N, K)
    k = resid2.argmin(-1)  # (B, N)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    r = np.sqrt(np.maximum(np.take_along_axis(resid2, k[..., None], -1)[..., 0], 0.0))
    label = np.where((a >= _ALPHA_MIN) & (r < _RESID_MAX), k, -1)
    return label.reshape(b, h, w), a.reshape(b, h, w)


def _moments(a: np.ndarray) -> tuple[float, float, float]:
    """Shape features of a soft mask ``a`` (alpha in [0, 1]): (kurtosis ratio, skewness of y,
    elongation).  Moments of the soft mask barely move under blur and noise, unlike box fill.

    - kurtosis ratio: mean kurtosis of the projections on the two diagonals over that on the two
      axes; a square's axis marginal is uniform (kurtosis 1.8) and its diagonal one triangular
      (2.4), ratio 4/3; a disc is isotropic (ratio 1).
    - skewness of the vertical marginal: an upright triangle's width grows linearly downwards,
      density 2y on [0, 1], skewness -0.57 (y down); circle and square 0.
    - elongation: var_x / var_y (1 for circle and square, 0.75 for the triangle).
    """
    h, w = a.shape
    m = a.sum()
    wgt = (a / m).ravel()
    ys, xs = np.mgrid[0:h, 0:w]
    x = xs.ravel() - wgt @ xs.ravel()
    y = ys.ravel() - wgt @ ys.ravel()
    x2, y2 = x * x, y * y
    # all the central moments needed, in one product: E[x^i y^j]
    mx2, my2, mxy, mx4, my4, mx3y, mxy3, mx2y2, my3 = np.stack(
        [x2, y2, x * y, x2 * x2, y2 * y2, x2 * x * y, x * y2 * y, x2 * y2, y2 * y]
    ) @ wgt
    if mx2 <= 1e-6 or my2 <= 1e-6:
        return 1.0, 0.0, 0.0
    skew = my3 / my2**1.5
    # projections on the diagonals u = (x +- y) / sqrt(2): E[u^2] and E[u^4] from the moments above
    var_d1, var_d2 = (mx2 + 2 * mxy + my2) / 2, (mx2 - 2 * mxy + my2) / 2
    quart = mx4 + 6 * mx2y2 + my4
    k_d1 = (quart + 4 * mx3y + 4 * mxy3) / 4 / var_d1**2
    k_d2 = (quart - 4 * mx3y - 4 * mxy3) / 4 / var_d2**2
    ratio = (k_d1 + k_d2) / (mx4 / mx2**2 + my4 / my2**2)
    return float(ratio), float(skew), float(mx2 / my2)


def _classify(ratio: float, skew: float, elong: float) -> str:
    # Thresholds sit between the classes' ranges measured on clean and blurred renders
    # (docs/toy_world.md): ratio circle/triangle 0.94-1.10, square 1.17-1.36; skew triangle
    # < -0.24, others |skew| < 0.07; elongation 0.68-1.18 for all.
    if not 0.45 <= elong <= 2.2 or skew > 0.3:
        return "unknown"
    if skew < -0.2:
        return "triangle"
    return "square" if ratio > 1.15 else "circle"


def _describe(obj: np.ndarray, big: tuple[slice, slice], label: np.ndarray, alpha: np.ndarray) -> Detected:
    """One object from its boolean mask ``obj`` inside the window ``big`` of the image."""
    # The soft mask: alpha on the object grown by one pixel (its antialiased rim), leaving out
    # pixels that belong to other objects.
    grown = ndimage.binary_dilation(obj, structure=_EIGHT)
    soft = alpha[big] * (grown & (obj | (label[big] < 0)))
    ratio, skew, elong = _moments(soft)
    counts = np.bincount(label[big][obj], minlength=len(_NAMES))
    rows, cols = np.nonzero(obj.any(1))[0], np.nonzero(obj.any(0))[0]
    y0, x0 = big[0].start + rows[0], big[1].start + cols[0]
    box = (float(x0), float(y0), float(big[1].start + cols[-1] + 1), float(big[0].start + rows[-1] + 1))
    return Detected(_classify(ratio, skew, elong), _NAMES[int(counts.argmax())], box, int(obj.sum()), ratio, skew)


def _objects(label: np.ndarray, alpha: np.ndarray) -> list[Detected]:
    """Objects of one image: ``label`` (H, W) colour index or -1, ``alpha`` (H, W) of that colour.

    Objects are connected foreground regions whatever their colours, coloured by majority, as
    GenEval detects an object first and classifies its colour second: a generated square shaded
    from blue to cyan is one square.  A region that is no known shape and holds several colours
    (two objects that touch) is split into one object per colour.
    """
    out: list[Detected] = []
    h, w = label.shape
    comp, _ = ndimage.label(label >= 0, structure=_EIGHT)
    for i, sl in enumerate(ndimage.find_objects(comp), start=1):
        big = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, (h, w)))
        own = comp[big] == i
        if own.sum() < MIN_AREA:
            continue
        det = _describe(own, big, label, alpha)
        colours = np.unique(label[big][own])
        if det.shape != "unknown" or len(colours) == 1:
            out.append(det)
            continue
        for k in colours:
            sub, n = ndimage.label(own & (label[big] == k), structure=_EIGHT)
            for j in range(1, n + 1):
                part = sub == j
                if part.sum() >= MIN_AREA:
                    out.append(_describe(part, big, label, alpha))
    return out


def detect_batch(images: torch.Tensor | np.ndarray) -> list[list[Detected]]:
    """Objects found in each image of a batch (any size, values in [0, 1])."""
    labels, alphas = _segment(to_work(images))
    return [_objects(lab, al) for lab, al in zip(labels, alphas)]


def detect(image: torch.Tensor | np.ndarray) -> list[Detected]:
    """Objects found in one image ``(3, H, W)``."""
    return detect_batch(image)[0]


def check(objects: Sequence[Detected], meta: Mapping) -> Verdict:
    """Score detected objects against GenEval-style metadata (see the module docstring)."""
    include = meta["include"]
    strict, terms, reasons = True, [], []
    groups: list[list[Detected] | None] = []
    for clause in include:
        cls, count, color = clause["class"], int(clause["count"]), clause.get("color")
        found = [o for o in objects if o.shape == cls]
        # Two clauses of one class ("a red circle and a blue circle") are told apart by colour.
        if color is not None and sum(c["class"] == cls for c in include) > 1:
            found = [o for o in found if o.color == color]
        ok = len(found) == count
        terms.append(max(0.0, 1.0 - abs(count - len(found)) / count))
        if not ok:
            reasons.append(f"expected {count} {cls}, found {len(found)}")
        if color is not None:
            n_col = sum(o.color == color for o in found)
            terms.append(1.0 if n_col >= count else 0.0)
            if n_col < count or (ok and n_col != len(found)):
                ok = False
                reasons.append(f"expected {cls} in {color}, found {[o.color for o in found]}")
        if "position" in clause:
            rel, ref = clause["position"][0], int(clause["position"][1])
            target = groups[ref] if ref < len(groups) else None
            pos_ok = bool(ok and target and all(rel in relations(o.box, t.box) for o in found for t in target))
            terms.append(1.0 if pos_ok else 0.0)
            if not pos_ok:
                ok = False
                reasons.append(f"expected {cls} {rel} {include[ref]['class']}")
        strict &= ok
        groups.append(found if ok else None)
    for clause in meta.get("exclude", []):
        n = sum(o.shape == clause["class"] for o in objects)
        if n >= int(clause["count"]):
            strict = False
            reasons.append(f"expected fewer than {clause['count']} {clause['class']}, found {n}")
    return Verdict(bool(strict), float(np.mean(terms)) if terms else 0.0, terms, reasons)


def verify(
    images: torch.Tensor | np.ndarray,
    prompts: Sequence[str] | None = None,
    metadata: Sequence[Mapping] | None = None,
) -> list[Verdict]:
    """Verdicts for a batch; metadata from ``metadata`` if given, else parsed from ``prompts``.

    Raises:
        ValueError: a prompt is outside the grammar (callers that must not fail, like the
            ``shapes`` reward, parse first and mark such samples invalid).
    """
    if metadata is None:
        if prompts is None:
            raise ValueError("verify() needs prompts=[...] or metadata=[...] (one per image)")
        metadata = [parse_prompt(p) for p in prompts]
    objects = detect_batch(images)
    if len(metadata) != len(objects):
        raise ValueError(f"verify(): {len(objects)} images but {len(metadata)} prompts/metadata")
    return [check(o, m) for o, m in zip(objects, metadata)]


