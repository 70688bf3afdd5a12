"""shapes-proxy: the reward-head kit against the bespoke trainer it replaced, side by side.

Both train on the same cached pool of base-model samples (made once with ``toy-shapes`` when
absent) and report the ROC AUC of P(strict) against the gold verifier on the same 480 held-out
base-model samples of eval-split prompts.  Wall time per run includes everything after the pool:
rendering and labelling renderer images, training, held-out evaluation.  The bespoke trainer is
read from git at ``--baseline-ref`` (the commit before the kit; its ``visalign/toy`` files are
copied into a temporary package), so the comparison can be rerun after it left the tree.

Usage (one CPU slot, one thread):
    python bench/reward_kit_proxy.py --out OUT [--pool POOL] [--which kit|baseline|both]
        [--set optim.steps=600 ...]
Without ``--pool`` the recipe's default pool (``$VISALIGN_CACHE/toy_pools``) is used (made when absent).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def pool_model(pool: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(pool), framework="pt") as f:
        return f.metadata()["model"]


def run_baseline(pool: Path, out: Path, ref: str, steps: int, seed: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    pkg = tmp / "_baseline_toy"
    pkg.mkdir()
    files = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", ref, "visalign/toy/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{f}"], capture_output=True, text=True,
                              check=True).stdout
        (pkg / Path(f).name).write_text(text)
    sys.path.insert(0, str(tmp))
    from _baseline_toy.proxy import train_proxy  # noqa: E402  (the bespoke trainer at ``ref``)

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pool, out / "pool.safetensors")
    t0 = time.time()
    m = train_proxy(out, model=pool_model(pool), steps=steps, seed=seed, threads=1, log=lambda s: None)
    wall = time.time() - t0
    return {"which": "baseline", "ref": ref, "steps": steps, "wall_seconds": round(wall, 1),
            "train_seconds": m["train_seconds"], "heldout_auc": m["heldout_auc"],
            "heldout_accuracy_at_0.5": m["heldout_accuracy_at_0.5"], "heldout_auc_by_tag": m["heldout_auc_by_tag"],
            "heldout_auc_unseen_compositions": m["heldout_auc_unseen_compositions"],
            "weights_bytes": m["weights_bytes"]}


def run_kit(pool: Path, out: Path, overrides: list[str], default_pool: bool) -> dict:
    from visalign.rewards.head_train import load_train_config, train

    pool_sets = [] if default_pool else [f"data.options.pool={pool}", f"data.options.model={pool_model(pool)}"]
    cfg = load_train_config("shapes-proxy", [*pool_sets, *overrides])
    t0 = time.time()
    m = train(cfg, out=out, log=lambda s: None)
    wall = time.time() - t0
    return {"which": "kit", "overrides": overrides, "steps": cfg.optim.steps, "wall_seconds": round(wall, 1),
            "train_seconds": m["train_seconds"], "data_seconds": m["data_seconds"], "heldout_auc": m["roc_auc"],
            "heldout_accuracy_at_0.5": m["accuracy"], "heldout_auc_by_tag": m["heldout_auc_by_tag"],
            "heldout_auc_unseen_compositions": m["heldout_auc_unseen_compositions"], "ece": m["ece"],
            "uncertainty_mean": m["uncertainty_mean"], "error_detection_auc": m["error_detection_auc"],
            "weights_bytes": m["weights_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default=None, help="pool file (made with toy-shapes when absent); default: the recipe's")
    ap.add_argument("--out", required=True)
    ap.add_argument("--which", default="both", choices=["kit", "baseline", "both"])
    ap.add_argument("--baseline-ref", default="3897834", help="git commit with the bespoke trainer")
    ap.add_argument("--baseline-steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="kit recipe override")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.pool is None:
        from visalign.toy.proxy import _default_pool_path

        pool = _default_pool_path("toy-shapes", args.seed, 1500, 480, 10)
    else:
        pool = Path(args.pool)
    if not pool.is_file():
        from visalign.toy.proxy import make_pool

        make_pool(pool, "toy-shapes", seed=args.seed)
    results = []
    for which in (["baseline", "kit"] if args.which == "both" else [args.which]):
        r = (run_baseline(pool, out / "baseline", args.baseline_ref, args.baseline_steps, args.seed)
             if which == "baseline" else run_kit(pool, out / "kit", args.overrides, args.pool is None))
        print(json.dumps(r), flush=True)
        results.append(r)
    (out / "results.jsonl").open("a").write("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
