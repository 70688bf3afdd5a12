"""``visalign train CONFIG [key=value ...] [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.learning_rate=1e-4 run.iterations=10")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its newest checkpoint (its run_dir is used)")


def run(args) -> int:
    from visalign.config import ConfigError

    from .grpo.trainer import TrainingStopped
    from .recipe import build_trainer, load_recipe

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.run_dir={args.resume}")
    try:
        recipe = load_recipe(args.config, overrides)
        trainer = build_trainer(recipe)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"visalign train: error: {err}", file=sys.stderr)
        return 2
    if trainer.acc.is_main_process:
        print(f"visalign train: {recipe.model.name}, processes: {trainer.acc.num_processes}, run folder {recipe.run.run_dir}")
    if args.resume:
        if not trainer.resume(args.resume):
            print(f"visalign train: error: no checkpoint in {args.resume}/checkpoints to resume from", file=sys.stderr)
            return 2
        print(f"resumed {args.resume} at iteration {trainer.iteration}")
    try:
        summary = trainer.train()
    except TrainingStopped as err:
        print(f"visalign train: stopped: {err}", file=sys.stderr)
        return 1
    if summary:
        print(f"done: {summary['iterations']} iterations; run folder {recipe.run.run_dir}")
        for key in sorted(summary.get("final", {})):
            if key.startswith("eval/") and key.count("/") <= 2:
                before = summary.get("initial", {}).get(key)
                after = summary["final"][key]
                print(f"  {key}: {before if before is None else round(before, 4)} -> {round(after, 4)}")
    return 0
