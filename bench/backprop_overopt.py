"""The over-optimisation curve of reward back-propagation on the toy world (docs/reward_backprop.md).

Trains toy-shapes against the learned proxy ``shapes-proxy`` with ``configs/toy/reward_backprop.yaml``
under several settings and reads each run's own ``eval.jsonl`` (gold verifier ``shapes`` and the
proxy on the same held-out images at every evaluation, paired seeds).

    python bench/backprop_overopt.py prompts OUT.jsonl [--per-category 64]
    visalign train configs/toy/reward_backprop.yaml data.eval=OUT.jsonl run.eval_samples_per_prompt=1 \
        run.run_dir=RUN ...                                        # one run per setting
    python bench/backprop_overopt.py report RUN [RUN ...] --labels A B ... --out docs/img/backprop_overopt.png

``prompts`` writes a category-balanced evaluation set: the eval split's prompts of each GenEval
category, repeated in turn until the category has ``--per-category`` entries (each entry is its
own sample with its own seed).  The GenEval overall score is the unweighted mean of the six
categories, so with one or two samples per eval prompt the three single-object prompts carry a
sixth of the score on six images; equal images per category halve the standard error of the
overall score at fewer images (64 x 6 = 384).

``report`` draws the proxy's held-out mean and the gold overall strict accuracy against the
iteration for every run, and prints, per run, the best gold point, the wall time to reach it
(training and evaluation time from metrics.jsonl up to that iteration) and where hacking starts:
the first evaluation after which the proxy keeps rising while gold falls below its best.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_prompts(out: str, per_category: int) -> None:
    from visalign.prompts import load_prompts
    from visalign.toy.prompts import TAGS

    records = load_prompts("toy:eval")
    rows = []
    for tag in TAGS:
        mine = [r for r in records if r["metadata"]["tag"] == tag]
        step = max(1, len(mine) // per_category)  # large categories: evenly spaced prompts
        for i in range(per_category):
            r = mine[(i * step) % len(mine)] if step > 1 else mine[i % len(mine)]
            rows.append({"prompt": r["prompt"], **r["metadata"]})
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts ({per_category} per category) to {out}")


def read_run(run: str) -> dict:
    from visalign.toy.prompts import TAGS

    run_dir = Path(run)
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    it = [e["iteration"] for e in evals]
    gold = [sum(e[f"eval/shapes/strict/{t}"] for t in TAGS) / len(TAGS) for e in evals]
    proxy = [e["eval/shapes-proxy"] for e in evals]
    train_time = {m["iteration"]: m["time/iteration"] for m in metrics}
    cum, t = {}, 0.0
    for i in sorted(train_time):
        t += train_time[i]
        cum[i] = t
    return {"iteration": it, "gold": gold, "proxy": proxy, "train_seconds": [cum.get(i, 0.0) for i in it],
            "config": json.loads((run_dir / "config.json").read_text())}


def summarise(name: str, r: dict) -> str:
    gold, proxy, it = r["gold"], r["proxy"], r["iteration"]
    best = max(range(len(gold)), key=lambda j: gold[j])
    hack = None
    for j in range(1, len(gold)):
        # hacking: from here on the proxy stays above its value here while gold stays below its best so far
        if all(proxy[k] >= proxy[j - 1] for k in range(j, len(gold))) and all(
                gold[k] < max(gold[: j]) for k in range(j, len(gold))):
            hack = it[j - 1]
            break
    return (f"{name}: base gold {gold[0]:.3f} proxy {proxy[0]:.3f}; best gold {gold[best]:.3f} at iteration "
            f"{it[best]} ({r['train_seconds'][best] / 60:.1f} min of training iterations), proxy there "
            f"{proxy[best]:.3f}; final gold {gold[-1]:.3f} proxy {proxy[-1]:.3f}; hacking from iteration "
            f"{hack if hack is not None else '-'}")


def report(runs: list[str], labels: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_run(run) for label, run in zip(labels, runs)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, r in data.items():
        line, = ax1.plot(r["iteration"], r["proxy"], marker="o", ms=3, label=label)
        ax2.plot(r["iteration"], r["gold"], marker="o", ms=3, color=line.get_color(), label=label)
    base = next(iter(data.values()))["gold"][0]
    ax2.axhline(base, color="grey", lw=0.8, ls="--", label="base")
    ax1.set(title="proxy (shapes-proxy, trained on): held-out mean", xlabel="iteration", ylabel="P(pass) predicted")
    ax2.set(title="gold (shapes verifier): overall strict accuracy", xlabel="iteration", ylabel="GenEval overall")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    for label, r in data.items():
        print(summarise(label, r))
        print("   iteration:", r["iteration"])
        print("   proxy:    ", [round(x, 3) for x in r["proxy"]])
        print("   gold:     ", [round(x, 3) for x in r["gold"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("out")
    p.add_argument("--per-category", type=int, default=64)
    r = sub.add_parser("report")
    r.add_argument("runs", nargs="+")
    r.add_argument("--labels", nargs="+", required=True)
    r.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "prompts":
        write_prompts(args.out, args.per_category)
    else:
        if len(args.labels) != len(args.runs):
            ap.error("give one label per run")
        report(args.runs, args.labels, args.out)


if __name__ == "__main__":
    main()
