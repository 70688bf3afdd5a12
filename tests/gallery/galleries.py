"""Generated galleries for the gallery tests: good files in every mode, every kind of bad file, hostile text.

(A plainly named module, not conftest, so that `from galleries import ...` cannot pick up another folder's conftest.)
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visalign.rewards import Reward, RewardInfo, RewardOutput

# Prompts and names that would run script or break the markup if written unescaped.
HOSTILE_PROMPT = "<script>document.body.setAttribute('data-pwned','1')</script> a cat & \"dog\""
HOSTILE_PROMPT2 = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\"></td></tr></table><!--"
HOSTILE_NAME = "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','3')\">.png"


def png_bomb(path: Path, side: int = 100_000) -> None:
    """A PNG whose header declares side x side pixels (a decompression bomb), with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_gallery(root: Path) -> dict:
    """Write a gallery; return ``{"good": {name: expected RGB uint8}, "bad": {name: reason}, "prompts": {name: prompt}}``.

    Layout: ``sampled/`` has a ``visalign sample`` manifest; some files have ``.txt`` sidecars;
    ``map.csv`` (returned as ``mapping``) maps others; the rest get ``--prompt``.
    """
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    prompts: dict[str, str] = {}

    # manifest-prompted PNGs, two sizes so batches must be grouped by size
    (root / "sampled").mkdir()
    rows = []
    for k, (h, w) in enumerate([(32, 32), (32, 32), (48, 32), (32, 32), (48, 32)]):
        name = f"sampled/{k:05d}_000_p.png"
        arr = noise(h, w, k)
        Image.fromarray(arr).save(root / name)
        good[name] = arr
        prompt = HOSTILE_PROMPT if k == 0 else f"prompt {k % 2}"
        prompts[name] = prompt
        rows.append(dict(file=Path(name).name, prompt=prompt, seed=k, model="toy", steps=2, guidance=1.0, kernel="ode"))
    (root / "sampled" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # unusual modes, each with its expected RGB conversion computed here, independently of the loader
    base = noise(32, 32, 100)
    Image.fromarray(base).save(root / "plain.jpg", quality=90)
    good["plain.jpg"] = np.asarray(Image.open(root / "plain.jpg").convert("RGB"))
    Image.fromarray(base).save(root / "lossless.webp", lossless=True)
    good["lossless.webp"] = base
    cmyk = Image.fromarray(base).convert("CMYK")
    cmyk.save(root / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = np.asarray(Image.open(root / "cmyk.jpg").convert("RGB"))
    g16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(g16).save(root / "gray16.png")
    good["gray16.png"] = np.repeat(np.rint(g16.astype(np.float64) / 65535 * 255).astype(np.uint8)[..., None], 3, 2)
    alpha = np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(np.dstack([base, alpha])).save(root / "alpha.png")
    a = alpha[..., None].astype(np.float64) / 255  # over white: c * a + 255 * (1 - a)
    good["alpha.png"] = np.rint(base * a + 255 * (1 - a)).astype(np.uint8)
    pal = Image.fromarray(base).quantize(16)
    pal.save(root / "palette.png")
    good["palette.png"] = np.asarray(pal.convert("RGB"))
    gray = base[..., 0]
    Image.fromarray(gray).save(root / "gray.png")
    good["gray.png"] = np.repeat(gray[..., None], 3, 2)
    frames = [Image.fromarray(noise(32, 32, 200 + i)).quantize(64) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good["anim.gif"] = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    Image.fromarray(noise(32, 32, 7)).save(root / HOSTILE_NAME)
    good[HOSTILE_NAME] = noise(32, 32, 7)
    (root / HOSTILE_NAME).with_suffix(".txt").write_text(HOSTILE_PROMPT2)
    prompts[HOSTILE_NAME] = HOSTILE_PROMPT2
    for name in ("plain.jpg", "cmyk.jpg"):
        (root / name).with_suffix(".txt").write_text(f"sidecar {name}\n")
        prompts[name] = f"sidecar {name}"

    # bad files
    (root / "zero.png").write_bytes(b"")
    bad["zero.png"] = "empty_file"
    (root / "notes.jpg").write_text("this is not a JPEG\n")
    bad["notes.jpg"] = "not_an_image"
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64, 9)).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["truncated.png"] = "truncated"
    png_bomb(root / "bomb.png")
    bad["bomb.png"] = "decompression_bomb"
    os.symlink(root / "does-not-exist.png", root / "dangling.png")
    bad["dangling.png"] = "unreadable"
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    bad["clip.mp4"] = "missing_reader"  # or not_an_image when av is installed

    # prompts for the rest: a mapping file (relative names) and --prompt for whatever is left
    mapping = {"gray16.png": "mapped <b>16-bit</b>", "palette.png": "mapped palette"}
    with open(root / "map.csv", "w", newline="") as fh:
        fh.write("file,prompt\n" + "".join(f"{k},{v}\n" for k, v in mapping.items()))
    prompts.update(mapping)
    (root / "ignored.txt").write_text("not media")
    return dict(good=good, bad=bad, prompts=prompts, mapping=root / "map.csv")


class PromptLength(Reward):
    """Test reward: score = number of characters of the prompt + mean pixel; records the batch shapes."""

    info = RewardInfo("prompt_length", inputs=("images", "prompts"), native_range=(0.0, 1e9))

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        self.calls.append(tuple(images.shape))
        mean = images.flatten(1).mean(1)
        length = torch.tensor([float(len(p)) for p in prompts])
        return RewardOutput(length + mean, components={"chars": length, "mean": mean})


class FailsOnBright(Reward):
    """Test reward that raises on any image brighter than ``limit`` (to test per-file isolation)."""

    info = RewardInfo("fails_on_bright", native_range=(0.0, 1.0))

    def __init__(self, limit: float = 0.6) -> None:
        self.limit = limit

    def score(self, images, prompts, references, metadata) -> RewardOutput:
        mean = images.flatten(1).mean(1)
        if (mean > self.limit).any():
            raise RuntimeError("too bright")
        return RewardOutput(mean)
