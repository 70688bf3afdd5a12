"""``visalign toy pretrain | eval | pairs``: the shapes toy world from the command line.


The learned proxy is trained with the reward-head kit: ``visalign rewards train shapes-proxy --out DIR``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    pre = sub.add_parser("pretrain", help="pretrain the toy-shapes model on renderer data (resumable)")
    pre.add_argument("--out", required=True, help="output folder (log.jsonl, ckpt.pt, final/)")
    pre.add_argument("--steps", type=int, default=20000)
    pre.add_argument("--batch", type=int, default=32)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--lr", type=float, default=5e-4)
    pre.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default auto: the cores other processes leave free)")
    pre.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU")
    ev = sub.add_parser("eval", help="GenEval-style accuracy on the 243 evaluation prompts (every prompt of the grammar)")
    ev.add_argument("--model", default="toy-shapes", help="toy-shapes or a folder saved by pretrain")
    ev.add_argument("--lora", default=None, help="fine-tuned weights: RUN/final (a LoRA, or the denoiser after full fine-tuning) from visalign train")
    ev.add_argument("--samples-per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=10, help="ODE steps (default 10)")
    ev.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3.0)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-prompts", type=int, default=None)
    ev.add_argument("--bf16", action="store_true")
    ev.add_argument("--pass-at", type=int, nargs="+", default=(), metavar="K",
                    help="also report pass@K (best of K samples; K <= --samples-per-prompt), e.g. --pass-at 4 16")
    ev.add_argument("--json", default=None, help="write the summary here")
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default auto: the cores other processes leave free)")
    pp = sub.add_parser("pairs", help="preference pairs for offline DPO: base-model samples labelled by the gold verifier")
    pp.add_argument("--out", required=True, help="output folder (images/, pairs.jsonl, summary.json)")
    pp.add_argument("--model", default="toy-shapes", help="the model that samples (toy-shapes or a folder)")
    pp.add_argument("--samples-per-prompt", type=int, default=4, help="samples (labels) per training prompt")
    pp.add_argument("--steps", type=int, default=10, help="ODE steps (default 10)")
    pp.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, 3.0)")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--max-prompts", type=int, default=None, help="use the first N training prompts")
    pp.add_argument("--max-pairs-per-prompt", type=int, default=None,
                    help="keep the N clearest pairs of each prompt (default: every ordered pair)")
    pp.add_argument("--strict-only", action="store_true",
                    help="only pairs of a strict pass over a fail (the toy-strict:DIR source of DPO)")
    pp.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default auto: the cores other processes leave free)")


def run(args) -> int:
    if args.toy_command == "pairs":
        from visalign.samplers import ModelNotFoundError
        from visalign.threads import configure_threads

        from .pairs import make_pairs

        try:
            configure_threads(args.threads)
            s = make_pairs(args.out, args.model, samples_per_prompt=args.samples_per_prompt, num_steps=args.steps,
                           guidance_scale=args.guidance, seed=args.seed, max_prompts=args.max_prompts,
                           max_pairs_per_prompt=args.max_pairs_per_prompt, strict_only=args.strict_only)
        except (ModelNotFoundError, FileNotFoundError, ValueError) as err:
            print(f"visalign toy pairs: error: {err}", file=sys.stderr)
            return 2
        print(f"{s['pairs']} pairs of {s['prompts_with_pairs']}/{s['prompts']} prompts in {args.out}: {s['labels']} "
              f"labels by the gold verifier (pass rate {s['pass_rate']:.3f}), {s['seconds']} s")
        return 0
    if args.toy_command == "pretrain":
        from visalign.threads import configure_threads

        from .pretrain import pretrain

        try:
            configure_threads(args.threads)
        except ValueError as err:
            print(f"visalign toy pretrain: error: --threads: {err}", file=sys.stderr)
            return 2
        out = pretrain(args.out, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr,
                       threads=None, bf16=args.bf16)
        print(f"pretrained model in {out}")
        return 0
    from visalign.samplers import ModelNotFoundError
    from visalign.threads import configure_threads

    from .evaluate import evaluate_model, format_report

    try:
        configure_threads(args.threads)
    except ValueError as err:
        print(f"visalign toy eval: error: --threads: {err}", file=sys.stderr)
        return 2

    try:
        result = evaluate_model(args.model, lora=args.lora, samples_per_prompt=args.samples_per_prompt,
                                num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                max_prompts=args.max_prompts, bf16=args.bf16, pass_at=tuple(args.pass_at))
    except (ModelNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"visalign toy eval: error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        from visalign.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0
