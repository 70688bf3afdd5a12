"""Reward hacking on the toy world with and without the guards (docs/reward_training.md, "Hacking
with and without the guards on the toy world").

Reward back-propagation (``configs/toy/reward_backprop.yaml``: DRaFT-1, LoRA, learning rate 1e-3)
trains toy-shapes on a 4-member ``shapes-proxy`` ensemble (``visalign rewards train shapes-proxy
--out PROXY``; its members' spread is the ``uncertainty`` the guards read) under several guard
settings; every evaluation scores the same held-out images with the gold verifier ``shapes``, the
proxy itself and the held-out artifact detector ``shapes-artifact`` (paired seeds), and the
held-out alarm of the trainer floor watches them.

    python bench/backprop_overopt.py prompts EVAL.jsonl                  # category-balanced eval prompts
    python bench/guards_hacking.py run --proxy PROXY --eval EVAL.jsonl --root ROOT none pen1 gkl gklref
    python bench/guards_hacking.py report ROOT/none ROOT/pen1 ... --labels ... --out docs/img/guards_hacking.png

``run`` trains one setting after another (:func:`settings` below; 50 iterations, evaluation every 10, one
sample per evaluation prompt, one torch thread) into ``ROOT/<setting>``.  ``report`` draws the
proxy's held-out mean and the gold overall strict accuracy (the mean of the six GenEval
categories) and the held-out artifact detector against the iteration, one colour per run, a cross
where the held-out alarm rang (gold or the artifact detector below its peak while the proxy rose), and
prints per run: the best gold point, the final gold, the proxy's gain, where hacking starts (the
best gold point, when the run ends more than 1 point below it in gold with the proxy more than 0.01
above its value there) and the wall time (first to last file of the run folder: training and
evaluations).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def settings(proxy: str) -> dict[str, tuple[str, list[str]]]:
    """Setting name -> (trained reward spec, extra recipe overrides)."""
    plain = f"shapes-proxy:path={proxy}"

    def pen(kappa: float) -> str:
        return f"uncertainty_penalty:reward=shapes-proxy,path={proxy},kappa={kappa:g}"

    gated = ["backprop.kl_beta=0.1", "guards.kl_gate_quantile=0.5"]
    return {
        "none": (plain, []),
        "pen1": (pen(1), []),
        "pen3": (pen(3), []),
        "kl": (plain, ["backprop.kl_beta=0.1"]),
        "gkl": (plain, gated),
        "klref": (plain, ["backprop.kl_beta=0.1", "guards.reference_refresh_every=10"]),
        "gklref": (plain, [*gated, "guards.reference_refresh_every=10"]),
    }


def run(args) -> None:
    table = settings(str(Path(args.proxy).resolve()))
    plain = table["none"][0]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for name in args.settings:
        if name not in table:
            raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(table)}")
        spec, extra = table[name]
        evals = ["shapes", plain, "shapes-artifact"] + ([spec] if spec != plain else [])
        cmd = [sys.executable, "-m", "visalign", "train", str(REPO / "configs/toy/reward_backprop.yaml"),
               f"run.run_dir={root / name}", f"rewards={json.dumps({spec: 1.0})}", f"eval_rewards={json.dumps(evals)}",
               f"data.eval={args.eval}", "run.eval_samples_per_prompt=1", f"run.iterations={args.iterations}",
               f"run.eval_every={args.eval_every}", "run.checkpoint_every=25", "run.progress=false", *extra,
               "--threads", "1"]
        t0 = time.time()
        with open(root / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: rc {rc}, {time.time() - t0:.0f} s", flush=True)


def read_run(run: str) -> dict:
    from visalign.toy.prompts import TAGS

    d = Path(run)
    evals = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines() if x.strip()]
    specs = json.loads((d / "config.json").read_text())["eval_rewards"]  # a spec's path may hold "/"
    proxy_key = "eval/" + next(s for s in specs if s == "shapes-proxy" or s.startswith("shapes-proxy:"))
    files = [p for p in d.rglob("*") if p.is_file()]
    wall = max(p.stat().st_mtime for p in files) - (d / "config.json").stat().st_mtime
    metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "train_seconds": sum(m.get("time/iteration", 0.0) for m in metrics),
        "iteration": [e["iteration"] for e in evals],
        "gold": [sum(e[f"eval/shapes/strict/{t}"] for t in TAGS) / len(TAGS) for e in evals],
        "proxy": [e[proxy_key] for e in evals],
        "artifact": [e.get("eval/shapes-artifact", float("nan")) for e in evals],
        "alarm": [bool(e.get("alarm/hacking", 0.0)) for e in evals],
        "wall_seconds": wall,
    }


def hacking_start(it, gold, proxy, tol: float = 0.01):
    """The best gold point's iteration when the run ends more than ``tol`` below it in gold with the
    proxy more than ``tol`` above its value there: from there on the proxy gains while gold loses
    (None: the run does not end that way)."""
    best = max(range(len(gold)), key=lambda j: gold[j])
    if gold[best] - gold[-1] > tol and proxy[-1] - proxy[best] > tol:
        return it[best]
    return None


def summary(r: dict) -> dict:
    gold, proxy, it = r["gold"], r["proxy"], r["iteration"]
    best = max(range(len(gold)), key=lambda j: gold[j])
    return {"base_gold": gold[0], "best_gold": gold[best], "best_iteration": it[best], "final_gold": gold[-1],
            "final_below_best": gold[best] - gold[-1], "base_proxy": proxy[0], "final_proxy": proxy[-1],
            "proxy_gain": proxy[-1] - proxy[0], "max_proxy_gain": max(proxy) - proxy[0],
            "hacking_from": hacking_start(it, gold, proxy), "alarms": [i for i, a in zip(it, r["alarm"]) if a],
            "artifact_final_minus_base": r["artifact"][-1] - r["artifact"][0], "wall_minutes": r["wall_seconds"] / 60,
            "train_minutes": r["train_seconds"] / 60}


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_run(run) for label, run in zip(args.labels, args.runs)}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    for label, r in data.items():
        line, = ax1.plot(r["iteration"], r["proxy"], marker="o", ms=3, label=label)
        ax2.plot(r["iteration"], [100 * g for g in r["gold"]], marker="o", ms=3, color=line.get_color(), label=label)
        ax3.plot(r["iteration"], r["artifact"], marker="o", ms=3, color=line.get_color(), label=label)
        rang = [j for j, a in enumerate(r["alarm"]) if a]
        if rang:
            ax2.scatter([r["iteration"][j] for j in rang], [100 * r["gold"][j] for j in rang], marker="x", s=70,
                        color=line.get_color(), zorder=5)
            ax3.scatter([r["iteration"][j] for j in rang], [r["artifact"][j] for j in rang], marker="x", s=70,
                        color=line.get_color(), zorder=5)
    base = 100 * next(iter(data.values()))["gold"][0]
    ax2.axhline(base, color="grey", lw=0.8, ls="--", label="base")
    ax2.scatter([], [], marker="x", color="k", label="held-out alarm rang")
    ax1.set(title="proxy (4-member shapes-proxy, trained on): held-out mean", xlabel="iteration",
            ylabel="P(strict pass) predicted")
    ax2.set(title="gold (shapes verifier): overall strict accuracy", xlabel="iteration", ylabel="GenEval overall (%)")
    ax3.set(title="held out: shapes-artifact P(clean)", xlabel="iteration", ylabel="mean P(clean)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    for label, r in data.items():
        s = summary(r)
        print(f"{label}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}))
        print("   iteration:", r["iteration"])
        print("   proxy:    ", [round(x, 4) for x in r["proxy"]])
        print("   gold:     ", [round(x, 4) for x in r["gold"]])
        print("   artifact: ", [round(x, 4) for x in r["artifact"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("settings", nargs="+")
    p.add_argument("--proxy", required=True, help="a 4-member folder from `visalign rewards train shapes-proxy`")
    p.add_argument("--eval", required=True, help="evaluation prompts (bench/backprop_overopt.py prompts)")
    p.add_argument("--root", required=True)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=10)
    r = sub.add_parser("report")
    r.add_argument("runs", nargs="+")
    r.add_argument("--labels", nargs="+", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--title", default=None)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        if len(args.labels) != len(args.runs):
            ap.error("give one label per run")
        report(args)


if __name__ == "__main__":
    main()
