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


# ---- toy-world galleries: images drawn by the toy renderer, so the shapes verdict is known ----

# (prompt, a prompt the same image must fail): each second prompt names a shape its image lacks,
# so the strict verdict is 0 whatever colours and places the renderer picked.
TOY_CASES = [
    ("a circle", "three squares"),
    ("three squares", "a red triangle"),
    ("a red triangle", "a circle and a square"),
    ("a circle and a square", "four triangles"),
    ("a triangle above a square", "a circle"),
    ("a green circle and a purple triangle", "two squares"),
]
TOY_LAYOUTS = ("manifest", "sidecar", "geneval_fields", "geneval_folders")
# what `visalign sample` writes besides file and prompt: file bookkeeping, never task metadata
BOOKKEEPING = dict(model="toy-shapes", steps=20, guidance=4.5, kernel="ode")


def geneval_metadata(prompt: str) -> dict:
    """GenEval's metadata for a prompt of the toy grammar: ``tag``, ``include``, [``exclude``], ``prompt``."""
    from visalign.toy.prompts import split

    meta = next(m for m in split("eval") if m["prompt"] == prompt)
    return {k: meta[k] for k in ("tag", "include", "exclude", "prompt") if k in meta}


def toy_image(prompt: str, seed: int) -> np.ndarray:
    """A 32 px scene satisfying ``prompt`` drawn by the toy renderer, as uint8 ``(H, W, 3)``."""
    from visalign.toy.render import render

    img = render(geneval_metadata(prompt), np.random.default_rng(seed))  # float32 (3, H, W) in [0, 1]
    return np.rint(img.transpose(1, 2, 0) * 255).astype(np.uint8)


def make_toy_gallery(root: Path, layout: str) -> dict[str, tuple[float, str]]:
    """Write a toy gallery whose prompts come from ``layout``; return ``{relative path: (strict verdict, prompt_source)}``.

    Every image of :data:`TOY_CASES` appears twice: with its own prompt (verdict 1) and with the
    mismatching one (verdict 0).  Layouts:

    - ``manifest``: a ``visalign sample`` manifest (file, prompt, seed and sampler settings);
    - ``sidecar``: ``.txt`` files beside the images;
    - ``geneval_fields``: manifest rows that also carry GenEval's ``tag`` / ``include`` / ``exclude``,
      two of them with prompt text outside the grammar (so only the metadata can judge them), mixed
      in one folder (and one batch) with sidecar-prompted files that have no metadata;
    - ``geneval_folders``: GenEval's output layout, ``<NNNNN>/metadata.jsonl`` + ``<NNNNN>/samples/0000.png``.
    """
    if layout not in TOY_LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {TOY_LAYOUTS}")
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[float, str]] = {}
    rows = []
    for i, (own, wrong) in enumerate(TOY_CASES):
        img = toy_image(own, seed=i)
        for k, (prompt, verdict) in enumerate([(own, 1.0), (wrong, 0.0)]):
            n = 2 * i + k
            if layout == "geneval_folders":
                folder = root / f"{n:05d}"
                (folder / "samples").mkdir(parents=True)
                (folder / "metadata.jsonl").write_text(json.dumps(geneval_metadata(prompt)) + "\n")
                name = f"{n:05d}/samples/0000.png"
                expected[name] = (verdict, "geneval")
            elif layout == "sidecar" or (layout == "geneval_fields" and i % 2):
                name = f"{n:05d}.png"
                (root / name).with_suffix(".txt").write_text(prompt + "\n")
                expected[name] = (verdict, "sidecar")
            else:
                name = f"{n:05d}.png"
                row = dict(file=name, prompt=prompt, seed=n, **BOOKKEEPING)
                if layout == "geneval_fields":
                    meta = geneval_metadata(prompt)
                    row.update({key: meta[key] for key in ("tag", "include", "exclude") if key in meta})
                    if i == 2:  # text the parser cannot read: only the GenEval fields can judge it
                        row["prompt"] = f"GenEval prompt #{n} (free text)"
                rows.append(row)
                expected[name] = (verdict, "manifest")
            Image.fromarray(img).save(root / name)
    if rows:
        (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expected
