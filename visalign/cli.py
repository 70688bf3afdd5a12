"""The ``visalign`` command line: ``sample | score | train | plan | steer | rewards | recipes | toy``.

Each subcommand's arguments and body live in a small function here or in the module that does
the work; heavy imports happen only when a subcommand runs.  Exit codes: 0 success, 1 the job
ran but produced nothing usable, 2 usage errors (bad arguments, missing model or file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import UsageError

__all__ = ["main", "build_parser", "UsageError"]


# ---- sample -----------------------------------------------------------------------------------


def _add_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name (toy-shapes), local diffusers folder or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="file of prompts: .txt (one per line), .jsonl ('prompt' field) or .json list")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model card's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model card's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt j uses seed + j*N + k")
    p.add_argument("--out", required=True, help="output folder (PNGs / GIFs + manifest.jsonl)")
    p.add_argument("--kernel", default="ode", choices=["ode", "flow_sde", "flow_cps", "ddim"])
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames (4k+1 for Wan)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default auto: the cores other processes leave free)")


def _run_sample(args) -> int:
    from .sample import SampleSettings, read_prompts, sample_to_folder
    from .samplers import ModelNotFoundError, load
    from .threads import configure_threads

    try:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if args.num_images < 1 or args.batch_size < 1:
        raise UsageError("--num-images and --batch-size must be at least 1")
    try:
        configure_threads(args.threads, args.device)
    except ValueError as err:
        raise UsageError(f"--threads: {err}") from None
    try:
        sampler = load(args.model, dtype=args.dtype, device=args.device)
    except ModelNotFoundError as err:
        raise UsageError(str(err)) from None
    settings = SampleSettings(
        model=args.model, num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed,
        kernel=args.kernel, height=args.height, width=args.width, num_frames=args.num_frames,
        batch_size=args.batch_size, video_format=args.video_format,
    )
    rows = sample_to_folder(sampler, prompts, args.out, settings)
    print(f"wrote {len(rows)} files and manifest.jsonl to {args.out}")
    return 0 if rows else 1


# ---- rewards ----------------------------------------------------------------------------------


def _add_rewards(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the catalogue as JSON")
    sub = p.add_subparsers(dest="rewards_command", metavar="ACTION")
    tr = sub.add_parser("train", help="train a reward head (ensemble) on your labels (docs/reward_training.md)",
                        description="train a reward head (ensemble) on pairs, ratings or binary labels")
    tr.add_argument("config", help="a YAML recipe, or a shipped one by name: shapes-proxy, shapes-artifact "
                    "(visalign recipes --kind reward; docs/reward_training.md)")
    tr.add_argument("--out", default=None, help="output folder (default: the recipe's out:)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set optim.steps=200 (repeatable)")
    tr.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default auto: the cores other processes leave free)")
    from .serve.cli import add_arguments as add_serve

    add_serve(sub.add_parser("serve", help="serve rewards over HTTP for remote:url=... clients (docs/rewards.md)",
                             description="serve rewards over HTTP (JSON, base64 PNG / JPEG) with dynamic batching"))


def _run_rewards(args) -> int:
    import dataclasses
    import json

    from . import rewards

    if getattr(args, "rewards_command", None) == "train":
        return _run_rewards_train(args)
    if getattr(args, "rewards_command", None) == "serve":
        from .serve.cli import run as run_serve

        return run_serve(args)
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in rewards.available()], indent=2))
    else:
        from .rewards.catalog import catalog_table

        print(catalog_table())
    return 0


def _run_rewards_train(args) -> int:
    import json

    from .config import ConfigError
    from .rewards.head_train import load_train_config, train
    from .threads import configure_threads

    try:
        configure_threads(args.threads, None)
        cfg = load_train_config(args.config, args.overrides)
        metrics = train(cfg, out=args.out)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    out = args.out or cfg.out
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"reward head in {out}: use it as --rewards head:path={out} (calibration plot: {out}/calibration.png)")
    return 0


# ---- recipes ----------------------------------------------------------------------------------


def _add_recipes(p: argparse.ArgumentParser) -> None:
    p.add_argument("show", nargs="?", metavar="show NAME",
                   help="print a recipe (copy it to edit: visalign recipes show toy/nft_cn > mine.yaml)")
    p.add_argument("name", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=["train", "steer", "reward", "accelerate"], default=None, help="list one kind only")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def _run_recipes(args) -> int:
    import json

    from . import recipes

    if args.show is not None:
        if args.show != "show" or not args.name:
            raise UsageError("usage: visalign recipes [--kind K] [--json]  |  visalign recipes show NAME")
        path = recipes.find(args.name)
        if path is None:
            found = [r for r in recipes.available("reward") if r.name == args.name]
            if not found:
                raise UsageError(f"recipe {args.name!r}: {recipes.describe(args.name)}")
            path = found[0].path
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    rows = recipes.available(args.kind)
    if args.json:
        print(json.dumps([{"name": r.name, "kind": r.kind, "command": r.command, "path": str(r.path),
                           "summary": r.summary} for r in rows], indent=2))
        return 0
    width = max((len(r.name) for r in rows), default=4)
    for kind in ("train", "steer", "reward", "accelerate"):
        group = [r for r in rows if r.kind == kind]
        if not group:
            continue
        print({"train": "training recipes (visalign train NAME)", "steer": "steering recipes (visalign steer NAME)",
               "reward": "reward-head recipes (visalign rewards train NAME --out DIR)",
               "accelerate": "sharded-training launch configs (accelerate launch --config_file PATH -m visalign "
                             "train RECIPE; docs/scaling.md)"}[kind])
        for r in group:
            print(f"  {r.name:<{width}}  {r.summary}")
    print(f"in {recipes.recipes_dir()}; print one with: visalign recipes show NAME")
    return 0


# ---- commands implemented in their own modules ------------------------------------------------


def _delegate(module: str, add_name: str = "add_arguments", run_name: str = "run") -> tuple[Callable, Callable]:
    """(add_arguments, run) of a module that implements a subcommand (its functions ``add_name``
    and ``run_name``)."""

    def add(p: argparse.ArgumentParser) -> None:
        import importlib

        getattr(importlib.import_module(module), add_name)(p)

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), run_name)(args)

    return add, run


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "sample": ("generate images or videos with any model", _add_sample, _run_sample),
    "score": ("score a gallery of images or videos with rewards", *_delegate("visalign.gallery.cli")),
    "train": ("fine-tune a model against rewards (GRPO / DPO / reward backprop)", *_delegate("visalign.trainers.cli")),
    "plan": ("memory per GPU of a training recipe (weights, gradients, optimizer, activations) and whether it fits",
             *_delegate("visalign.trainers.cli", "add_plan_arguments", "run_plan")),
    "steer": ("inference-time steering: best-of-N, FK particles, reward guidance, noise search",
              *_delegate("visalign.steering.cli")),
    "rewards": ("list the reward models with inputs, range, gradient and licence", _add_rewards, _run_rewards),
    "recipes": ("list the recipes that ship with visalign, or print one", _add_recipes, _run_recipes),
    "toy": ("the shapes toy world: pretrain the base model, evaluate a model or LoRA", *_delegate("visalign.toy.cli")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visalign",
        description="Align image and video generators with rewards: sample, score, train, steer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen subcommand's module is imported to build its arguments.
    if argv and argv[0] in COMMANDS and argv[0] not in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="visalign")
        sub = parser.add_subparsers(dest="command")
        name = argv[0]
        help_text, add, run = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            add(p)
        except ModuleNotFoundError as err:
            if err.name and (err.name == "visalign" or err.name.startswith("visalign.")):
                raise  # a broken installation or a bug: show the real import error
            print(f"visalign {name}: a dependency is missing ({err}); reinstall with `pip install .`",
                  file=sys.stderr)
            return 2
    else:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
    args = parser.parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except UsageError as err:
        print(f"visalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"visalign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
