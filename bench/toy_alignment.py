"""The toy alignment bench: every method on the same wall-clock budget, judged by the gold verifier.

Each row of the method table is one way to make ``toy-shapes`` follow its prompts better:

- ``base``: the model as shipped (``visalign toy eval``'s figure on the same prompts and seeds);
- ``oracle``: the bound: supervised flow matching on renderer scenes of the training prompts (perfect
  data, full fine-tuning from the shipped model; ``python -m visalign.toy.pretrain --init toy-shapes
  --lr 2e-4 --ema-decay 0.99 --max-minutes B``), for the same budget;
- training rows: a recipe of ``configs/toy/`` (``visalign train RECIPE run.max_minutes=B``), stopped by
  the trainer floor's wall-clock budget (``run.max_minutes``) instead of its iteration count;
- steering rows: a recipe of ``configs/steer/`` (inference only: no training budget; its cost is the
  seconds and denoiser calls per image);
- a combination: a training row's final weights (its LoRA, or its denoiser after full fine-tuning), then
  steered.

Training rows (and the oracle) are evaluated at fractions of the budget (``--fractions``, default
1/4, 1/2, 3/4, 1), so each draws a curve of gold accuracy against wall time.  Every evaluation is
``visalign toy eval``'s: ODE samples (10 steps, CFG 3) of the eval prompts (every prompt of the
grammar, training prompts included), ``--eval-samples`` per prompt (default 4), sample ``n`` with
seed ``n``, judged by the gold verifier, overall = GenEval's mean of the six category accuracies;
the strict accuracy of the 60 prompts whose compositions no training prompt has is reported beside
it (the table's "compositions never trained on"); the learned ``shapes-proxy``'s mean score on the same samples
is recorded beside it, so a row where the proxy rises while gold falls shows reward hacking.  With
``--eval-prompts N`` the evaluation uses N prompts picked round-robin over the categories instead of
all 243.

The budget counts the training iterations only (one CPU thread); evaluations and checkpoints are
not counted.  One-off setup that a method needs before its first iteration (offline DPO labels
its preference pairs: 1,464 gold labels) is timed separately, reported in the table and added to
the row's wall time in the curve.

Writes to ``--out``: ``rows/NAME/`` (the run, ``points.jsonl``: one line per evaluation, and
``result.json`` when the row is done), ``table.md``, ``table.json`` and ``curve.png``.  Resumable: a
row whose ``result.json`` exists is skipped, an interrupted training row continues from its newest
checkpoint and budget fraction.  ``--only ROW ...`` runs those rows alone (``--fresh`` first deletes
their results).

    python bench/toy_alignment.py --out runs/toy_bench                         # the full bench
    python bench/toy_alignment.py --out runs/toy_bench --only nft --fresh       # one row again
    python bench/toy_alignment.py --out runs/toy_bench --report                 # table + PNG only
    python bench/toy_alignment.py --list                                        # the method table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EVAL_SEED = 0
EVAL_STEPS = 10

#: the oracle's settings (docs/benchmarks.md, the research log's best supervised row: full fine-tuning, lr 2e-4,
#: EMA 0.99, batch 32); pretraining's warm-up (200 steps) and prompt dropout (0.1) otherwise
ORACLE = {"lr": 2e-4, "ema_decay": 0.99, "batch": 32, "warmup": 200, "seed": 0}


@dataclass
class Row:
    name: str
    #: base | oracle | train | steer | combo
    kind: str
    #: the recipe (configs/toy/*.yaml, configs/steer/*.yaml), relative to the repository root
    recipe: str | None = None
    #: key=value overrides of the recipe (the bench's own come first)
    overrides: list[str] = field(default_factory=list)
    #: combo: the training row whose final weights (LoRA or full fine-tuning) are steered
    lora_from: str | None = None
    note: str = ""


ROWS = [
    Row("base", "base", note="the shipped model, ODE"),
    Row("oracle", "oracle", note="supervised flow matching on renderer scenes of the train prompts (full)"),
    Row("flow_grpo", "train", "configs/toy/flow_grpo.yaml", note="gold verifier partial credit as reward"),
    Row("nft", "train", "configs/toy/nft.yaml", note="gold verifier partial credit as reward"),
    Row("flow_grpo_cn", "train", "configs/toy/flow_grpo_cn.yaml",
        note="gold strict pass as reward; full fine-tuning, EMA, 16 samples a prompt, per-group std"),
    Row("nft_cn", "train", "configs/toy/nft_cn.yaml",
        note="gold strict pass as reward; DiffusionNFT's reference objective, full fine-tuning, EMA, CFG-free, 3 levels"),
    Row("nft_cn_refresh", "train", "configs/toy/nft_cn_refresh.yaml",
        note="nft_cn on shapes-proxy refreshed with gold strict labels (label budget 2,000)"),
    Row("dpo_online", "train", "configs/toy/dpo_online.yaml", note="pairs ranked by shapes-proxy"),
    Row("dpo_offline", "train", "configs/toy/dpo_offline.yaml", note="base samples labelled by the gold verifier"),
    Row("dpo_offline_strict", "train", "configs/toy/dpo_offline_cn.yaml",
        note="full fine-tuning on pass-over-fail pairs labelled by the gold verifier, SFT on the winners"),
    Row("dpo_offline_strict_lora", "train", "configs/toy/dpo_offline_cn_lora.yaml",
        note="the same pairs and losses as dpo_offline_strict, as a rank-32 LoRA on attention and convolutions"),
    Row("reward_backprop", "train", "configs/toy/reward_backprop.yaml", note="DRaFT-1 through shapes-proxy"),
    Row("reward_backprop_guarded", "train", "configs/toy/reward_backprop_guarded.yaml",
        note="DRaFT-1, gated KL + adaptive reference on a 4-member proxy (train runs/shapes_proxy_ensemble first)"),
    Row("reward_backprop_refresh", "train", "configs/toy/reward_backprop_refresh.yaml",
        note="DRaFT-1 through shapes-proxy refreshed with gold labels (label budget)"),
    Row("flow_grpo_refresh", "train", "configs/toy/flow_grpo_refresh.yaml",
        note="Flow-GRPO on shapes-proxy refreshed with gold labels"),
    Row("flow_grpo_proxy", "train", "configs/toy/flow_grpo_refresh.yaml", ["reward_refresh.every=0"],
        note="Flow-GRPO on the frozen shapes-proxy (the refresh row without its refresh)"),
    Row("nft_refresh", "train", "configs/toy/nft_refresh.yaml", note="NFT on shapes-proxy refreshed with gold labels"),
    Row("dpo_online_refresh", "train", "configs/toy/dpo_online_refresh.yaml",
        note="online DPO ranked by shapes-proxy refreshed with gold labels"),
    Row("bon4", "steer", "configs/steer/toy_bon.yaml", note="best-of-4 by shapes-proxy"),
    Row("fk4_proxy", "steer", "configs/steer/toy_fk.yaml", note="FK k = 4, shapes-proxy potential"),
    Row("fk4_gold", "steer", "configs/steer/toy_fk.yaml", ["reward=shapes"], note="FK k = 4, gold potential (labels)"),
    Row("guidance", "steer", "configs/steer/toy_guidance.yaml", note="shapes-proxy gradient guidance"),
    Row("dpo_offline+bon4", "combo", "configs/steer/toy_bon.yaml", lora_from="dpo_offline",
        note="the offline-DPO LoRA, then best-of-4 by shapes-proxy"),
    Row("dpo_offline+fk4_proxy", "combo", "configs/steer/toy_fk.yaml", lora_from="dpo_offline",
        note="the offline-DPO LoRA, then FK k = 4 by shapes-proxy"),
    Row("dpo_offline_strict+bon4", "combo", "configs/steer/toy_bon.yaml", lora_from="dpo_offline_strict",
        note="the strict-pair full fine-tuning, then best-of-4 by shapes-proxy"),
    Row("dpo_offline_strict+fk4_proxy", "combo", "configs/steer/toy_fk.yaml", lora_from="dpo_offline_strict",
        note="the strict-pair full fine-tuning, then FK k = 4 by shapes-proxy (the README's main job on the bench)"),
]


def rows_by_name() -> dict[str, Row]:
    return {r.name: r for r in ROWS}


# ---- evaluation ---------------------------------------------------------------------------------
def eval_prompts(n: int | None) -> list[dict]:
    """All 243 eval prompts in split order (``visalign toy eval``'s), or ``n`` of them picked
    round-robin over the six categories (each category's prompts in split order)."""
    from visalign.toy.prompts import TAGS, split

    metas = split("eval")
    if n is None or n >= len(metas):
        return metas
    if n < 1:
        raise ValueError(f"--eval-prompts must be >= 1, got {n}")
    queues = {t: [m for m in metas if m["tag"] == t] for t in TAGS}
    out: list[dict] = []
    while len(out) < n:
        for t in TAGS:
            if queues[t] and len(out) < n:
                out.append(queues[t].pop(0))
    return out


class Judge:
    """The bench's judge: gold verdicts of ``samples`` ODE samples per prompt (``visalign toy eval``'s
    seeds), plus the mean ``shapes-proxy`` score of the same images."""

    def __init__(self, prompts: int | None, samples: int):
        import visalign.rewards as vr

        self.metas = eval_prompts(prompts)
        self.samples = samples
        self.proxy = vr.load("shapes-proxy")

    def _proxy_mean(self, images: list, prompts: list[str]) -> float:
        scores = []
        with torch.no_grad():
            for i in range(0, len(images), 256):
                s = self.proxy(torch.stack(images[i:i + 256]), prompts[i:i + 256]).scores
                scores += [float(x) for x in s]
        return sum(scores) / len(scores)

    def model(self, sampler) -> dict:
        """Judge a sampler's live weights."""
        from visalign.toy.evaluate import evaluate_sampler

        proxy: list[float] = []

        def score(images, metadata):
            with torch.no_grad():
                proxy.extend(float(x) for x in self.proxy(images, [m["prompt"] for m in metadata]).scores)

        with torch.no_grad():
            res = evaluate_sampler(sampler, self.metas, samples_per_prompt=self.samples, num_steps=EVAL_STEPS,
                                   seed=EVAL_SEED, progress=False, on_batch=score)
        res["proxy"] = sum(proxy) / len(proxy)
        return res

    def images(self, images: list, metas: list[dict], seconds: float) -> dict:
        """Judge steered images (one per job, prompt-major like :meth:`model`)."""
        import numpy as np

        from visalign.toy.prompts import TAGS, overall
        from visalign.toy.verify import verify

        verdicts = verify(torch.stack(images), metadata=metas)
        strict = np.array([float(v.strict) for v in verdicts])
        cats = {t: float(strict[[m["tag"] == t for m in metas]].mean()) for t in TAGS if any(m["tag"] == t for m in metas)}
        from visalign.toy.evaluate import by_heldout

        return {"overall_strict": overall(cats), "strict_all_samples": float(strict.mean()),
                "partial": float(np.mean([v.partial for v in verdicts])), "per_category": cats,
                **by_heldout(strict, metas),
                "prompts": len(self.metas), "samples_per_prompt": self.samples, "num_steps": EVAL_STEPS,
                "seed": EVAL_SEED, "seconds": round(seconds, 1),
                "proxy": self._proxy_mean(images, [m["prompt"] for m in metas])}


# ---- rows --------------------------------------------------------------------------------------
def _append(path: Path, row: dict) -> None:
    from visalign.io import JsonlAppender

    with JsonlAppender(path) as w:
        w.write([row])


def _points(path: Path) -> list[dict]:
    from visalign.io import read_jsonl

    return read_jsonl(path)


def _is_gold(spec: str) -> bool:
    return spec.split(":")[0] == "shapes"


def samples_per_iteration(recipe) -> int:
    """Images the algorithm draws from the model per iteration (its reward calls), from its config."""
    c = recipe.config
    if recipe.algorithm == "backprop":
        return int(c.batch_size) * int(c.gradient_accumulation)
    if recipe.algorithm == "dpo" and c.mode == "offline":
        return 0
    return int(c.group_size) * int(c.prompts_per_iteration)


def run_train_row(row: Row, args, judge: Judge, rdir: Path, base_point: dict) -> dict:
    from visalign.trainers.recipe import build_trainer, load_recipe

    run_dir = rdir / "run"
    overrides = [f"run.run_dir={run_dir}", "run.progress=false", "run.threads=1", "data.eval=null",
                 "run.eval_every=0", "run.save_sample_grid=false", "run.checkpoint_every=25"]
    overrides.append(f"model.name={args.model}")  # every row starts from the bench's base, whatever its recipe says
    recipe_probe = load_recipe(ROOT / row.recipe)
    offline = recipe_probe.algorithm == "dpo" and recipe_probe.config.mode == "offline"
    if offline:  # the pairs are made inside the row (timed as setup), from the bench's base model, by the
        scheme = str(recipe_probe.config.pairs).partition(":")[0]  # recipe's own toy source (toy: or toy-strict:)
        overrides.append(f"dpo.pairs={scheme}:{rdir / 'pairs'}")
    overrides += row.overrides + args.sets.get(row.name, [])
    recipe = load_recipe(ROOT / row.recipe, overrides)
    setup_file = rdir / "setup.json"
    t0 = time.perf_counter()
    trainer = build_trainer(recipe)
    if offline:
        trainer.cache  # noqa: B018 -- the pairs and their latent cache are built on first use: here, as setup
    if offline and not (rdir / "pairs" / "summary.json").is_file():
        raise RuntimeError(f"row {row.name}: building the offline-DPO trainer made no pairs in {rdir / 'pairs'}")
    if not setup_file.is_file():
        from visalign.io import atomic_write_json

        atomic_write_json(setup_file, {"seconds": time.perf_counter() - t0})
    setup = json.loads(setup_file.read_text())["seconds"] if offline else 0.0
    labels_setup = 0
    if offline:
        labels_setup = int(json.loads((rdir / "pairs" / "summary.json").read_text())["labels"])
    trainer.resume()
    per_it = samples_per_iteration(recipe)
    gold = any(_is_gold(s) for s in recipe.rewards)
    points_file = rdir / "points.jsonl"
    done = {round(p["fraction"], 6) for p in _points(points_file)}
    if 0.0 not in done:
        _append(points_file, {**base_point, "fraction": 0.0, "train_seconds": 0.0, "setup_seconds": setup,
                              "wall_seconds": setup, "iterations": 0, "samples": labels_setup if offline else 0,
                              "labels": labels_setup})
    for f in args.fractions:
        if round(f, 6) in done:
            continue
        trainer.run.max_minutes = f * args.budget_minutes
        trainer.train(iterations=10 ** 9)
        samples = trainer.iteration * per_it + (labels_setup if offline else 0)
        labels = trainer.iteration * per_it * gold + labels_setup
        if trainer.reward_refresh is not None:  # the refresh judge's labels (the gold verifier in the toy recipes)
            labels += trainer.reward_refresh.labels
        with trainer.ema_weights():
            res = judge.model(trainer.sampler)
        point = {"fraction": f, "train_seconds": trainer.train_seconds, "setup_seconds": setup,
                 "wall_seconds": setup + trainer.train_seconds, "iterations": trainer.iteration,
                 "samples": samples, "labels": labels, **res}
        _append(points_file, point)
        print(f"  {row.name} @ {f:.2f} of {args.budget_minutes} min: {trainer.iteration} iterations, "
              f"{trainer.train_seconds:.0f} s, gold {res['overall_strict']:.3f}, proxy {res['proxy']:.3f}", flush=True)
    return {"points": _points(points_file), "lora": str(run_dir / "final"), "algorithm": recipe.algorithm,
            "rewards": recipe.rewards, "samples_per_iteration": per_it}


def run_oracle_row(row: Row, args, judge: Judge, rdir: Path, base_point: dict) -> dict:
    import visalign.samplers as vs
    from visalign.toy.pretrain import pretrain

    opts = {**ORACLE, **{k: v for k, v in (_kv(s) for s in args.sets.get(row.name, []))}}
    out = rdir / "pretrain"
    points_file = rdir / "points.jsonl"
    done = {round(p["fraction"], 6) for p in _points(points_file)}
    if 0.0 not in done:
        _append(points_file, {**base_point, "fraction": 0.0, "train_seconds": 0.0, "setup_seconds": 0.0,
                              "wall_seconds": 0.0, "iterations": 0, "samples": 0, "labels": 0})
    for f in args.fractions:
        if round(f, 6) in done:
            continue
        pretrain(out, steps=10 ** 9, batch=int(opts["batch"]), seed=int(opts["seed"]), lr=float(opts["lr"]),
                 warmup=int(opts["warmup"]), ema_decay=float(opts["ema_decay"]), eval_every=0, threads=1,
                 init=args.model, max_minutes=f * args.budget_minutes)
        st = torch.load(out / "ckpt.pt", weights_only=True)
        steps, secs = int(st["step"]), float(st["train_seconds"])
        res = judge.model(vs.load(str(out / "final")))
        point = {"fraction": f, "train_seconds": secs, "setup_seconds": 0.0, "wall_seconds": secs, "iterations": steps,
                 "samples": steps * int(opts["batch"]), "labels": 0, **res}
        _append(points_file, point)
        print(f"  {row.name} @ {f:.2f} of {args.budget_minutes} min: {steps} steps, {secs:.0f} s, "
              f"gold {res['overall_strict']:.3f}", flush=True)
    return {"points": _points(points_file), "settings": opts,
            "command": f"python -m visalign.toy.pretrain --out DIR --init {args.model} --lr {opts['lr']} "
                       f"--ema-decay {opts['ema_decay']} --batch {opts['batch']} --eval-every 0 --threads 1 "
                       f"--steps 1000000000 --max-minutes {args.budget_minutes}"}


def _kv(text: str):
    import yaml

    k, sep, v = text.partition("=")
    if not sep:
        raise SystemExit(f"--set: expected ROW:key=value, got {text!r}")
    return k, yaml.safe_load(v)


def run_steer_row(row: Row, args, judge: Judge, rdir: Path, results: dict) -> dict:
    import visalign.samplers as vs
    from visalign.config import load_config
    from visalign.steering.common import load_reward as _load_reward
    from visalign.steering.config import SteerConfig
    from visalign.steering.guidance import needs_gradient
    from visalign.toy.steer_eval import evaluate_steered

    overrides = [f"model.name={args.model}", "run.threads=1"] + row.overrides + args.sets.get(row.name, [])
    cfg = load_config(str(ROOT / row.recipe), SteerConfig, overrides)
    sampler = vs.load(cfg.model.name)
    lora = None
    if row.kind == "combo":
        src = results.get(row.lora_from)
        lora = Path(src["lora"]) if src else None
        if lora is None or not lora.is_dir():
            raise RuntimeError(f"row {row.name} steers the final LoRA of row {row.lora_from!r}, which is not done in "
                               f"{args.out}: run `--only {row.lora_from}` first")
        from visalign.samplers.lora import load_finetuned

        load_finetuned(sampler, str(lora))  # a LoRA or a full fine-tuning's denoiser.safetensors
    reward = _load_reward(cfg.reward, cfg.reward_options)
    g_reward = None
    if cfg.method in ("guidance", "fk+guidance"):
        g_reward = _load_reward(cfg.guidance_reward, cfg.reward_options) if cfg.guidance_reward else reward
        needs_gradient(g_reward, f"row {row.name}")
    steered = evaluate_steered(sampler, judge.metas, reward, cfg, samples=judge.samples, guidance_reward=g_reward,
                               state_file=rdir / "images.pt", progress=False)
    jobs = [m for m in judge.metas for _ in range(judge.samples)]
    n, k = len(jobs), cfg.particles
    res = judge.images(steered.pop("images"), jobs, steered["seconds"])
    stats = {key: steered[key] for key in ("seconds_per_image", "denoiser_calls_per_image", "reward_calls_per_image")}
    gold = _is_gold(cfg.reward)
    return {"steer": {"method": cfg.method, "reward": cfg.reward, "particles": k, "lora": str(lora) if lora else None,
                      **stats},
            "labels": int(round(stats["reward_calls_per_image"] * n)) if gold else 0, "samples": int(n * k), "eval": res}


def run_row(row: Row, args, judge: Judge, results: dict) -> dict:
    rdir = Path(args.out) / "rows" / row.name
    rdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_point = None
    if row.kind in ("train", "oracle"):
        base = results.get("base")
        if base is None:
            raise RuntimeError(f"row {row.name}: the base row must be done first (its evaluation is every curve's start)")
        base_point = {k: v for k, v in base["eval"].items()}
    if row.kind == "base":
        import visalign.samplers as vs

        out = {"eval": judge.model(vs.load(args.model))}
    elif row.kind == "train":
        out = run_train_row(row, args, judge, rdir, base_point)
    elif row.kind == "oracle":
        out = run_oracle_row(row, args, judge, rdir, base_point)
    elif row.kind in ("steer", "combo"):
        out = run_steer_row(row, args, judge, rdir, results)
    else:
        raise ValueError(f"row {row.name}: unknown kind {row.kind!r}")
    if "points" in out:
        out["eval"] = {k: v for k, v in out["points"][-1].items()}
    result = {"name": row.name, "kind": row.kind, "recipe": row.recipe, "overrides": row.overrides + args.sets.get(row.name, []),
              "lora_from": row.lora_from, "note": row.note, "model": args.model, "budget_minutes": args.budget_minutes,
              "eval_prompts": len(judge.metas), "eval_samples": judge.samples, "bench_seconds": time.perf_counter() - t0,
              "threads": torch.get_num_threads(), **out}
    from visalign.io import atomic_write_json

    atomic_write_json(rdir / "result.json", result)
    return result


# ---- report ------------------------------------------------------------------------------------
def load_results(out: Path) -> dict[str, dict]:
    res = {}
    for r in ROWS:
        f = out / "rows" / r.name / "result.json"
        if f.is_file():
            res[r.name] = json.loads(f.read_text())
    for f in sorted((out / "rows").glob("*/result.json")) if (out / "rows").is_dir() else []:
        res.setdefault(f.parent.name, json.loads(f.read_text()))
    return res


def table(results: dict[str, dict]) -> tuple[str, list[dict]]:
    base = results.get("base", {}).get("eval", {}).get("overall_strict")
    rows, lines = [], [
        "| method | recipe | wall time (min) | iterations | samples drawn | gold labels | gold strict (GenEval mean) "
        "| change vs base | best along the curve | compositions never trained on | shapes-proxy (mean P) "
        "| partial credit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ev = r["eval"]
        pts = r.get("points")
        if pts:
            wall = f"{pts[-1]['wall_seconds'] / 60:.1f}"
            if pts[-1].get("setup_seconds"):
                wall += f" ({pts[-1]['setup_seconds'] / 60:.1f} setup)"
            its, samples, labels = pts[-1]["iterations"], pts[-1]["samples"], pts[-1]["labels"]
            best = max(pts, key=lambda p: p["overall_strict"])
            best_s = f"{best['overall_strict']:.3f} at {best['wall_seconds'] / 60:.1f} min"
        elif "steer" in r:
            s = r["steer"]
            wall = f"{s['seconds_per_image']:.2f} s / image"
            its, samples, labels, best_s = "-", r["samples"], r["labels"], "-"
        else:
            wall, its, samples, labels, best_s = "-", "-", "-", "-", "-"
        recipe = r.get("recipe") or "-"
        if r["kind"] == "oracle":
            o = r.get("settings", ORACLE)
            recipe = (f"`python -m visalign.toy.pretrain --init {r.get('model')} --max-minutes B` (full, lr {o['lr']:g}, "
                      f"EMA {o['ema_decay']:g}, batch {o['batch']})")
        if r.get("lora_from"):
            recipe = f"{recipe} on `{r['lora_from']}`'s final weights"
        if r.get("overrides"):
            recipe += " " + " ".join(f"`{o}`" for o in r["overrides"])
        delta = "" if base is None else f"{ev['overall_strict'] - base:+.3f}"
        held = ev.get("heldout") or {}
        held_s = "-" if held.get("strict") is None else f"{held['strict']:.3f}"
        lines.append(f"| {name} | {recipe} | {wall} | {its} | {samples} | {labels} | **{ev['overall_strict']:.3f}** | "
                     f"{delta} | {best_s} | {held_s} | {ev.get('proxy', float('nan')):.3f} | {ev['partial']:.3f} |")
        rows.append({"name": name, "kind": r["kind"], "recipe": r.get("recipe"), "overall_strict": ev["overall_strict"],
                     "change_vs_base": None if base is None else ev["overall_strict"] - base,
                     "per_category": ev["per_category"], "proxy": ev.get("proxy"), "partial": ev["partial"],
                     "heldout": ev.get("heldout"), "seen": ev.get("seen"),
                     "points": [{k: p[k] for k in ("fraction", "wall_seconds", "train_seconds", "iterations", "samples",
                                                   "labels", "overall_strict", "proxy")} for p in pts] if pts else None,
                     "steer": r.get("steer")})
    any_r = next(iter(results.values()), {})
    head = (f"{any_r.get('eval_prompts')} eval prompts x {any_r.get('eval_samples')} samples, {EVAL_STEPS} ODE steps, "
            f"CFG 3, seed {EVAL_SEED}; budget {any_r.get('budget_minutes')} min per training row, one CPU thread; "
            f"model {any_r.get('model')}")
    return head + "\n\n" + "\n".join(lines) + "\n", rows


def plot(results: dict[str, dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visalign.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=150)
    xmax = max([p["wall_seconds"] / 60 for r in results.values() for p in r.get("points") or []] + [1.0])
    palette = plt.cm.tab10.colors
    for i, (name, r) in enumerate(results.items()):
        ev = r["eval"]
        color = palette[i % len(palette)]
        if r.get("points"):
            pts = r["points"]
            ax.plot([p["wall_seconds"] / 60 for p in pts], [p["overall_strict"] for p in pts], "o-" if name != "oracle" else "s-",
                    label=name, lw=2.5 if name == "oracle" else 1.5, color="k" if name == "oracle" else color)
        elif name == "base":
            ax.axhline(ev["overall_strict"], color="grey", ls="--", lw=1.2, label="base")
        elif r["kind"] == "combo":
            src = results.get(r.get("lora_from") or "", {}).get("points")
            x = src[-1]["wall_seconds"] / 60 if src else xmax
            ax.plot([x], [ev["overall_strict"]], "*", ms=12, color=color, label=f"{name} ({r['steer']['seconds_per_image']:.2f} s/img)")
        else:
            ax.axhline(ev["overall_strict"], ls=":", lw=1.2,
                       label=f"{name} (steering, {r['steer']['seconds_per_image']:.2f} s/img)", color=color)
    ax.set_xlabel("wall time, one CPU thread (min; training iterations + setup)")
    ax.set_ylabel("gold strict accuracy (GenEval mean)")
    any_r = next(iter(results.values()), {})
    ax.set_title(f"toy alignment bench on {any_r.get('model', '?')}: {any_r.get('eval_prompts')} eval prompts x {any_r.get('eval_samples')} samples, "
                 f"budget {any_r.get('budget_minutes')} min", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(out_png, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def report(out: Path) -> dict[str, dict]:
    from visalign.io import atomic_write_json, atomic_write_text

    results = load_results(out)
    if not results:
        raise SystemExit(f"no finished rows in {out}/rows: run the bench first")
    md, rows = table(results)
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "table.json", {"rows": rows})
    plot(results, out / "curve.png")
    return results


# ---- entry point ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy_bench", help="output folder (default runs/toy_bench)")
    p.add_argument("--budget-minutes", type=float, default=15.0,
                   help="wall-clock budget of each training row's iterations, one CPU thread (default 15)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="evaluate training rows at these fractions of the budget (default 0.25 0.5 0.75 1)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="N eval prompts, round-robin over the categories (default: all 243, as visalign toy eval)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt (default 4)")
    p.add_argument("--model", default="toy-shapes", help="the base every row starts from (default toy-shapes)")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows (see --list)")
    p.add_argument("--fresh", action="store_true", help="delete the selected rows' results and runs first")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="ROW:key=value",
                   help="override a row's recipe key (oracle: lr, ema_decay, batch, warmup, seed); repeatable")
    p.add_argument("--report", action="store_true", help="only write the table and PNG from the finished rows")
    p.add_argument("--list", action="store_true", help="print the method table and exit")
    args = p.parse_args(argv)
    if args.budget_minutes <= 0:
        p.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.eval_samples < 1:
        p.error(f"--eval-samples must be >= 1, got {args.eval_samples}")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    args.fractions = sorted(set(args.fractions))
    known = rows_by_name()
    for name in args.only or []:
        if name not in known:
            p.error(f"--only {name}: no such row; rows: {', '.join(known)}")
    args.sets = {}
    for s in args.set_:
        name, sep, kv = s.partition(":")
        if not sep or name not in known or "=" not in kv:
            p.error(f"--set {s!r}: expected ROW:key=value with ROW one of {', '.join(known)}")
        args.sets.setdefault(name, []).append(kv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.list:
        for r in ROWS:
            src = r.recipe or ("python -m visalign.toy.pretrain --init toy-shapes" if r.kind == "oracle" else "-")
            extra = f" on {r.lora_from}" if r.lora_from else ""
            print(f"{r.name:18s} {r.kind:7s} {src}{extra} {' '.join(r.overrides)}  # {r.note}")
        return {}
    if args.report:
        report(out)
        print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'curve.png'}")
        return {"ran": [], "skipped": []}
    torch.set_num_threads(1)
    selected = [r for r in ROWS if args.only is None or r.name in args.only]
    if args.fresh:
        for r in selected:
            shutil.rmtree(out / "rows" / r.name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge(args.eval_prompts, args.eval_samples)
    results = load_results(out)
    ran, skipped = [], []
    for r in selected:
        if r.name in results:
            print(f"{r.name}: done ({out / 'rows' / r.name / 'result.json'}), skipped", flush=True)
            skipped.append(r.name)
            continue
        if r.kind in ("train", "oracle") and "base" not in results:
            print("base: needed first (every curve starts at its evaluation)", flush=True)
            results["base"] = run_row(rows_by_name()["base"], args, judge, results)
            ran.append("base")
        print(f"{r.name}: running ({r.kind}, {r.recipe or r.note})", flush=True)
        t0 = time.perf_counter()
        results[r.name] = run_row(r, args, judge, results)
        ran.append(r.name)
        print(f"{r.name}: gold {results[r.name]['eval']['overall_strict']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        report(out)
    report(out)
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'curve.png'}")
    return {"ran": ran, "skipped": skipped}


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
