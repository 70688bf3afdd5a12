"""``visalign score PATH... --rewards SPEC[,SPEC...] --out results.{jsonl,csv,parquet} [--report report.html]``.

Exit codes: 0 when at least one file was scored, 1 when none was, 2 on usage errors (printed to
stderr, naming the bad input).

Several processes: ``accelerate launch --num_processes N -m visalign score ...`` splits the files
(every N-th to each) and merges the results into ``--out`` in input order (:mod:`visalign.shards`).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image/video files or folders (searched recursively)")
    p.add_argument("--rewards", required=True, metavar="SPEC[,SPEC...]",
                   help="rewards by name or spec, e.g. 'jpeg_compressibility,clipscore:model=ViT-B-32' (see `visalign rewards`)")
    p.add_argument("--out", required=True, help="results file: .jsonl, .csv or .parquet (parquet needs pyarrow)")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here (and summary.json beside it)")
    p.add_argument("--prompt", default=None, help="prompt for files that have no manifest / GenEval metadata.jsonl / sidecar / mapping prompt")
    p.add_argument("--prompts", default=None, metavar="FILE", help="mapping file: CSV (header file,prompt) or JSONL {file, prompt}")
    p.add_argument("--references", default=None, metavar="DIR", help="reference images for rewards that need them (dino)")
    p.add_argument("--batch-size", type=int, default=8, help="files per reward call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0 = decode in the main process)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--resume", action="store_true", help="skip files already in --out; append the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel limit against decompression bombs (default 64M)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _usage(msg: str) -> int:
    print(f"visalign score: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from .api import describe, score
    from .decode import DEFAULT_MAX_PIXELS
    from .discover import GalleryUsageError
    from .scoring import split_specs

    if args.batch_size < 1:
        return _usage(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        return _usage(f"--workers {args.workers}: must be 0 or more")
    specs = split_specs(args.rewards)
    if not specs:
        return _usage(f"--rewards {args.rewards!r}: name at least one reward (see `visalign rewards`)")
    from visalign import rewards as R

    names = []
    for spec in specs:
        try:
            names.append(R.parse_spec(spec)[0])
        except ValueError as err:
            return _usage(str(err))
    columns = {}
    for spec, name in zip(specs, names):
        try:  # a reward that cannot be built (unknown name, bad option, missing weights) is a usage error
            columns[name if names.count(name) == 1 else spec] = R.load(spec)
        except Exception as err:  # noqa: BLE001 - reward factories raise various types; all name the input
            return _usage(f"--rewards {spec!r}: {err}")
    from visalign.shards import current_shard

    shard = current_shard()
    if shard.sharded and not args.no_progress and not shard.main:
        args.no_progress = True  # one progress bar: the first process's
    try:
        result = score(
            args.paths, columns,
            out=args.out, report=args.report, prompt=args.prompt, prompts=args.prompts, references=args.references,
            batch_size=args.batch_size, workers=args.workers, device=shard.device(args.device), resume=args.resume,
            overwrite=args.overwrite, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=not args.no_progress,
            shard=shard,
        )
    except GalleryUsageError as err:
        return _usage(str(err))
    except KeyboardInterrupt:
        print(f"visalign score: interrupted ({shard.describe()}); finished batches are in {args.out}"
              f"{' and its part files' if shard.sharded else ''}; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    if not shard.main:
        return 0
    if shard.sharded:
        print(f"{shard.count} processes; every process's results merged into {args.out} in input order")
    print(describe(result))
    print(f"results: {args.out}" + (f"; report: {args.report}" if args.report else ""))
    return 0 if result.summary["scored"] > 0 else 1
