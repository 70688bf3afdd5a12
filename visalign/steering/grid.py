"""A PNG per steered image: the particles (candidates) over time, the chosen one marked.

Rows are the final particles; each row shows that particle's ancestry at the scoring steps (FK:
resampling copies a particle, so rows that share an ancestor show the same picture up to the step
where they split), then its final image.  A red frame marks the chosen row; each cell carries the
reward it was scored with.  Video is shown by its first frame.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["particle_grid", "save_grid"]


def _to_pil(image: torch.Tensor, cell: int):
    import numpy as np
    from PIL import Image

    if image.ndim == 4:  # video (F, 3, H, W): the first frame
        image = image[0]
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(np.ascontiguousarray(arr))
    scale = max(1, cell // max(pil.size))
    return pil.resize((pil.size[0] * scale, pil.size[1] * scale), Image.NEAREST) if scale > 1 else pil


def particle_grid(history, chosen, title: str = "", cell: int = 128):
    """A PIL image of ``history`` = ``[(label, images (k, ...) or None, scores (k,))]``; ``chosen`` is
    a row (framed in every column) or a ``(column, row)`` cell (noise search: the round it came from)."""
    from PIL import Image, ImageDraw

    cols = [(lab, im, sc) for lab, im, sc in history if im is not None]
    if not cols:
        raise ValueError("nothing to draw: the history holds no images")
    k = cols[0][1].shape[0]
    first = _to_pil(cols[0][1][0], cell)
    w, h = first.size
    pad, top, text = 4, 18, 12
    width = len(cols) * (w + pad) + pad
    height = top + k * (h + text + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title[:120], fill="black")
    for c, (label, images, scores) in enumerate(cols):
        x = pad + c * (w + pad)
        for r in range(k):
            y = top + r * (h + text + pad)
            canvas.paste(_to_pil(images[r], cell), (x, y))
            s = float(scores[r]) if scores is not None else math.nan
            caption = label if r == 0 else ""
            caption = f"{caption} {s:.3f}".strip() if math.isfinite(s) else caption
            draw.text((x, y + h), caption, fill="black")
            if r == chosen if isinstance(chosen, int) else (c, r) == tuple(chosen):
                draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=(220, 20, 20), width=2)
    return canvas


def save_grid(history, chosen, path: str | Path, title: str = "", cell: int = 128) -> Path:
    from visalign.io import atomic_write

    img = particle_grid(history, chosen, title, cell)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))
