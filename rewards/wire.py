"""The reward server's wire format: images as base64 PNG / JPEG inside JSON, and nothing else.

Shared by the client (:mod:`visalign.rewards.remote`) and the server (``visalign rewards serve``).
Only data crosses the wire: JSON numbers, strings and lists, images as base64 PNG (lossless) or
JPEG.  Never pickle, which would run the sender's code on the receiver.

A score request (``POST /score``)::

    {"reward": "shapes-proxy",                 # optional when the server serves one reward
     "prompts": ["a red circle", ...],         # one per item; required by rewards that read prompts
     "images": ["iVBORw0KGgo...", ...],        # base64 PNG / JPEG, 3-channel RGB (or "videos": [[frame, ...], ...])
                                               #   or raw pixels {"height": H, "width": W, "rgb": base64 of H*W*3 bytes}
     "metadata": [{"tag": "single_object"}, null, ...]}   # optional task metadata, one entry per item

and its answer (items in request order)::

    {"reward": "shapes-proxy", "scores": [0.93, null, ...],
     "components": {"p_strict": [0.93, null, ...], ...},
     "errors": [null, "images[1]: not a PNG or JPEG image ...", ...],
     "extras": {"reason": ["", null, ...], ...}}   # the reward's per-sample strings / numbers

A score is ``null`` exactly where ``errors`` holds a message: the item could not be decoded, or
the reward could not judge it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["PROTOCOL", "FORMATS", "WireError", "ItemError", "to_uint8", "encode_png", "encode_batch",
           "decode_item", "json_number", "check_lengths", "encode_raw", "ENCODINGS"]

PROTOCOL = 1  # bumped on an incompatible change of the request or answer
FORMATS = ("PNG", "JPEG")
ENCODINGS = ("png", "raw")


class WireError(ValueError):
    """The request itself is malformed (bad JSON shape, invalid base64): the whole request fails (400)."""


class ItemError(ValueError):
    """One item cannot be scored (not an image, too large, wrong channels): that item's error, not the batch's."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in ``[0, 1]`` -> uint8 ``(..., H, W, 3)``: ``clamp(x, 0, 1) * 255`` to the nearest
    integer (halves up).

    Images that are already multiples of 1/255 come back unchanged after the server divides by 255.
    """
    x = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).add_(0.5).to(torch.uint8)
    return x.movedim(-3, -1).contiguous().numpy()  # (..., H, W, 3)


def encode_png(array: np.ndarray, compress_level: int = 1) -> str:
    """One uint8 ``(H, W, 3)`` array -> base64 PNG (lossless; level 1 favours speed over size)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_raw(array: np.ndarray) -> dict:
    """One uint8 ``(H, W, 3)`` array -> ``{"height", "width", "rgb": base64 of the H*W*3 bytes}``:
    lossless and nearly free to encode and decode, but uncompressed (for fast links)."""
    h, w, _ = array.shape
    return {"height": h, "width": w, "rgb": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")}


def encode_batch(images: torch.Tensor, encoding: str = "png") -> list:
    """``(B, 3, H, W)`` -> B items; ``(B, F, 3, H, W)`` -> B lists of F frames.

    ``encoding``: ``"png"`` (base64 PNG strings, compressed) or ``"raw"`` (:func:`encode_raw` objects).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: choose one of {ENCODINGS}")
    one = encode_png if encoding == "png" else encode_raw
    arrays = to_uint8(images)
    if images.ndim == 4:
        return [one(a) for a in arrays]
    return [[one(f) for f in video] for video in arrays]


def _decode_raw(item: dict, where: str, max_pixels: int) -> np.ndarray:
    keys = {"height", "width", "rgb"}
    if set(item) != keys:
        raise WireError(f"{where}: a raw image is an object with exactly {sorted(keys)}; got {sorted(item)}")
    h, w = item["height"], item["width"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise WireError(f"{where}: height and width must be positive integers, got {h!r} and {w!r}")
    if w * h > max_pixels:
        raise ItemError(f"{where}: {w}x{h} = {w * h} pixels is over the server's limit of {max_pixels} "
                        "(--max-pixels); send smaller images")
    data = _b64decode(item["rgb"], f"{where}.rgb")
    if len(data) != h * w * 3:
        raise ItemError(f"{where}: 'rgb' holds {len(data)} bytes; a {w}x{h} RGB image has {h * w * 3}")
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy()


def _b64decode(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise WireError(f"{where} must be a base64 string (PNG or JPEG bytes), got {type(text).__name__}")
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        hint = " (truncated? its length is not a multiple of 4)" if len(text) % 4 else ""
        raise WireError(f"{where} is not valid base64{hint}: {err}") from None


def _decode_image(data: bytes, where: str, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
    except (UnidentifiedImageError, OSError) as err:
        raise ItemError(f"{where}: not a PNG or JPEG image ({err})") from None
    with img:
        if img.format not in FORMATS:
            raise ItemError(f"{where}: {img.format} images are not accepted; send PNG or JPEG")
        w, h = img.size
        if w * h > max_pixels:
            raise ItemError(f"{where}: {w}x{h} = {w * h} pixels is over the server's limit of {max_pixels} "
                            "(--max-pixels); send smaller images")
        if img.mode != "RGB":
            bands = len(img.getbands())
            raise ItemError(f"{where}: mode {img.mode} ({bands} channel{'s' if bands != 1 else ''}); "
                            "send 3-channel 8-bit RGB images (convert with PIL's image.convert('RGB'))")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise ItemError(f"{where}: the {img.format} data is damaged ({err})") from None
        return np.array(img, dtype=np.uint8)  # (H, W, 3), writable


def decode_item(item: object, where: str, *, video: bool, max_pixels: int) -> torch.Tensor:
    """One wire item -> float tensor in ``[0, 1]``: ``(3, H, W)``, or ``(F, 3, H, W)`` for a video.

    Raises:
        WireError: the item is not a (list of) base64 string(s): the request is malformed.
        ItemError: the bytes are not a usable image: this item alone fails.
    """
    if video:
        if not isinstance(item, list) or not item:
            raise WireError(f"{where} must be a non-empty list of base64 frames, got "
                            f"{type(item).__name__ if not isinstance(item, list) else 'an empty list'}")
        frames = [_decode_frame(f, f"{where}[{j}]", max_pixels) for j, f in enumerate(item)]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise ItemError(f"{where}: the frames differ in size ({sorted(s[:2] for s in shapes)}); "
                            "every frame of a video must have the same height and width")
        array = np.stack(frames)  # (F, H, W, 3)
    else:
        array = _decode_frame(item, where, max_pixels)  # (H, W, 3)
    return torch.from_numpy(array).movedim(-1, -3).float().div_(255.0)


def _decode_frame(item: object, where: str, max_pixels: int) -> np.ndarray:
    if isinstance(item, dict):
        return _decode_raw(item, where, max_pixels)
    if not isinstance(item, str):
        raise WireError(f"{where} must be a base64 PNG / JPEG string or a raw image object "
                        f"{{\"height\", \"width\", \"rgb\"}}, got {type(item).__name__}")
    return _decode_image(_b64decode(item, where), where, max_pixels)


def json_number(value: float) -> float | None:
    """A float for JSON: non-finite values (which JSON cannot carry) become ``null``."""
    value = float(value)
    return value if math.isfinite(value) else None


def check_lengths(n: int, **fields: Sequence | None) -> None:
    """Raise a :class:`WireError` naming each optional per-item field whose length is not ``n``."""
    for key, value in fields.items():
        if value is not None and len(value) != n:
            raise WireError(f"'{key}' has {len(value)} entries for {n} items; give one per item")
