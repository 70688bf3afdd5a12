"""``visalign train CONFIG [key=value ...] [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.learning_rate=1e-4 run.iterations=10")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its newest checkpoint (its run_dir is used)")
    p.add_argument("--export", metavar="RUN_DIR", default=None,
                   help="do not train: write the LoRA of a checkpoint of RUN_DIR to RUN_DIR/export/iter_N "
                        "(the newest, or --iteration N); pass the run's CONFIG and overrides")
    p.add_argument("--iteration", type=int, default=None, help="with --export: the checkpoint's iteration")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: run.threads, else auto: the cores other processes leave "
                        "free); 1 is fastest when another busy process shares a small machine")


def run(args) -> int:
    from visalign.config import ConfigError
    from visalign.threads import configure_threads

    from .base import TrainingStopped
    from .recipe import build_trainer, load_recipe

    overrides = list(args.overrides)
    if args.resume and args.export:
        print("visalign train: error: --resume and --export exclude each other", file=sys.stderr)
        return 2
    if args.iteration is not None and not args.export:
        print("visalign train: error: --iteration goes with --export RUN_DIR", file=sys.stderr)
        return 2
    if args.resume or args.export:
        overrides.append(f"run.run_dir={args.resume or args.export}")
    if args.threads is not None:
        overrides.append(f"run.threads={args.threads}")
    try:
        recipe = load_recipe(args.config, overrides)
        configure_threads(recipe.run.threads, recipe.model.device)
        trainer = build_trainer(recipe)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"visalign train: error: {err}", file=sys.stderr)
        return 2
    if args.export:
        try:
            out = trainer.export(args.iteration)
        except FileNotFoundError as err:
            print(f"visalign train: error: {err}", file=sys.stderr)
            return 2
        if out is not None:  # the main process (a sharded run gathers the weights on every process)
            print(f"wrote {out} (iteration {trainer.iteration}); evaluate it with --lora {out}")
        return 0
    if trainer.acc.is_main_process:
        import torch

        print(f"visalign train: {recipe.algorithm} on {recipe.model.name}, processes: {trainer.acc.num_processes}, "
              f"threads: {torch.get_num_threads()}, run folder {recipe.run.run_dir}")
    if args.resume:
        if not trainer.resume(args.resume):
            print(f"visalign train: error: no checkpoint in {args.resume}/checkpoints to resume from", file=sys.stderr)
            return 2
        if trainer.acc.is_main_process:
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


# ---- visalign plan ------------------------------------------------------------------------------


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """``visalign plan CONFIG [key=value ...] --gpus N --gpu-mem GIB [--json]``."""
    p.add_argument("config", help="YAML training recipe (see configs/), as for `visalign train`")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. lora=null model.gradient_checkpointing=true grpo.train_batch_size=2")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the job runs on (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory of one GPU in GiB (default 80)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="share of each GPU kept free for the CUDA context and fragmentation (default 0.10)")
    p.add_argument("--strategy", action="append", choices=["ddp", "zero2", "fsdp", "zero3"], default=None,
                   help="only these strategies (repeatable; default: all four)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args) -> int:
    import json

    from visalign.config import ConfigError

    from .plan import STRATEGIES, format_plan, plan_recipe
    from .recipe import load_recipe

    try:
        recipe = load_recipe(args.config, list(args.overrides))
        plan = plan_recipe(recipe, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, margin=args.margin,
                           strategies=args.strategy or STRATEGIES)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"visalign plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
