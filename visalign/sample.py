"""``visalign sample``: generate images or videos with any Sampler and write them with a manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .io import JsonlAppender, atomic_write
from .prompts import read_prompts

__all__ = ["sample_to_folder", "save_image", "save_video", "read_prompts"]


def _to_uint8(image: torch.Tensor):
    import numpy as np

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(1, 2, 0).cpu().numpy())


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` image in ``[0, 1]`` as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(_to_uint8(image))
    return atomic_write(path, lambda p: pil.save(p, format="PNG"))


def save_video(video: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write a ``(F, 3, H, W)`` video in ``[0, 1]`` as GIF (Pillow) or MP4 (needs imageio-ffmpeg)."""
    path = Path(path)
    frames = [_to_uint8(f) for f in video]
    if path.suffix == ".mp4":
        try:
            import imageio.v3 as iio
        except ImportError:
            raise RuntimeError("writing MP4 needs `pip install imageio imageio-ffmpeg`; or use --video-format gif") from None
        return atomic_write(path, lambda p: iio.imwrite(p, frames, fps=fps, extension=".mp4"))
    from PIL import Image

    pils = [Image.fromarray(f) for f in frames]
    return atomic_write(
        path, lambda p: pils[0].save(p, format="GIF", save_all=True, append_images=pils[1:], duration=int(1000 / fps), loop=0)
    )


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n].lower() or "prompt"


@dataclass
class SampleSettings:
    model: str
    num_images: int = 1
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    kernel: str = "ode"
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    batch_size: int = 4
    video_format: str = "gif"


def sample_to_folder(sampler, prompts: Sequence[str], out: str | Path, settings: SampleSettings, progress: bool = True) -> list[dict]:
    """Generate ``num_images`` per prompt; image ``k`` of prompt ``j`` uses seed ``seed + j * num_images + k``.

    Generation goes through the shared collect step; each batch's files are written atomically as
    it comes and ``manifest.jsonl`` gets one row per file, appended per batch.  Returns the rows.
    """
    from .samplers import collect

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = settings.steps or sampler.default_steps
    guidance = sampler.default_guidance if settings.guidance is None else settings.guidance
    jobs = [(j, k, p) for j, p in enumerate(prompts) for k in range(settings.num_images)]
    ext = settings.video_format if sampler.is_video else "png"
    rows: list[dict] = []
    sizes = {k: v for k, v in dict(height=settings.height, width=settings.width, num_frames=settings.num_frames).items() if v}
    with JsonlAppender(out / "manifest.jsonl") as manifest:

        def write(start: int, batch) -> None:
            batch_rows = []
            for (j, k, prompt), seed, item in zip(jobs[start : start + len(batch)], batch.seeds, batch.images):
                name = f"{j:05d}_{k:03d}_{_slug(prompt)}.{ext}"
                if sampler.is_video:
                    save_video(item, out / name)
                else:
                    save_image(item, out / name)
                batch_rows.append(dict(file=name, prompt=prompt, seed=seed, model=sampler.name, steps=steps,
                                       guidance=guidance, kernel=settings.kernel))
            manifest.write(batch_rows)
            rows.extend(batch_rows)

        collect(sampler, [p for _, _, p in jobs], num_steps=steps, guidance_scale=guidance, kernel=settings.kernel,
                seeds=[settings.seed + j * settings.num_images + k for j, k, _ in jobs], batch_size=settings.batch_size,
                keep_images=False, on_batch=write, progress="sampling" if progress else False, size=sizes)
    return rows
