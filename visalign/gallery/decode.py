"""Decode one gallery file into ``uint8`` pixels, or into a reason why not.

Runs inside loader worker processes, so it imports only Pillow and numpy (no torch).  Every
failure becomes a :class:`Decoded` with ``reason`` set; nothing here raises for bad input.

Conversions (documented in docs/gallery.md):

- palette (``P``), grayscale (``L``, ``1``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB with Pillow;
- 16-bit and 32-bit integer / float grayscale (``I;16``, ``I``, ``F``) -> scaled to 8 bits by the
  mode's range (Pillow's own ``convert("RGB")`` would clip 16-bit values at 255);
- alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) -> composited over white;
- animated GIF / WebP and MP4 -> ``(F, H, W, 3)`` frames, evenly subsampled to ``max_frames``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

__all__ = ["Decoded", "decode_file", "make_thumbnail", "IMAGE_EXTS", "VIDEO_EXTS", "DEFAULT_MAX_PIXELS",
           "REASONS"]

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
VIDEO_EXTS = frozenset({".gif", ".mp4"})
# 64 megapixels (8192 x 8192) per frame: far above any generator's output, far below a bomb.
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_FRAMES = 64

# Every error row carries one of these in ``error_reason``; the summary counts by it.
REASONS = {
    "empty_file": "the file has zero bytes",
    "not_an_image": "the file has an image/video extension but is not a readable image",
    "truncated": "the file ends before the image data does",
    "decompression_bomb": "the declared size is larger than max_pixels",
    "unreadable": "the file could not be opened (permissions, I/O error)",
    "missing_reader": "no installed library reads this format",
    "no_prompt": "a reward needs a prompt and none was found for this file",
    "reward_error": "a reward raised an error on this file",
}


@dataclass
class Decoded:
    """One decoded file: ``pixels`` ``(H, W, 3)`` or ``(F, H, W, 3)`` uint8, or ``reason`` + ``error``."""

    index: int
    pixels: np.ndarray | None = None
    reason: str | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)  # mode, width, height, frames
    thumbnail: str | None = None  # data URI when asked for


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> ``(H, W, 3)`` uint8 RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            scale = 65535.0
        elif mode == "I":
            scale = 65535.0 if arr.max(initial=0) > 255 else 255.0  # 16-bit PNGs open as "I"
        else:
            scale = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _frame_ids(n: int, max_frames: int) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_frames - 1)) for i in range(max_frames)})


def _read_mp4(path: Path, max_frames: int, max_pixels: int) -> np.ndarray:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise _BombError(f"{stream.width}x{stream.height} video frames")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    else:
        try:
            import imageio.v3 as iio
        except ImportError:
            raise _MissingReader("install av (`pip install av`) to read mp4") from None
        frames = list(iio.imiter(path))
    if not frames:
        raise _Truncated("the video holds no frames")
    ids = _frame_ids(len(frames), max_frames)
    return np.stack([np.asarray(frames[i])[..., :3] for i in ids]).astype(np.uint8)


class _BombError(Exception):
    pass


class _MissingReader(Exception):
    pass


class _Truncated(Exception):
    pass


def _read_pillow(path: Path, max_frames: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS (89M by default) and raises at twice it; both
        # are bombs to us.  A max_pixels above Pillow's limit lifts it for this call only.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if pillow_limit is not None and max_pixels > pillow_limit:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return _open_pillow(path, max_frames, max_pixels)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _open_pillow(path: Path, max_frames: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise _BombError(f"{w}x{h}")
        info = dict(mode=img.mode, width=w, height=h, frames=int(getattr(img, "n_frames", 1)))
        if info["frames"] > 1:
            ids = set(_frame_ids(info["frames"], max_frames))
            frames = [_to_rgb(f.copy()) for i, f in enumerate(ImageSequence.Iterator(img)) if i in ids]
            return np.stack(frames), info
        img.load()
        return _to_rgb(img), info


def decode_file(index: int, path: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_frames: int = DEFAULT_MAX_FRAMES,
                thumbnail: int = 0) -> Decoded:
    """Read ``path``; never raises for bad input (the reason lands in the result).

    Args:
        index (`int`): the item's position, echoed back so out-of-order results can be matched.
        path (`str`): the file.
        max_pixels (`int`): per-frame pixel limit; larger declared sizes are ``decompression_bomb``.
        max_frames (`int`): animated files are subsampled evenly (first and last kept) to this many frames.
        thumbnail (`int`): when > 0, also return a JPEG data URI whose longest side is this many pixels.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return Decoded(index, reason="empty_file", error=f"{path}: zero-byte file")
        if p.suffix.lower() == ".mp4":
            pixels = _read_mp4(p, max_frames, max_pixels)
            info = dict(mode="RGB", width=int(pixels.shape[2]), height=int(pixels.shape[1]), frames=int(pixels.shape[0]))
        else:
            pixels, info = _read_pillow(p, max_frames, max_pixels)
    except (_BombError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(index, reason="decompression_bomb",
                       error=f"{path}: decompression bomb: the declared size exceeds max_pixels={max_pixels}; "
                             "raise --max-pixels if the image is genuine")
    except _MissingReader as err:
        return Decoded(index, reason="missing_reader", error=f"{path}: {err}")
    except UnidentifiedImageError:
        return Decoded(index, reason="not_an_image", error=f"{path}: not a readable image (wrong extension or corrupt header)")
    except (_Truncated, EOFError) as err:
        return Decoded(index, reason="truncated", error=f"{path}: truncated ({err})")
    except (PermissionError, IsADirectoryError, FileNotFoundError) as err:
        return Decoded(index, reason="unreadable", error=f"{path}: {err.strerror or err}")
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow reports truncation and broken data streams as OSError / SyntaxError / ValueError.
        text = str(err)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "not_an_image"
        return Decoded(index, reason=reason, error=f"{path}: {text or type(err).__name__}")
    except Exception as err:  # noqa: BLE001 - a reader library's own error type; one bad file must not end the run
        return Decoded(index, reason="unreadable", error=f"{path}: {type(err).__name__}: {err}")
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]  # a one-frame GIF is an image
    out = Decoded(index, pixels=np.ascontiguousarray(pixels), info=info)
    if thumbnail > 0:
        out.thumbnail = make_thumbnail(pixels, thumbnail)
    return out


def make_thumbnail(pixels: np.ndarray, size: int = 96, quality: int = 70) -> str:
    """A ``data:image/jpeg;base64,...`` URI of the (first frame of the) image, longest side ``size``."""
    import base64

    frame = pixels[0] if pixels.ndim == 4 else pixels
    img = Image.fromarray(frame)
    img.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
