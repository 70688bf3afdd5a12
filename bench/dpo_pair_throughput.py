"""Offline DPO data path: pairs per second with the VAE-latent cache vs decoding and encoding every
epoch (what a training loop without the cache does each time it sees a pair).

Three measurements on one CPU thread:

1. ``sd-vae``: an SD1.5-architecture VAE (``AutoencoderKL``, channels 128-256-512-512, two ResNets
   per block, random weights: the cost is the architecture's, not the weights') on JPEG pairs of
   ``--size`` px (Pick-a-Pic's images are JPEGs of 512 px or more): decode + resize + crop + VAE
   encode of both images, against reading both latents back from the cache.
2. ``toy``: the same for ``toy-shapes`` (PNG pairs, 32 px, ``encode_images`` is a reshape).
3. ``toy train``: whole offline DPO optimizer steps of ``toy-shapes`` (LoRA r 16, 32 pairs a step):
   pairs per second from the cache, and what decoding every epoch would add per pair (from 2).

    python bench/dpo_pair_throughput.py --pairs 16 --size 256 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def jpeg_pairs(root: Path, n: int, size: int, fmt: str = "JPEG") -> Path:
    """``n`` pairs of smooth random images (compress like photos) in a pairs.jsonl folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for side in "ab":
            low = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
            ext = "jpg" if fmt == "JPEG" else "png"
            img.save(root / "img" / f"{i}{side}.{ext}", format=fmt, quality=90)
        rows.append({"prompt": f"prompt {i}", "chosen": f"img/{i}a.{ext}", "rejected": f"img/{i}b.{ext}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def sd_vae_sampler(size: int):
    """An SD sampler-like object around an SD1.5-architecture VAE with random weights."""
    from diffusers import AutoencoderKL

    from visalign.samplers.families.sd import SDSampler

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=size, scaling_factor=0.18215).eval()

    class Pipe:  # the members SDSampler.encode_images reads
        pass

    pipe = Pipe()
    pipe.vae = vae
    s = SDSampler.__new__(SDSampler)
    s.pipeline, s.denoiser, s.name, s.family = pipe, vae, "sd15-vae-bench", "sd"
    return s


def data_path(sampler, folder: Path, size: int, cache_root: Path) -> dict:
    from visalign.trainers.dpo.data import build_latent_cache, load_media, open_pairs

    recs = list(open_pairs(str(folder)))
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in recs:  # what an uncached loop does for every pair, every epoch
            imgs = torch.stack([load_media(r.chosen, size, size, None), load_media(r.rejected, size, size, None)])
            sampler.encode_images(imgs)
    uncached = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = build_latent_cache(open_pairs(str(folder)), sampler, cache_root, height=size, width=size, num_workers=0,
                               encode_batch_size=2, progress=False, log=None)
    build = time.perf_counter() - t0
    idx = torch.arange(len(cache))
    reps = max(1, 2000 // len(cache))
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in idx:
            cache.get([int(i)])
    cached = (time.perf_counter() - t0) / reps
    n = len(recs)
    return {"pairs": n, "size": size, "uncached_pairs_per_s": n / uncached, "cache_build_pairs_per_s": n / build,
            "cached_pairs_per_s": n / cached, "speedup": uncached / cached}


def toy_training(folder: Path, steps: int, run_dir: Path) -> dict:
    import visalign.samplers as vs
    from visalign.trainers import DPOConfig, LoraSettings, RunSettings
    from visalign.trainers.common.lora import add_lora
    from visalign.trainers.dpo import DPOTrainer

    s = vs.load("toy-shapes")
    torch.manual_seed(0)
    add_lora(s, LoraSettings(rank=16, alpha=32))
    cfg = DPOConfig(pairs=str(folder), train_batch_size=32, learning_rate=3e-4, ema_decay=0.0, num_workers=0,
                    cache_dtype="float32")
    tr = DPOTrainer(s, {}, cfg, run=RunSettings(run_dir=str(run_dir), progress=False))
    tr.step()  # builds the cache
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.step()
    dt = time.perf_counter() - t0
    return {"steps": steps, "pairs_per_step": 32, "train_pairs_per_s": steps * 32 / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side for the SD-VAE measurement")
    p.add_argument("--toy-pairs", type=int, default=256)
    p.add_argument("--toy-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = {"threads": a.threads}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["sd_vae"] = data_path(sd_vae_sampler(a.size), jpeg_pairs(tmp / "jpeg", a.pairs, a.size), a.size, tmp / "c1")
        print("sd-vae", out["sd_vae"], flush=True)
        import visalign.samplers as vs

        toy_folder = jpeg_pairs(tmp / "png", a.toy_pairs, 32, fmt="PNG")
        out["toy"] = data_path(vs.load("toy-shapes"), toy_folder, 32, tmp / "c2")
        print("toy", out["toy"], flush=True)
        out["toy_train"] = toy_training(toy_folder, a.toy_steps, tmp / "run")
        t = out["toy_train"]["train_pairs_per_s"]
        out["toy_train"]["uncached_train_pairs_per_s"] = 1 / (1 / t + 1 / out["toy"]["uncached_pairs_per_s"])
        print("toy train", out["toy_train"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
