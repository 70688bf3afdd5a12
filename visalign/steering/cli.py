"""``visalign steer [CONFIG] [key=value ...] --model M --prompt P | --prompts FILE --method M ...``.

Writes to ``--out``: ``images/`` (the steered images), ``grids/`` (a PNG per image: particles over
time, the chosen one framed in red), ``manifest.jsonl`` (one row per image: its reward, the method
and its settings, its compute and the particle lineage, appended per batch) and ``config.yaml``.
``--resume`` skips the images a killed run's manifest holds.

Several processes: ``accelerate launch --num_processes N -m visalign steer ...`` gives each process
every N-th batch of prompts (the seeds do not depend on the split, so the images equal one
process's) and merges the manifests into one, in job order (:mod:`visalign.shards`).
"""

from __future__ import annotations

import argparse
import json
import sys

from visalign.errors import UsageError

#: command-line flag -> recipe key
FLAGS = {
    "model": "model.name", "prompt": "prompt", "prompts": "prompts", "method": "method", "reward": "reward",
    "guidance_reward": "guidance_reward", "particles": "particles", "steps": "steps", "guidance": "guidance",
    "seed": "seed", "out": "run.out", "threads": "run.threads", "images_per_prompt": "run.images_per_prompt",
    "kernel": "kernel", "reward_guidance": "reward_guidance.scale", "height": "model.height", "width": "model.width",
    "num_frames": "model.num_frames", "dtype": "model.dtype", "device": "model.device",
    "batch_prompts": "run.prompts_per_batch", "lora": "model.lora",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (configs/steer/); optional")
    p.add_argument("overrides", nargs="*", help="key=value overrides right after CONFIG (before the flags), e.g. "
                   "fk.lam=5 fk.potential=max")
    p.add_argument("--model", help="built-in name (toy-shapes), local diffusers folder or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="prompt source: .txt / .jsonl / .json file or a registered set (toy:eval)")
    p.add_argument("--lora", help="fine-tuned weights to steer with: RUN/final of visalign train (a LoRA, or the denoiser after full fine-tuning)")
    p.add_argument("--method", help="bon | fk | guidance | fk+guidance | search (default fk)")
    p.add_argument("--reward", help="steering reward spec (visalign rewards), e.g. shapes-proxy, aesthetic")
    p.add_argument("--guidance-reward", help="reward whose gradient guides (default: --reward)")
    p.add_argument("--particles", type=int, help="k: particles (fk), candidates (bon / search per round); default 4")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model card's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model card's)")
    p.add_argument("--reward-guidance", type=float, help="reward-gradient guidance strength (guidance, fk+guidance)")
    p.add_argument("--kernel", help="sampling kernel (default: fk -> flow_sde / ddim, others -> ode)")
    p.add_argument("--seed", type=int, help="particle q of image j uses seed + j * particles + q (default 0)")
    p.add_argument("--images-per-prompt", type=int, help="steered images per prompt (default 1)")
    p.add_argument("--batch-prompts", type=int, help="prompts steered per rollout (default 4)")
    p.add_argument("--out", help="output folder (default runs/steer)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int, help="video models: frames (4k+1 for Wan)")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--no-grid", action="store_true", help="do not write the particle grids")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: skip the images its manifest holds")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its manifest is started afresh)")
    p.add_argument("--toy-eval", action="store_true",
                   help="toy world: judge instead of writing images: the base, the base + --lora and the recipe "
                        "steering it, on visalign toy eval's 243 evaluation prompts, by the gold verifier")
    p.add_argument("--toy-eval-samples", type=int, default=4, help="--toy-eval: samples per prompt (default 4)")
    p.add_argument("--toy-eval-prompts", type=int, default=None,
                   help="--toy-eval: the first N eval prompts (default all 243)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default auto: the cores other processes leave free)")


def _overrides(args) -> tuple[str | None, list[str]]:
    import json

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.prompt is not None:  # a prompt on the command line replaces the recipe's prompt source
        overrides.append("prompts=null")
    if args.prompts is not None:
        overrides.append("prompt=null")
    if args.no_grid:
        overrides.append("run.grid=false")
    return config, overrides


def _load_reward(spec: str, options: dict):
    from .common import load_reward

    return load_reward(spec, options)


def run(args) -> int:
    from visalign.config import ConfigError, load_config

    from .config import SteerConfig

    config, overrides = _overrides(args)
    try:
        cfg = load_config(config, SteerConfig, overrides)
    except (ConfigError, ValueError) as err:
        print(f"visalign steer: error: {err}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "toy_eval", False):
            return _toy_eval(cfg, args)
        return _steer(cfg, resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False))
    except UsageError as err:
        print(f"visalign steer: error: {err}", file=sys.stderr)
        return 2


def _check_lora(cfg) -> None:
    from pathlib import Path

    if cfg.model.lora and not Path(cfg.model.lora).is_dir():
        raise UsageError(f"--lora {cfg.model.lora}: no such folder; give the folder visalign train wrote "
                     "(RUN/final, or RUN/export/iter_N)")


def _toy_eval(cfg, args) -> int:
    import json
    from pathlib import Path

    from visalign.io import atomic_write_json
    from visalign.samplers import ModelNotFoundError
    from visalign.shards import current_shard
    from visalign.threads import configure_threads
    from visalign.toy.steer_eval import compare, format_compare  # the toy world's judge of a recipe

    if current_shard().sharded:
        raise UsageError("--toy-eval runs in one process; launch it without accelerate launch --num_processes")
    if args.toy_eval_samples < 1 or (args.toy_eval_prompts is not None and args.toy_eval_prompts < 1):
        raise UsageError("--toy-eval-samples and --toy-eval-prompts must be >= 1")
    _check_lora(cfg)
    try:
        configure_threads(cfg.run.threads, cfg.model.device)
    except ValueError as err:
        raise UsageError(f"--threads: {err}") from None
    try:
        result = compare(cfg, lora=cfg.model.lora, samples=args.toy_eval_samples, max_prompts=args.toy_eval_prompts,
                         load_reward=_load_reward)
    except (ModelNotFoundError, FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(format_compare(result))
    out = Path(cfg.run.out) / "toy_eval.json"
    atomic_write_json(out, json.loads(json.dumps(result)))
    print(f"summary in {out}")
    return 0


def _previous_rows(manifest, resume: bool, overwrite: bool, shard) -> dict[int, dict]:
    """``{job: row}`` of an earlier run in the same folder (``--resume``); refuses to mix runs."""
    from visalign.io import read_jsonl
    from visalign.shards import part_files

    parts = part_files(manifest)
    if resume and overwrite:
        raise UsageError("pass either --resume or --overwrite, not both")
    if (manifest.exists() or parts) and not (resume or overwrite):
        raise UsageError(f"{manifest.parent} already holds a steering run ({manifest.name}"
                         + (f" and {len(parts)} part files of an unfinished run of several processes" if parts else "")
                         + "): pass --resume to continue it, --overwrite to replace it, or --out to write elsewhere")
    shard.barrier()  # every process has looked before any deletes
    if overwrite and shard.main:
        for p in (manifest, *parts):
            if p.exists():
                p.unlink()
    shard.barrier()
    rows: dict[int, dict] = {}
    if resume:
        for src in (manifest, *parts):
            if src.exists():  # a killed writer's half line is skipped
                rows.update({int(r["job"]): r for r in read_jsonl(src) if "job" in r})
    shard.barrier()  # every process has read the same rows before any part file grows
    return rows


def _steer(cfg, *, resume: bool = False, overwrite: bool = False) -> int:
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from visalign.config import save_config
    from visalign.io import JsonlAppender, atomic_write_text, read_jsonl
    from visalign.prompts import load_prompts
    from visalign.samplers import ModelNotFoundError, load
    from visalign.shards import current_shard, part_files, part_path
    from visalign.threads import configure_threads

    from .config import steer
    from .guidance import needs_gradient

    if cfg.prompt is None and cfg.prompts is None:
        raise UsageError("no prompts: give --prompt TEXT or --prompts FILE (or prompt: / prompts: in the recipe)")
    try:
        records = [{"prompt": cfg.prompt, "metadata": None}] if cfg.prompt is not None else load_prompts(cfg.prompts)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        configure_threads(cfg.run.threads, cfg.model.device)
    except ValueError as err:
        raise UsageError(f"--threads: {err}") from None
    _check_lora(cfg)
    shard = current_shard()
    out = Path(cfg.run.out)
    manifest_path = out / "manifest.jsonl"
    previous = _previous_rows(manifest_path, resume, overwrite, shard)
    if shard.device(cfg.model.device) != cfg.model.device:  # each process on its own GPU
        import dataclasses

        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=shard.device(cfg.model.device)))
    try:
        sampler = load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, **cfg.model.options)
    except ModelNotFoundError as err:
        raise UsageError(str(err)) from None
    if cfg.model.lora:
        from visalign.samplers.lora import load_finetuned

        load_finetuned(sampler, cfg.model.lora)
    try:
        reward = _load_reward(cfg.reward, cfg.reward_options)
        g_reward = None
        if cfg.method in ("guidance", "fk+guidance"):
            g_reward = _load_reward(cfg.guidance_reward, cfg.reward_options) if cfg.guidance_reward else reward
            needs_gradient(g_reward, f"--method {cfg.method}")
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"reward: {err}") from None
    if hasattr(reward, "to") and cfg.model.device:
        reward.to(cfg.model.device)

    (out / "images").mkdir(parents=True, exist_ok=True)
    if shard.main:
        save_config(cfg, out / "config.yaml")
    m = cfg.run.images_per_prompt
    jobs = [(j * m + i, r) for j, r in enumerate(records) for i in range(m)]
    batch = cfg.run.prompts_per_batch
    # a batch's seeds follow its first job, so any split of the batches gives the same images
    batches = [jobs[c:c + batch] for c in range(0, len(jobs), batch)]
    todo = [part for part in batches if not all(job in previous for job, _ in part)]
    mine = shard.take(todo)
    k = cfg.particles
    grid = cfg.run.grid
    rebuild = shard.sharded or resume
    writing = part_path(manifest_path, shard) if shard.sharded else manifest_path
    started = time.perf_counter()
    with JsonlAppender(writing) as manifest, tqdm(total=sum(map(len, mine)), desc=f"steer ({cfg.method})", unit="img",
                                                  disable=not shard.main) as bar:
        for part in mine:
            res = steer(sampler, [r["prompt"] for _, r in part], reward, cfg,
                        metadata=[r["metadata"] for _, r in part], guidance_reward=g_reward,
                        seed=cfg.seed + part[0][0] * k, keep_history=grid, keep_particles=cfg.run.save_particles)
            rows = [_write_item(out, job, item, res, sampler, cfg) for (job, _), item in zip(part, res.items)]
            manifest.write(rows)
            bar.update(len(part))
    shard.barrier()  # every process has written its images and manifest rows
    if rebuild and shard.main:  # one manifest, each job once, in job order
        merged = dict(previous)
        for src in (part_files(manifest_path) if shard.sharded else [manifest_path]):
            merged.update({int(r["job"]): r for r in read_jsonl(src) if "job" in r})
        atomic_write_text(manifest_path, "".join(json.dumps(merged[j]) + "\n" for j in sorted(merged)))
        for p in part_files(manifest_path):
            p.unlink()
    shard.barrier()
    if not shard.main:
        return 0
    rows = read_jsonl(manifest_path) if manifest_path.exists() else []
    scores = [r["reward"] for r in rows if r.get("reward") is not None]
    finite = [s for s in scores if s == s]
    mean = sum(finite) / len(finite) if finite else float("nan")
    done = sum(map(len, todo))
    print(f"visalign steer: {done} images by {cfg.method} (k = {k}) in {time.perf_counter() - started:.1f} s"
          + (f" ({shard.count} processes)" if shard.sharded else "")
          + (f", {len(jobs) - done} already done (--resume)" if resume else "")
          + f"; mean {cfg.reward} over {len(rows)} images {mean:.4f}; images, grids and manifest.jsonl in {out}")
    return 0 if rows else 1


def _write_item(out, job: int, item, res, sampler, cfg) -> dict:
    from visalign.sample import _slug, save_image, save_video

    from .grid import save_grid

    ext = cfg.run.video_format if sampler.is_video else "png"
    name = f"{job:05d}_{_slug(item.prompt)}"
    save = save_video if sampler.is_video else save_image
    save(item.image, out / "images" / f"{name}.{ext}")
    row = {"file": f"images/{name}.{ext}", "job": job, "prompt": item.prompt, "method": res.method,
           "reward_spec": cfg.reward, "reward": item.reward, "chosen": item.chosen,
           "particle_rewards": item.particle_rewards, "seeds": item.seeds, "lineage": item.lineage, **item.extra,
           "settings": res.settings, "compute": {k: v for k, v in res.compute.items() if k != "total_seconds"}}
    if cfg.run.save_particles and item.particles is not None:
        files = []
        for q, p in enumerate(item.particles):
            f = f"images/{name}_p{q}.{ext}"
            save(p, out / f)
            files.append(f)
        row["particles"] = files
    if cfg.run.grid and item.history:
        title = f"{item.prompt} | {res.method} k={len(item.particle_rewards)} | chosen {item.chosen}"
        mark = (item.extra["best_round"] - 1, item.chosen) if "best_round" in item.extra else item.chosen
        save_grid(item.history, mark, out / "grids" / f"{name}.png", title)
        row["grid"] = f"grids/{name}.png"
    return row
