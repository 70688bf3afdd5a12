"""Reading image and video files into ``uint8`` RGB pixels: one suffix table and the decoders that
the gallery (``visalign score``) and DPO's preference pairs share.

Imports only Pillow and numpy (no torch), so it runs inside data-loader worker processes.  Every
failure is a :class:`MediaError` whose message names the file and whose ``reason`` says what kind
of failure it was.

Conversions (docs/gallery.md):

- palette (``P``), grayscale (``L``, ``1``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB with Pillow;
- 16-bit and 32-bit integer / float grayscale (``I;16``, ``I``, ``F``) -> scaled to 8 bits by the
  mode's range (Pillow's own ``convert("RGB")`` would clip 16-bit values at 255);
- alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) -> composited over white;
- animated GIF / WebP and video files -> ``(F, H, W, 3)`` frames.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

__all__ = ["SUFFIXES", "IMAGE_SUFFIXES", "ANIMATION_SUFFIXES", "VIDEO_SUFFIXES", "PILLOW_SUFFIXES", "MEDIA_SUFFIXES",
           "MediaError", "MEDIA_ERRORS", "DEFAULT_MAX_PIXELS", "to_rgb", "frame_ids", "read_image", "read_video",
           "read_frame_folder", "read_media"]

#: file suffix (lower case) -> how it is read: "image" (Pillow, a still image), "animation" (Pillow,
#: usually several frames) or "video" (a container, read with PyAV: ``pip install visalign[video]``).
#: Animated WebP files are read frame by frame like GIFs; a WebP still is an image.
SUFFIXES = {
    ".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image", ".bmp": "image", ".tif": "image",
    ".tiff": "image",
    ".gif": "animation",
    ".mp4": "video", ".m4v": "video", ".webm": "video", ".mov": "video", ".avi": "video", ".mkv": "video",
}
IMAGE_SUFFIXES = frozenset(s for s, kind in SUFFIXES.items() if kind == "image")
ANIMATION_SUFFIXES = frozenset(s for s, kind in SUFFIXES.items() if kind == "animation")
VIDEO_SUFFIXES = frozenset(s for s, kind in SUFFIXES.items() if kind == "video")
#: what Pillow reads (the frames of a folder of frame images may be any of these)
PILLOW_SUFFIXES = IMAGE_SUFFIXES | ANIMATION_SUFFIXES
MEDIA_SUFFIXES = frozenset(SUFFIXES)
#: 64 megapixels (8192 x 8192) per frame: far above any generator's output, far below a bomb
DEFAULT_MAX_PIXELS = 8192 * 8192

#: MediaError.reason -> what it means
MEDIA_ERRORS = {
    "empty_file": "the file has zero bytes",
    "not_an_image": "the file has an image/video extension but is not a readable image",
    "truncated": "the file ends before the image data does",
    "decompression_bomb": "the declared size is larger than max_pixels",
    "unreadable": "the file could not be opened (permissions, I/O error)",
    "missing_reader": "no installed library reads this format",
}


class MediaError(ValueError):
    """A file that does not decode.  ``str(err)`` starts with the file's name; ``reason`` is a key of
    :data:`MEDIA_ERRORS`."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.reason, self.detail = name, reason, detail


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> ``(H, W, 3)`` uint8 RGB (see the module docstring for the conversions)."""
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


def frame_ids(n: int, max_frames: int | None) -> list[int]:
    """``max_frames`` frame indices of ``n`` spread evenly, first and last kept (all when ``None`` or
    ``n <= max_frames``; the first alone when ``max_frames`` is 1)."""
    if max_frames is None or n <= max_frames:
        return list(range(n))
    if max_frames <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (max_frames - 1)) for i in range(max_frames)})


def _name(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(src)


def read_image(src, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_frames: int | None = None,
               name: str | None = None) -> tuple[np.ndarray, dict]:
    """An image file, encoded bytes or a Pillow image -> ``(pixels, info)``.

    Args:
        src: a path, encoded bytes or a ``PIL.Image.Image``.
        max_pixels (`int`, *optional*, defaults to 64M): per-frame pixel limit; a larger declared size
            is a ``decompression_bomb`` (``None``: Pillow's own limit).
        max_frames (`int`, *optional*): an animation gives ``(F, H, W, 3)`` with at most this many
            frames, spread evenly (``None``: every frame); ``1`` reads the first frame alone.
        name (`str`, *optional*): how errors name the source (default: the path, or the byte count).

    Returns:
        ``pixels`` ``(H, W, 3)`` (or ``(F, H, W, 3)`` for an animation of several frames) uint8 RGB and
        ``info`` ``{mode, width, height, frames}``.

    Raises:
        MediaError: the source does not decode (the message names it).
    """
    name = name or _name(src)
    if isinstance(src, Image.Image):
        return _pillow_pixels(src, max_frames), _info(src)
    return _guard(name, lambda: _read_pillow(src, max_pixels, max_frames), max_pixels)


def _info(img: Image.Image) -> dict:
    return dict(mode=img.mode, width=img.size[0], height=img.size[1], frames=int(getattr(img, "n_frames", 1)))


def _pillow_pixels(img: Image.Image, max_frames: int | None) -> np.ndarray:
    n = int(getattr(img, "n_frames", 1))
    if n > 1 and max_frames != 1:
        ids = set(frame_ids(n, max_frames))
        return np.stack([to_rgb(f.copy()) for i, f in enumerate(ImageSequence.Iterator(img)) if i in ids])
    img.load()
    return to_rgb(img)


def _read_pillow(src, max_pixels: int | None, max_frames: int | None) -> tuple[np.ndarray, dict]:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    with warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS (89M by default) and raises at twice it; both
        # are bombs to us.  A max_pixels above Pillow's limit lifts it for this call only.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if max_pixels is not None and pillow_limit is not None and max_pixels > pillow_limit:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with Image.open(src) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise _Bomb(f"{w}x{h}")
                return _pillow_pixels(img, max_frames), _info(img)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def read_video(path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_frames: int | None = None
               ) -> tuple[np.ndarray, dict]:
    """A video file -> ``(F, H, W, 3)`` uint8 frames (at most ``max_frames``, spread evenly; ``None``:
    every frame) and ``info``.  Reads with PyAV (``pip install visalign[video]``), else imageio when
    installed.  Raises :class:`MediaError` naming the file."""
    return _guard(str(path), lambda: _read_video(Path(path), max_pixels, max_frames), max_pixels)


def _read_video(path: Path, max_pixels: int | None, max_frames: int | None) -> tuple[np.ndarray, dict]:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if max_pixels is not None and stream.width * stream.height > max_pixels:
                raise _Bomb(f"{stream.width}x{stream.height} video frames")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    else:
        try:
            import imageio.v3 as iio
        except ImportError:
            raise _MissingReader(f"install av (`pip install 'visalign[video]'`) to read {path.suffix or 'video'} "
                                 "files") from None
        frames = list(iio.imiter(path))
    if not frames:
        raise _Truncated("the video holds no frames")
    pixels = np.stack([np.asarray(frames[i])[..., :3] for i in frame_ids(len(frames), max_frames)]).astype(np.uint8)
    return pixels, dict(mode="RGB", width=int(pixels.shape[2]), height=int(pixels.shape[1]), frames=len(frames))


def read_frame_folder(folder, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """A folder of frame images (sorted by name; any of :data:`PILLOW_SUFFIXES`) -> one ``(H, W, 3)``
    array per frame.  Raises :class:`MediaError` naming the folder, or the frame that does not decode."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PILLOW_SUFFIXES)
    if not files:
        raise MediaError(str(folder), "not_an_image", f"no frame images ({' '.join(sorted(PILLOW_SUFFIXES))}) "
                                                      "in the folder")
    return [read_image(p, max_pixels=max_pixels, max_frames=1)[0] for p in files]


def read_media(src, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_frames: int | None = None
               ) -> tuple[np.ndarray, dict]:
    """Any source by its kind: a video file (:data:`VIDEO_SUFFIXES`) with :func:`read_video`, anything
    else (a path, encoded bytes, a Pillow image) with :func:`read_image`.  A zero-byte file is an
    ``empty_file`` error."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        try:
            empty = path.stat().st_size == 0
        except OSError as err:
            raise MediaError(str(src), "unreadable", err.strerror or str(err)) from None
        if empty:
            raise MediaError(str(src), "empty_file", "zero-byte file")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return read_video(path, max_pixels=max_pixels, max_frames=max_frames)
    return read_image(src, max_pixels=max_pixels, max_frames=max_frames)


class _Bomb(Exception):
    pass


class _MissingReader(Exception):
    pass


class _Truncated(Exception):
    pass


def _guard(name: str, read, max_pixels):
    """Run ``read()``; every failure becomes a :class:`MediaError` that names the file."""
    try:
        return read()
    except MediaError:
        raise
    except (_Bomb, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(name, "decompression_bomb", f"decompression bomb: the declared size exceeds "
                         f"max_pixels={max_pixels}; raise the limit (visalign score --max-pixels) if the image is genuine") from None
    except _MissingReader as err:
        raise MediaError(name, "missing_reader", str(err)) from None
    except UnidentifiedImageError:
        raise MediaError(name, "not_an_image", "not a readable image (wrong extension or corrupt header)") from None
    except (_Truncated, EOFError) as err:
        raise MediaError(name, "truncated", f"truncated ({err})") from None
    except (PermissionError, IsADirectoryError, FileNotFoundError) as err:
        raise MediaError(name, "unreadable", err.strerror or str(err)) from None
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow reports truncation and broken data streams as OSError / SyntaxError / ValueError.
        text = str(err)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "not_an_image"
        raise MediaError(name, reason, text or type(err).__name__) from None
    except Exception as err:  # noqa: BLE001 - a reader library's own error type; one bad file must not end a run
        raise MediaError(name, "unreadable", f"{type(err).__name__}: {err}") from None
