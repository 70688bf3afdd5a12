"""Renderer of the shapes world: draws a scene that satisfies a prompt's metadata.

Scenes are flat, non-overlapping, axis-aligned shapes (circle, square, upright triangle) in palette
colours on a light, plain background tint.  Shapes are drawn as exact masks on a 4x supersampled
grid and box-filtered down, which antialiases the edges.  All randomness comes from the
``numpy.random.Generator`` the caller passes, so a seed fixes the image.

The default resolution is 32 px (docs/toy_world.md explains why): large enough that four shapes
of 7-10 px stay legible and classifiable, small enough that the toy model trains on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from .prompts import COLORS, SHAPES

__all__ = ["Obj", "Scene", "RESOLUTION", "sample_scene", "draw", "render", "render_batch", "relations"]

RESOLUTION = 32
SUPERSAMPLE = 4
GAP = 2.0  # minimal gap between two objects' boxes, in output pixels
MARGIN = 1.0  # minimal distance from a box to the image border, in output pixels
# Object size range (output pixels at 32 px) by the number of objects in the scene.
_SIZES = {1: (9.0, 15.0), 2: (9.0, 13.0), 3: (8.0, 11.0), 4: (7.0, 10.0)}
_COLOR_JITTER = 0.04
_MAX_TRIES = 2000


@dataclass(frozen=True)
class Obj:
    """One shape, in output-pixel units at the scene's resolution (x to the right, y down)."""

    shape: str
    color: tuple[float, float, float]
    cx: float
    cy: float
    size: float  # width of the box; height is the same (the triangle's base equals its height)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[float, float, float]
    resolution: int = RESOLUTION


def relations(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Position of box A relative to box B, GenEval's rule (``relative_position`` in GenEval's
    ``evaluate_images.py``): shrink the centre offset by ``threshold`` times the summed box sizes,
    normalise by the offset length, and report each axis whose component exceeds 0.5.
    Boxes are ``(x0, y0, x1, y1)`` with y pointing down."""
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    off = ca - cb
    rev = np.maximum(np.abs(off) - threshold * dims, 0.0) * np.sign(off)
    if np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / np.linalg.norm(off)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def _clear_relation(box_a, box_b, rel: str) -> bool:
    """Stricter than :func:`relations`: the relation holds with a margin and no other one does."""
    return relations(box_a, box_b, threshold=0.25) == {rel}


def _separated(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def _color(name: str | None, rng: np.random.Generator) -> tuple[float, float, float]:
    if name is None:
        name = list(COLORS)[int(rng.integers(len(COLORS)))]
    base = np.asarray(COLORS[name])
    return tuple(np.clip(base + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3), 0, 1).tolist())


def sample_scene(meta: Mapping, rng: np.random.Generator, resolution: int = RESOLUTION) -> Scene:
    """A random scene that satisfies ``meta`` (GenEval-style metadata of :mod:`.prompts`).

    Clauses without a colour get a random palette colour; a ``position`` clause is placed so that
    the relation holds clearly (and no other relation does) under GenEval's rule.
    """
    specs: list[tuple[str, str | None]] = []
    groups: list[list[int]] = []
    for clause in meta["include"]:
        if clause["class"] not in SHAPES:
            raise ValueError(f"cannot render class {clause['class']!r}: shapes are {list(SHAPES)}")
        idx = []
        for _ in range(int(clause["count"])):
            idx.append(len(specs))
            specs.append((clause["class"], clause.get("color")))
        groups.append(idx)
    n = len(specs)
    if not 1 <= n <= 4:
        raise ValueError(f"cannot render {n} objects for prompt {meta.get('prompt')!r}: 1 to 4 supported")
    scale = resolution / RESOLUTION
    lo, hi = (v * scale for v in _SIZES[n])
    constraints = [
        (gi, ref, clause["position"][0])
        for gi, clause in enumerate(meta["include"])
        if "position" in clause
        for ref in [int(clause["position"][1])]
    ]
    bg = tuple(rng.uniform(0.82, 1.0, 3).tolist())
    m = MARGIN * scale
    for _ in range(_MAX_TRIES):
        objs: list[Obj] = []
        for shape, cname in specs:
            size = float(rng.uniform(lo, hi))
            cx = float(rng.uniform(m + size / 2, resolution - m - size / 2))
            cy = float(rng.uniform(m + size / 2, resolution - m - size / 2))
            objs.append(Obj(shape, _color(cname, rng), cx, cy, size))
        if not all(_separated(a, b) for a, b in zip_pairs(objs)):
            continue
        if all(
            _clear_relation(objs[i].box, objs[j].box, rel)
            for g, ref, rel in constraints
            for i in groups[g]
            for j in groups[ref]
        ):
            return Scene(tuple(objs), bg, resolution)
    raise RuntimeError(f"could not place the objects of {meta.get('prompt')!r} in {_MAX_TRIES} tries")


def zip_pairs(objs: Sequence[Obj]):
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            yield objs[i], objs[j]


def _mask(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of ``obj`` at supersampled pixel centres ``xs`` (W,) and ``ys`` (H,)."""
    x = xs[None, :] - obj.cx
    y = ys[:, None] - obj.cy
    h = obj.size / 2
    if obj.shape == "circle":
        return x * x + y * y <= h * h
    if obj.shape == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if obj.shape == "triangle":  # apex at the top centre, base at the bottom; base == height
        t = (y + h) / (2 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x) <= t * h)
    raise ValueError(f"unknown shape {obj.shape!r}: shapes are {list(SHAPES)}")


def draw(scene: Scene) -> np.ndarray:
    """Rasterise a scene: float32 ``(3, H, W)`` in ``[0, 1]``, antialiased by 4x supersampling."""
    res, ss = scene.resolution, SUPERSAMPLE
    img = np.empty((res * ss, res * ss, 3), np.float32)
    img[:] = np.asarray(scene.background, np.float32)
    centres = (np.arange(res * ss, dtype=np.float32) + 0.5) / ss
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        c0, r0 = max(int(np.floor(x0 * ss)) - 1, 0), max(int(np.floor(y0 * ss)) - 1, 0)
        c1, r1 = min(int(np.ceil(x1 * ss)) + 1, res * ss), min(int(np.ceil(y1 * ss)) + 1, res * ss)
        mk = _mask(obj, centres[c0:c1], centres[r0:r1])
        img[r0:r1, c0:c1][mk] = np.asarray(obj.color, np.float32)
    img = img.reshape(res, ss, res, ss, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def render(meta: Mapping, rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """Draw a random scene satisfying ``meta``: float32 ``(3, H, W)`` in ``[0, 1]``."""
    return draw(sample_scene(meta, rng, resolution))


def render_batch(metas: Sequence[Mapping], rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """:func:`render` for each metadata dict: float32 ``(B, 3, H, W)``."""
    return np.stack([render(m, rng, resolution) for m in metas])


def with_objects(scene: Scene, objects: Sequence[Obj]) -> Scene:
    """A copy of ``scene`` with other objects (for crafting wrong images in tests)."""
    return replace(scene, objects=tuple(objects))
