"""Decode one gallery file into ``uint8`` pixels, or into a reason why not.

Runs inside loader worker processes, so it imports only Pillow and numpy (no torch).  Every
failure becomes a :class:`Decoded` with ``reason`` set; nothing here raises for bad input.  The
reading itself is :mod:`visalign.media`'s (its module docstring lists the conversions; the file
suffixes are its table); animated files are evenly subsampled to ``max_frames``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from visalign.media import (
    ANIMATION_SUFFIXES,
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    MEDIA_ERRORS,
    VIDEO_SUFFIXES,
    MediaError,
    read_media,
)

__all__ = ["Decoded", "decode_file", "make_thumbnail", "IMAGE_EXTS", "VIDEO_EXTS", "DEFAULT_MAX_PIXELS",
           "REASONS"]

#: still images (the only files a reference may be)
IMAGE_EXTS = IMAGE_SUFFIXES
#: files of several frames: animations and videos
VIDEO_EXTS = ANIMATION_SUFFIXES | VIDEO_SUFFIXES
DEFAULT_MAX_FRAMES = 64

# Every error row carries one of these in ``error_reason``; the summary counts by it.
REASONS = {
    **MEDIA_ERRORS,
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
    try:
        pixels, info = read_media(path, max_pixels=max_pixels, max_frames=max_frames)
    except MediaError as err:
        return Decoded(index, reason=err.reason, error=str(err))
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
