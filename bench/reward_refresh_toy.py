"""The toy reward-refresh measurement's figure and table, from finished training runs.

Each run is a folder written by ``visalign train`` (``eval.jsonl``, ``metrics.jsonl``): DRaFT-1
through ``shapes-proxy`` with and without ``reward_refresh`` (configs/toy/reward_backprop.yaml and
configs/toy/reward_backprop_refresh.yaml).  The x axis is the run's training wall time: the sum of
``time/iteration`` up to each evaluation (the refresh's sampling, labelling and head fine-tuning
included, the held-out evaluations excluded).  Left: gold strict accuracy on the evaluation prompts;
right: the mean of the trained proxy on them (for a refresh run the refreshed head, and dashed the
frozen shipped proxy when the run evaluated it under ``--frozen-proxy``'s name).

Or from rows of the toy alignment bench (``bench/toy_alignment.py``: each row's ``points.jsonl``,
the 243 x 4 evaluation, wall time = iterations only; the proxy is the frozen shipped one, and a
refresh row's labels are read from its run's ``metrics.jsonl``)::

    python bench/reward_refresh_toy.py --bench-row "DRaFT-1=runs/toy_bench/rows/reward_backprop" \
        --bench-row "DRaFT-1 + refresh=runs/toy_bench/rows/reward_backprop_refresh" ... --out docs/img/reward_refresh_bench.png

Usage::

    python bench/reward_refresh_toy.py --run "no refresh=runs/bp/k1" --run "refresh=runs/refresh/r" \
        --frozen-proxy "shapes-proxy:path=runs/refresh/proxy0" --out docs/img/reward_refresh.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_run(run_dir: str | Path, frozen_proxy: str | None = None) -> dict:
    run_dir = Path(run_dir)
    evals, rows = _jsonl(run_dir / "eval.jsonl"), _jsonl(run_dir / "metrics.jsonl")
    clock, labels, t = {0: 0.0}, {0: 0}, 0.0
    for r in rows:
        t += float(r.get("time/iteration", 0.0))
        clock[int(r["iteration"])] = t
        labels[int(r["iteration"])] = int(r.get("refresh/labels", 0))
    out = {"iteration": [], "minutes": [], "gold": [], "proxy": [], "frozen": [], "labels": [], "per_tag": []}
    for e in evals:
        it = int(e["iteration"])
        if it not in clock:
            continue
        out["iteration"].append(it)
        out["minutes"].append(clock[it] / 60)
        out["gold"].append(e["eval/shapes/strict"])
        out["proxy"].append(e.get("eval/shapes-proxy"))
        out["frozen"].append(e.get(f"eval/{frozen_proxy}") if frozen_proxy else None)
        out["labels"].append(labels[it])
        out["per_tag"].append({k.split("/")[-1]: v for k, v in e.items() if k.startswith("eval/shapes/strict/")})
    refresh = [r for r in rows if "refresh/round" in r]
    out["refreshes"] = [{k: r.get(k) for k in ("iteration", "refresh/new_labels", "refresh/label_mean",
                                               "refresh/accuracy_before", "refresh/accuracy_after",
                                               "refresh/seconds")} for r in refresh]
    return out


def load_bench_row(row_dir: str | Path) -> dict:
    """A training row of the toy alignment bench as :func:`load_run`'s dict (``proxy`` is the
    frozen shipped proxy the bench scores every evaluation with; ``frozen`` is empty)."""
    row_dir = Path(row_dir)
    points = sorted(_jsonl(row_dir / "points.jsonl"), key=lambda p: p["fraction"])
    refresh_labels = {0: 0}
    metrics = row_dir / "run" / "metrics.jsonl"
    rows = _jsonl(metrics) if metrics.is_file() else []
    for r in rows:
        refresh_labels[int(r["iteration"])] = int(r.get("refresh/labels", 0))
    out = {"iteration": [], "minutes": [], "gold": [], "proxy": [], "frozen": [], "labels": [], "per_tag": [],
           "proxy_kind": "shipped",
           "refreshes": [{k: r.get(k) for k in ("iteration", "refresh/new_labels", "refresh/label_mean",
                                                "refresh/accuracy_before", "refresh/accuracy_after", "refresh/seconds")}
                         for r in rows if "refresh/round" in r]}
    for p in points:
        it = int(p["iterations"])
        known = [i for i in refresh_labels if i <= it]
        out["iteration"].append(it)
        out["minutes"].append(p["wall_seconds"] / 60)
        out["gold"].append(p["overall_strict"])
        out["proxy"].append(p["proxy"])
        out["frozen"].append(None)
        out["labels"].append(max(int(p["labels"]), refresh_labels[max(known)]))
        out["per_tag"].append(p["per_category"])
    return out


def frozen_accuracy(run_dir: str | Path, proxy_dir: str, samples: int) -> list[float]:
    """The frozen proxy's accuracy on each refresh round's labelled samples (the label store of the
    run's newest checkpoint, ``samples`` per round), to set beside the refreshed head's
    ``refresh/accuracy_before`` on the same samples."""
    import torch

    from visalign.toy.proxy_reward import ShapesProxyReward
    from visalign.trainers.common.checkpoint import latest_checkpoint, load_checkpoint

    store = load_checkpoint(latest_checkpoint(run_dir))["reward_refresh"]["store"]
    proxy = ShapesProxyReward(proxy_dir)
    images, prompts, labels = store["images"].float() / 255, store["prompts"], store["targets"]
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), samples):
            p = proxy(images[s:s + samples], prompts[s:s + samples]).scores
            out.append(float(((p > 0.5) == (labels[s:s + samples] > 0.5)).float().mean()))
    return out


def plot(runs: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, r) in enumerate(runs.items()):
        color = f"C{i}"
        label = name + (f" ({r['labels'][-1]} labels)" if r["labels"][-1] else "")
        a.plot(r["minutes"], r["gold"], "o-", color=color, label=label)
        kind = ": shipped proxy" if r.get("proxy_kind") == "shipped" else (": refreshed proxy" if r["labels"][-1] else "")
        b.plot(r["minutes"], r["proxy"], "o-", color=color, label=name + kind)
        if any(v is not None for v in r["frozen"]):
            b.plot(r["minutes"], r["frozen"], "s--", color=color, alpha=0.6, label=name + ": shipped proxy (frozen)")
    base = next(iter(runs.values()))["gold"][0]
    a.axhline(base, color="grey", lw=0.8)
    a.axhline(base + 0.10, color="grey", lw=0.8, ls=":", label="target: +10 points")
    a.set(xlabel="training wall time, minutes (one CPU thread)", ylabel="gold strict accuracy (held out)",
          title="gold verifier")
    b.set(xlabel="training wall time, minutes (one CPU thread)", ylabel="proxy mean P(strict) (held out)",
          title="the shipped proxy (frozen)" if all(r.get("proxy_kind") == "shipped" for r in runs.values())
          else "the trained proxy")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def table(runs: dict[str, dict]) -> str:
    lines = ["| run | iteration | minutes | labels | gold strict | proxy (trained) | proxy (shipped, frozen) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        for j in range(len(r["iteration"])):
            fz = r["frozen"][j]
            lines.append(f"| {name} | {r['iteration'][j]} | {r['minutes'][j]:.1f} | {r['labels'][j]} | "
                         f"{r['gold'][j]:.3f} | {r['proxy'][j]:.3f} | {'' if fz is None else f'{fz:.3f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeat)")
    ap.add_argument("--bench-row", action="append", default=[], help="NAME=BENCH_OUT/rows/ROW (repeat)")
    ap.add_argument("--frozen-proxy", default=None, help="the eval reward name of the frozen shipped proxy")
    ap.add_argument("--out", default="docs/img/reward_refresh.png")
    ap.add_argument("--title", default="DRaFT-1 through shapes-proxy on toy-shapes, with and without reward refresh")
    ap.add_argument("--frozen-dir", default=None, help="the frozen proxy's folder: its accuracy on every round's samples")
    ap.add_argument("--samples", type=int, default=128, help="labelled samples per refresh round")
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = load_run(path, args.frozen_proxy)
    for spec in args.bench_row:
        name, _, path = spec.partition("=")
        runs[name] = load_bench_row(path)
    if not runs:
        ap.error("give at least one --run NAME=RUN_DIR or --bench-row NAME=ROW_DIR")
    plot(runs, Path(args.out), args.title)
    print(table(runs))
    for name, r in runs.items():
        if r["refreshes"]:
            print(f"\n{name}: refreshes")
            frozen = frozen_accuracy(dict(x.partition("=")[::2] for x in args.run)[name], args.frozen_dir,
                                     args.samples) if args.frozen_dir else []
            for j, x in enumerate(r["refreshes"]):
                print(json.dumps({**x, "frozen_accuracy": frozen[j] if j < len(frozen) else None}))
        print(f"\n{name}: per-category strict accuracy, first and last evaluation")
        print(json.dumps(r["per_tag"][0]), "\n", json.dumps(r["per_tag"][-1]))


if __name__ == "__main__":
    main()
