"""``visalign rewards serve SPEC[,SPEC...] [--host 127.0.0.1] [--port 8700] [--token T] [limits]``."""

from __future__ import annotations

import argparse
import os
import sys

from visalign.errors import UsageError

from .server import MISSING_EXTRA, Limits

__all__ = ["add_arguments", "run", "TOKEN_ENV"]

TOKEN_ENV = "VISALIGN_REWARD_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("rewards", metavar="SPEC[,SPEC...]",
                   help="rewards to serve, by name or spec (e.g. 'shapes-proxy,artifact'); clients pick one by name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; reach it through an SSH "
                        "tunnel, or put a TLS proxy in front and use --token)")
    p.add_argument("--port", type=int, default=8700, help="port (default 8700; 0 picks a free one and prints it)")
    p.add_argument("--token", default=None,
                   help=f"bearer token that every request must carry (default: ${TOKEN_ENV}; unset: no token). "
                        f"Prefer the environment variable: a command line is visible to other users")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"most items per reward call; concurrent requests share calls (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a batch waits for more items, in ms (default {d.max_wait_ms:g})")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                   help=f"largest request body in MB; larger ones get 413 (default {d.max_request_mb:g})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image or frame, width x height (default {d.max_pixels})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"most items waiting; past it requests get 503 and clients retry (default {d.max_queue})")
    p.add_argument("--device", default=None, help="where the rewards run: cpu (default), cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default auto: the cores other processes leave free)")


def run(args: argparse.Namespace) -> int:
    from visalign.gallery.scoring import split_specs
    from visalign.threads import configure_threads

    from .server import load_served, serve

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError(MISSING_EXTRA) from None
    specs = split_specs(args.rewards)
    if not specs:
        raise UsageError(f"name at least one reward to serve, e.g. 'shapes-proxy' (got {args.rewards!r})")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        limits = Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_request_mb=args.max_request_mb,
                        max_pixels=args.max_pixels, max_queue=args.max_queue)
        configure_threads(args.threads, args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        served = load_served(specs, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"visalign rewards serve: warning: listening on {args.host} without a token: anyone who can reach "
              f"this port can use the server (set {TOKEN_ENV})", file=sys.stderr)
    try:
        stopped_by = serve(served, host=args.host, port=args.port, token=token, limits=limits, device=args.device,
                           log=lambda line: print(line, flush=True))
    except OSError as err:
        raise UsageError(str(err)) from None
    print(f"stopped{f' on {stopped_by}' if stopped_by else ''}", flush=True)
    return 0
