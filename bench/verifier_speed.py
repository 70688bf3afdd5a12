"""Gold verifier throughput on one core (target >= 500 images/s at 32 px).

    python bench/verifier_speed.py [--n 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from visalign.toy.prompts import split
from visalign.toy.render import render_batch
from visalign.toy.verify import verify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    evals = split("eval")
    metas = [evals[int(i)] for i in rng.integers(len(evals), size=args.n)]
    images = torch.from_numpy(render_batch(metas, rng))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        verify(images, metadata=metas)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"verifier: {args.n} renderer images at {images.shape[-1]} px, one thread: {args.n / best:.0f} images/s "
          f"(best of {args.repeats}; median {args.n / sorted(times)[len(times) // 2]:.0f})")


if __name__ == "__main__":
    main()
