"""Gallery scoring throughput vs. the same reward on in-memory tensors (target ratio >= 0.85).

Writes N images to a temporary folder, then in one run measures, for one reward:

- ``in-memory``: the reward's batched forward on ``(B, 3, H, W)`` float tensors already in memory
  (the ceiling: no file I/O, no decoding);
- ``gallery``: ``visalign.gallery.score(folder, reward, batch_size, workers)`` end to end
  (discovery, decoding in worker processes, batching, rows), no output file.

A ratio near 1 means decoding is hidden behind scoring.  Usage::

    python bench/gallery_throughput.py --reward artifact --n 256 --size 512 --workers 2
    python bench/gallery_throughput.py --reward bench-vit --device cuda --n 1024 --workers 8 --batch-size 32
    python bench/gallery_throughput.py --reward aesthetic --device cuda   # needs the weights

``bench-vit`` is a random-weight open_clip ViT-B/32 image tower with a linear head: the cost of a
CLIP-based reward's forward without downloading weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random pictures plus grain: they compress like generated images, unlike pure noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(low).astype(np.int16) + rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png", compress_level=6)


class BenchViT(torch.nn.Module):
    """Random-weight ViT-B/32 image tower + linear head, at 224 px (resize inside, as rewards do)."""

    def __init__(self) -> None:
        super().__init__()
        import open_clip

        torch.manual_seed(0)
        self.visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
        self.head = torch.nn.Linear(self.visual.output_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.visual(x)).squeeze(1)


def build_reward(spec: str, device: str):
    from visalign import rewards as R

    if spec != "bench-vit":
        return R.load(spec).to(device)

    class ViTReward(R.Reward):
        info = R.RewardInfo("bench-vit", description="random-weight ViT-B/32 + linear head (benchmark stand-in)")

        def __init__(self) -> None:
            self.model = BenchViT().eval()

        def score(self, images, prompts, references, metadata):
            return R.RewardOutput(self.model(images).float())

    return ViTReward().to(device)


def in_memory(reward, files: list[Path], batch_size: int, device: str) -> float:
    """Items/s of the reward's forward on tensors already in memory (uint8 -> float on the device included)."""
    data = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    data = data.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(files), batch_size):
            reward(data[s : s + batch_size].float().div_(255.0)).scores.cpu()
    sync()
    return len(files) / (time.perf_counter() - t)


def gallery(reward, folder: Path, batch_size: int, workers: int, device: str) -> float:
    from visalign.gallery import score

    t = time.perf_counter()
    run = score([folder], {"r": reward}, batch_size=batch_size, workers=workers, device=device)
    elapsed = time.perf_counter() - t
    assert run.summary["scored"] == len(run.rows), run.summary
    return len(run.rows) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reward", default="artifact", help="registered reward spec, or bench-vit")
    ap.add_argument("--n", type=int, default=256, help="images in the gallery")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="decoding processes for the gallery run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each; the median is reported")
    args = ap.parse_args()

    reward = build_reward(args.reward, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.n, args.size)
        files = sorted(folder.glob("*.png"))
        in_memory(reward, files[: args.batch_size], args.batch_size, args.device)  # warm-up (kernels, allocator)
        mem, gal = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            mem.append(in_memory(reward, files, args.batch_size, args.device))
            gal.append(gallery(reward, folder, args.batch_size, args.workers, args.device))
    m, g = statistics.median(mem), statistics.median(gal)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"reward={args.reward} n={args.n} size={args.size} batch={args.batch_size} workers={args.workers} device={dev}")
    print(f"in-memory forward : {m:8.1f} items/s   (runs: {', '.join(f'{x:.1f}' for x in mem)})")
    print(f"gallery score()   : {g:8.1f} items/s   (runs: {', '.join(f'{x:.1f}' for x in gal)})")
    print(f"ratio gallery / in-memory: {g / m:.3f}  (target >= 0.85)")
    print(f"| {args.reward} | {args.n} x {args.size}px PNG | {args.batch_size} | {args.workers} | {dev} | {m:.1f} | {g:.1f} | {g / m:.2f} |")


if __name__ == "__main__":
    main()
