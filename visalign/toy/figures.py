"""Image grids of the shapes world (docs figures and pretraining previews).

``python -m visalign.toy.figures docs/img`` writes one renderer grid per category
(``toy_<tag>.png``: 4 prompts x 4 seeds, upscaled 4x with nearest neighbour so pixels stay visible)
and, with ``--model toy-shapes [--lora DIR] [--name base]``, the model's samples of the same
prompts (``<name>_<tag>.png``; 10 ODE steps, CFG 3.0).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .prompts import TAGS, by_tag, split
from .render import render

__all__ = ["grid", "save_png", "category_grids", "model_grids"]


def grid(images: np.ndarray, nrow: int, pad: int = 2, scale: int = 4) -> np.ndarray:
    """Tile ``(N, 3, H, W)`` images in [0, 1] into one ``(H', W', 3)`` uint8 array, ``nrow`` per row,
    each upscaled ``scale`` times (nearest neighbour) with a white ``pad``."""
    images = np.asarray(images, np.float32)
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    big = np.kron(images, np.ones((1, 1, scale, scale), np.float32))
    hs, ws = h * scale + pad, w * scale + pad
    out = np.ones((rows * hs + pad, nrow * ws + pad, 3), np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * hs: pad + r * hs + h * scale, pad + c * ws: pad + c * ws + w * scale] = big[i].transpose(1, 2, 0)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _picks(seed: int, prompts_per_category: int):
    """The same prompts per category for renderer and model grids, and the rng that drew them."""
    rng = np.random.default_rng(seed)
    groups = by_tag(split("eval"))
    for tag in TAGS:
        g = groups[tag]
        yield tag, [g[i] for i in rng.choice(len(g), size=min(prompts_per_category, len(g)), replace=False)], rng


def category_grids(out_dir: str | Path, seed: int = 0, prompts_per_category: int = 4,
                   seeds: int = 4) -> list[Path]:
    """One renderer grid per category: rows are prompts of the eval split, columns seeds."""
    written = []
    for tag, pick, rng in _picks(seed, prompts_per_category):
        imgs = [render(m, rng) for m in pick for _ in range(seeds)]
        path = save_png(grid(np.stack(imgs), nrow=seeds), Path(out_dir) / f"toy_{tag}.png")
        (Path(out_dir) / f"toy_{tag}.txt").write_text("\n".join(m["prompt"] for m in pick) + "\n")
        written.append(path)
    return written


def model_grids(out_dir: str | Path, model: str = "toy-shapes", lora: str | None = None, name: str = "base",
                seed: int = 0, prompts_per_category: int = 4, seeds: int = 4) -> list[Path]:
    """The model's ODE samples of the renderer grids' prompts: rows prompts, columns seeds."""
    import visalign.samplers as vs

    sampler = vs.load(model)
    if lora:
        from visalign.samplers.lora import load_lora

        load_lora(sampler, lora)
    written = []
    for tag, pick, _ in _picks(seed, prompts_per_category):
        prompts = [m["prompt"] for m in pick for _ in range(seeds)]
        out = vs.collect(sampler, prompts, num_steps=10, guidance_scale=3.0, seeds=[k for _ in pick for k in range(seeds)])
        written.append(save_png(grid(out.images.numpy(), nrow=seeds), Path(out_dir) / f"{name}_{tag}.png"))
    return written


def _main(argv: Sequence[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="image grids of the shapes world")
    ap.add_argument("out", nargs="?", default="docs/img")
    ap.add_argument("--model", default=None, help="also draw this model's samples (e.g. toy-shapes)")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--name", default="base", help="file prefix of the model grids")
    a = ap.parse_args(argv)
    paths = category_grids(a.out) if a.model is None else model_grids(a.out, a.model, a.lora, a.name)
    for p in paths:
        print(p)


if __name__ == "__main__":
    _main(sys.argv[1:])
