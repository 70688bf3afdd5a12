"""The steering demonstration on the toy world (docs/steering.md, "Measured on the toy world").

Runs one steering method over the eval prompts (``--seeds`` images per prompt) and appends one JSON
row per steered image to ``OUT`` (resumable: jobs already there are skipped): the chosen image's
gold verdict (strict pass, partial credit), its ``shapes-proxy`` score, every candidate's gold
strict verdict (best-of-N: all N, so best-of-k for k <= N is read off the same run), the compute.

    python bench/steer_toy.py --method bon --k 8 --out runs/steer_toy/bon8.jsonl
    python bench/steer_toy.py --method fk --k 4 --potential gold --out runs/steer_toy/fk4_gold.jsonl
    python bench/steer_toy.py --report runs/steer_toy          # the table and the curve

The gold verifier (`shapes`, partial credit) is the potential only where the table says so (the
oracle case); otherwise the learned ``shapes-proxy`` steers and the gold verifier only judges.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def jobs(seeds: int, per_tag: int | None):
    from visalign.toy.prompts import TAGS, split

    metas = split("eval")
    if per_tag:
        metas = [m for t in TAGS for m in [x for x in metas if x["tag"] == t][:per_tag]]
    # seed-major: any prefix of the job list is whole seeds over every prompt (balanced categories)
    return [(j, m) for j, m in enumerate(m for _ in range(seeds) for m in metas)]


def run(args) -> None:
    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.steering import FKConfig, GuidanceConfig, best_of_n, fk_steer, guided, noise_search
    from visalign.steering.search import SearchConfig
    from visalign.toy.verify import verify

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["job"] for line in out.read_text().splitlines() if line.strip()}
    todo = [(j, m) for j, m in jobs(args.seeds, args.per_tag) if j not in done]
    sampler = vs.load("toy-shapes")
    gold, proxy = vr.load("shapes"), vr.load("shapes-proxy")
    potential = gold if args.potential == "gold" else proxy
    fk = FKConfig(lam=args.lam, potential=args.fk_potential, resampling=args.resampling, resample_every=args.every,
                  resample_start=args.start, resample_end=args.end, adaptive=args.adaptive, lookahead=args.lookahead,
                  final_resample=not args.no_final_resample, ode_last_step=args.ode_last_step)
    gcfg = GuidanceConfig(scale=args.gscale, max_grad_norm=args.max_grad_norm, through_denoiser=args.through,
                          start=args.gstart, end=args.gend, schedule=args.gschedule)
    common = dict(num_steps=args.steps, guidance_scale=3.0, prompts_per_batch=args.batch_prompts)
    print(f"{len(todo)} jobs to run -> {out}", flush=True)
    for c in range(0, len(todo), args.chunk):
        part = todo[c:c + args.chunk]
        prompts, metas = [m["prompt"] for _, m in part], [m for _, m in part]
        seed = args.seed + part[0][0] * 1000  # job-indexed seeds: a resumed run draws what it would have drawn
        t0 = time.perf_counter()
        if args.method == "bon":
            res = best_of_n(sampler, prompts, potential, n=args.k, metadata=metas, seed=seed, keep_particles=True,
                            kernel=args.kernel or "ode", **common)
        elif args.method == "fk":
            res = fk_steer(sampler, prompts, potential, fk, particles=args.k, metadata=metas, seed=seed,
                           keep_particles=True, kernel=args.kernel, **common)
        elif args.method == "fk+guidance":
            res = fk_steer(sampler, prompts, potential, fk, particles=args.k, metadata=metas, seed=seed,
                           proposal=gcfg, proposal_reward=proxy, keep_particles=True, kernel=args.kernel, **common)
        elif args.method == "guidance":
            res = guided(sampler, prompts, proxy, gcfg, samples=args.guided_samples, metadata=metas, seed=seed,
                         keep_particles=True, kernel=args.kernel or "ode", **common)
        elif args.method == "search":
            res = noise_search(sampler, prompts, potential, SearchConfig(rounds=args.rounds, radius=args.radius),
                               candidates=args.k, metadata=metas, seed=seed, keep_particles=True, **common)
        else:
            raise SystemExit(f"unknown method {args.method}")
        rows = []
        for (j, meta), item in zip(part, res.items):
            v = verify(item.image.unsqueeze(0), metadata=[meta])[0]
            cand = verify(item.particles, metadata=[meta] * item.particles.shape[0])
            with torch.no_grad():
                p = proxy(item.image.unsqueeze(0), [meta["prompt"]]).scores
                cp = proxy(item.particles, [meta["prompt"]] * item.particles.shape[0]).scores
            rows.append({"job": j, "prompt": meta["prompt"], "tag": meta["tag"], "strict": float(v.strict),
                         "partial": float(v.partial), "proxy": float(p[0]), "steer_reward": item.reward,
                         "candidates_strict": [float(x.strict) for x in cand],
                         "candidates_partial": [float(x.partial) for x in cand], "candidates_proxy": cp.tolist(), "particle_rewards": item.particle_rewards,
                         "chosen": item.chosen, "compute": {k: v for k, v in res.compute.items() if k != "total_seconds"}})
        with out.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        dt = time.perf_counter() - t0
        acc = sum(r["strict"] for r in rows) / len(rows)
        print(f"{c + len(part)}/{len(todo)} jobs, {dt:.1f} s, chunk strict {acc:.3f}", flush=True)


def overall(rows, key="strict"):
    from visalign.toy.prompts import TAGS
    from visalign.toy.prompts import overall as geneval_overall

    cats = {}
    for t in TAGS:
        vals = [r[key] for r in rows if r["tag"] == t]
        if vals:
            cats[t] = sum(vals) / len(vals)
    return geneval_overall(cats), cats


def diagnose(seeds: int = 1, steps: int = 10, lookahead: int = 2) -> dict:
    """How well the potential predicts the outcome: ROC AUC of the gold partial credit of the
    x0-prediction (and of a ``lookahead``-step ODE look-ahead) after each step, against the final
    image's gold strict pass, on flow-SDE rollouts of the eval prompts (FK's proposal).  FK can only
    beat best-of-N where this is well above 0.5 early enough for copies to diverge."""
    import numpy as np

    import visalign.samplers as vs
    from visalign.steering.common import CountingDenoiser, lookahead_x0
    from visalign.toy.verify import verify

    sampler = vs.load("toy-shapes")
    metas = [m for _, m in jobs(seeds, None)]
    den = CountingDenoiser(sampler, 3.0)
    partial: dict[str, list] = {}

    class Probe:
        def after_step(self, state):
            meta = metas[self.start:self.start + state.latents.shape[0]]
            if state.i < steps - 1:
                for name, x0 in (("x0", state.step.x0),
                                 (f"lookahead{lookahead}", lookahead_x0(den, state.latents, state.schedule, state.i + 1,
                                                                        lookahead, state.cond))):
                    v = verify(sampler.decode(x0).float(), metadata=meta)
                    partial.setdefault(f"{name}@{state.i + 1}", []).extend(x.partial for x in v)

    probe, final = Probe(), []
    for start in range(0, len(metas), 128):
        probe.start = start
        part = metas[start:start + 128]
        r = vs.collect(sampler, [m["prompt"] for m in part], num_steps=steps, guidance_scale=3.0, kernel="flow_sde",
                       seeds=list(range(start, start + len(part))), hooks=[probe])
        final += [float(v.strict) for v in verify(r.images, metadata=part)]
    y = np.array(final)

    def auc(score):
        s = np.array(score)
        pos, neg = s[y == 1], s[y == 0]
        return float(((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))

    return {"n": len(y), "final_pass": float(y.mean()), "auc": {k: round(auc(v), 3) for k, v in partial.items()}}


def best_of_first(rows, k, by="particle_rewards"):
    """Best-of-k read off a best-of-N run (k <= N): the candidate with the highest steering reward among
    the first k (their seeds are those a best-of-k run draws), judged by the gold verifier."""
    out = []
    for r in rows:
        rew = [x if x == x else -1e9 for x in r[by][:k]]
        c = max(range(k), key=lambda i: rew[i])
        out.append(dict(r, strict=r["candidates_strict"][c]))
    return out


def summary(path, k=None, by="particle_rewards", max_jobs=None):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    if max_jobs is not None:
        rows = [r for r in rows if r["job"] < max_jobs]
    if k is not None:
        rows = best_of_first(rows, k, by)
    o, cats = overall(rows)
    comp = rows[0]["compute"]
    return {"n": len(rows), "overall": o, "per_category": cats, "strict_all": sum(r["strict"] for r in rows) / len(rows),
            "denoiser_calls": comp["denoiser_calls"], "reward_calls": comp["reward_calls"],
            "seconds": sum(r["compute"]["seconds"] for r in rows) / len(rows)}


def plot_curve(bon: str, fk: dict[int, str], out: str, bon_proxy: bool = False, max_jobs: int | None = None) -> None:
    """Gold accuracy against denoiser calls per image: best-of-k (read off one best-of-N run, 20 k
    calls) and FK-k (one run each; its look-ahead's calls included), k labelled at each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(json.loads(Path(bon).read_text().splitlines()[0])["particle_rewards"])
    per = summary(bon, max_jobs=max_jobs)["denoiser_calls"] / n
    bk = [k for k in (1, 2, 4, 8) if k <= n]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=150)
    series = [("best-of-k, gold selects", "o-", [per * k for k in bk], [summary(bon, k, max_jobs=max_jobs)["overall"] for k in bk], bk)]
    if bon_proxy:
        series.append(("best-of-k, shapes-proxy selects", "s--", [per * k for k in bk],
                       [summary(bon, k, "candidates_proxy", max_jobs)["overall"] for k in bk], bk))
    ks = sorted(fk)
    series.append(("FK-k, gold potential (3-step look-ahead)", "^-", [summary(fk[k], max_jobs=max_jobs)["denoiser_calls"] for k in ks],
                   [summary(fk[k], max_jobs=max_jobs)["overall"] for k in ks], ks))
    for label, style, xs, ys, kk in series:
        ax.plot(xs, ys, style, label=label)
        for x, y, k in zip(xs, ys, kk):
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoiser calls per image (10 steps, CFG: 20 per sample)")
    ax.set_ylabel("gold strict accuracy (GenEval mean)")
    seeds = "" if max_jobs is None else f" x {max_jobs // 243} seeds"
    ax.set_title(f"toy world, 243 eval prompts{seeds}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)


def table(folder: str, per_seed: int = 243, seeds: int | None = None) -> str:
    """The markdown table of docs/steering.md from the run files in ``folder`` (missing runs skipped),
    every row on the same whole seeds (the fewest any run has completed)."""
    f = Path(folder)
    counts = [len([x for x in p.read_text().splitlines() if x.strip()]) for p in f.glob("*.jsonl")]
    max_jobs = min(c // per_seed for c in counts) * per_seed if counts else None
    if seeds is not None:
        max_jobs = seeds * per_seed  # runs with fewer seeds are left out
    lines = ["| method (k) | steers with | selects with | gold strict (GenEval mean) | all samples | denoiser calls / image | reward calls / image | s / image |",
             "|---|---|---|---|---|---|---|---|"]

    def add(name, steer, select, path, k=None, by="particle_rewards", scale_time=1.0):
        if not (f / path).exists():
            return
        text = [x for x in (f / path).read_text().splitlines() if x.strip()]
        if max_jobs is not None and len(text) < max_jobs:
            return  # this run has fewer seeds than the table
        first = json.loads(text[0])
        if k is not None and (by not in first or len(first[by]) < k):
            return
        s = summary(f / path, k, by, max_jobs)
        nfe = s["denoiser_calls"] * (k / 8 if k else 1) if path.startswith("bon8") else s["denoiser_calls"]
        rc = (k if k else s["reward_calls"]) if path.startswith("bon8") else s["reward_calls"]
        lines.append(f"| {name} | {steer} | {select} | **{s['overall']:.3f}** | {s['strict_all']:.3f} | {nfe:.0f} | "
                     f"{rc:.0f} | {s['seconds'] * scale_time:.2f} |")

    add("base (ODE, 1 sample)", "-", "-", "bon8_gold.jsonl", 1, scale_time=1 / 8)
    for k in (2, 4, 5, 8):
        add(f"best-of-{k} (ODE)", "-", "gold", "bon8_gold.jsonl", k, scale_time=k / 8)
    for k in (2, 4, 8):
        add(f"best-of-{k} (ODE)", "-", "shapes-proxy", "bon8_gold.jsonl", k, "candidates_proxy", scale_time=k / 8)
    for k in (2, 4, 8):
        add(f"FK k = {k}", "gold (potential)", "gold", f"fk{k}_gold.jsonl")
    add("FK k = 4", "shapes-proxy (potential)", "shapes-proxy", "fk4_proxy.jsonl")
    add("guidance", "shapes-proxy (gradient)", "-", "guidance_proxy.jsonl")
    add("FK + guidance k = 4", "shapes-proxy (potential + gradient)", "shapes-proxy", "fk4g_proxy.jsonl")
    add("guided best-of-4", "shapes-proxy (gradient)", "shapes-proxy", "guidance4_proxy.jsonl")
    return f"({max_jobs // per_seed} seed(s) per prompt, {max_jobs} images per row)\n\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="bon", choices=["bon", "fk", "guidance", "fk+guidance", "search"])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--potential", default="proxy", choices=["gold", "proxy"])
    p.add_argument("--out", default="runs/steer_toy/out.jsonl")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--per-tag", type=int, default=None, help="only the first N prompts of each category (tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kernel", default=None)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--fk-potential", default="difference")
    p.add_argument("--resampling", default="multinomial")
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--start", type=int, default=2)
    p.add_argument("--end", type=int, default=8)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--lookahead", type=int, default=0)
    p.add_argument("--no-final-resample", action="store_true")
    p.add_argument("--ode-last-step", action="store_true", help="FK: the last step without noise (the library default)")
    p.add_argument("--gscale", type=float, default=1.0)
    p.add_argument("--gstart", type=int, default=0)
    p.add_argument("--gend", type=int, default=None)
    p.add_argument("--gschedule", default="constant")
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--through", action="store_true", help="guidance gradient through the denoiser")
    p.add_argument("--guided-samples", type=int, default=1, help="guidance: best of this many guided samples (proxy)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--radius", type=float, default=0.5)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64, help="jobs per appended chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", nargs="+", default=None,
                   help="print the summary of these JSONL files (FILE, FILE:k or FILE:k:candidates_proxy)")
    p.add_argument("--table", default=None, help="print the docs table from the runs in this folder")
    p.add_argument("--table-seeds", type=int, default=None, help="rows on the first N seeds (default: all complete)")
    p.add_argument("--diagnose", action="store_true", help="AUC of the intermediate potentials for the final pass")
    p.add_argument("--plot", nargs="+", default=None,
                   help="the curve: BON_FILE K=FK_FILE ... OUT.png (best-of-k read off BON_FILE)")
    args = p.parse_args()
    if args.table:
        print(table(args.table, seeds=args.table_seeds))
        return
    if args.diagnose:
        print(json.dumps(diagnose(args.seeds), indent=1))
        return
    if args.plot:
        bon, *pairs, png = args.plot
        plot_curve(bon, {int(k): f for k, _, f in (x.partition("=") for x in pairs)}, png, bon_proxy=True,
                   max_jobs=None if args.table_seeds is None else 243 * args.table_seeds)
        return
    if args.summary:
        for spec in args.summary:
            path, _, rest = spec.partition(":")
            k, _, by = rest.partition(":")
            s = summary(path, int(k) if k else None, by or "particle_rewards")
            cats = " ".join(f"{t[:5]} {v:.3f}" for t, v in s["per_category"].items())
            print(f"{spec}: n {s['n']} overall {s['overall']:.3f} (all {s['strict_all']:.3f}) NFE {s['denoiser_calls']:.0f} "
                  f"reward {s['reward_calls']:.1f} s/img {s['seconds']:.2f} | {cats}")
        return
    run(args)


if __name__ == "__main__":
    main()
