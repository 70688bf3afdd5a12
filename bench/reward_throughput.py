"""Reward throughput: shared backbone vs separate models, batched tensor path vs per-image PIL loop.

A random-weight open_clip model of ViT-B-32 size (no download) scores batches of 256 px images
with two rewards on the same backbone (LAION-style aesthetic head + CLIPScore):

- ``shared``:   ``combine({aesthetic, clipscore})`` - one image forward pass per batch;
- ``separate``: the two rewards on two separately loaded copies of the backbone;
- ``pil loop``: the usual gallery-script way - per image, PIL -> open_clip's transform -> model,
  both rewards, batch size 1.

Run: ``python bench/reward_throughput.py --batches 3 --batch-size 64 [--device cuda]``.
Prints a markdown table (images / s, and the speed-up over the PIL loop).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _build_weights(root: Path) -> tuple[str, str, str]:
    """Random ViT-B-32 weights (seeded) and a random aesthetic head for its 512-d embedding."""
    import open_clip
    from safetensors.torch import save_file

    from visalign.rewards.clip_rewards import AestheticHead

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    weights_a, weights_b = root / "a.pt", root / "b.pt"
    torch.save(model.state_dict(), weights_a)
    torch.save(model.state_dict(), weights_b)  # same numbers, another path: a second cached copy
    head = root / "head.safetensors"
    save_file(AestheticHead(512).state_dict(), str(head))
    return str(weights_a), str(weights_b), str(head)


def _time(fn, batches, warmup=1) -> float:
    for _ in range(warmup):
        fn(0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(batches):
        fn(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument("--pil-images", type=int, default=16, help="images timed in the per-image PIL loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    from open_clip.transform import image_transform
    from PIL import Image

    from visalign import rewards as R

    root = Path(tempfile.mkdtemp(prefix="reward_bench_"))
    weights_a, weights_b, head = _build_weights(root)
    load = dict(model="ViT-B-32", dtype=args.dtype, device=args.device)
    aesthetic = R.load("aesthetic", pretrained=weights_a, head=head, **load)
    clipscore = R.load("clipscore", pretrained=weights_a, **load)
    clipscore_b = R.load("clipscore", pretrained=weights_b, **load)
    assert aesthetic.backbone is clipscore.backbone and clipscore_b.backbone is not clipscore.backbone
    shared = R.combine({aesthetic: 1.0, clipscore: 1.0})

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(args.batch_size, 3, args.size, args.size, generator=g) for _ in range(2)]
    prompts = [f"a photo number {i}" for i in range(args.batch_size)]

    def run_shared(i):
        with torch.inference_mode():
            shared(images[i % 2].to(args.device), prompts)

    def run_separate(i):
        with torch.inference_mode():
            x = images[i % 2].to(args.device)
            aesthetic(x)
            clipscore_b(x, prompts)

    # per-image PIL loop: open_clip's own transform, batch 1, both rewards' heads on one model
    model, tokenizer = clipscore.backbone.model, clipscore.backbone.tokenizer
    transform = image_transform(224, is_train=False)
    pils = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")) for img in images[0][: args.pil_images]]

    def run_pil(_):
        with torch.inference_mode():
            for j, pil in enumerate(pils):
                pix = transform(pil)[None].to(args.device, clipscore.backbone.dtype)
                emb = model.encode_image(pix).float()
                txt = model.encode_text(tokenizer([prompts[j]]).to(args.device)).float()
                aesthetic.head(emb / emb.norm(dim=-1, keepdim=True))
                torch.nn.functional.cosine_similarity(emb, txt)

    n = args.batches * args.batch_size
    rows = {
        "shared backbone, batched tensors (combine)": n / _time(run_shared, args.batches),
        "separate backbones, batched tensors": n / _time(run_separate, args.batches),
        "per-image PIL loop (open_clip transform)": args.pil_images / _time(run_pil, 1),
    }
    base = rows["per-image PIL loop (open_clip transform)"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nReward throughput: ViT-B-32-sized random open_clip, aesthetic + CLIPScore, {args.size} px, "
          f"batch {args.batch_size}, {args.batches} timed batches, {args.dtype}, {device}\n")
    print("| variant | images / s | vs PIL loop |")
    print("|---|---|---|")
    for name, ips in rows.items():
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "images_per_s": rows}, indent=2))


if __name__ == "__main__":
    main()
