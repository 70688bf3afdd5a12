"""Replay a refresh run's labelling rounds offline to compare head-update settings.

The label store of a run with ``reward_refresh`` (its newest checkpoint) holds every round's
samples of the policy and the judge's labels, in order.  For each setting, this starts from the
frozen proxy and, round after round, measures the head on round ``r`` (held out: it has not seen
them), then fine-tunes it on round ``r`` with replay of rounds ``< r`` exactly as the refresh does
(:func:`visalign.rewards.head_train.update`).  The frozen proxy's accuracy on each round is the
baseline.  The policy's samples are those the run drew, so this isolates the head update from the
policy's response to it.

Usage::

    python bench/reward_refresh_replay.py RUN_DIR --proxy DIR [--samples 128]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SETTINGS = {
    "frozen": None,
    "head only, 100 steps, lr 5e-4": dict(steps=100, lr=5e-4, train_backbone=False),
    "head only, 30 steps, lr 5e-4": dict(steps=30, lr=5e-4, train_backbone=False),
    "backbone, 100 steps, lr 5e-4 (recipe)": dict(steps=100, lr=5e-4, train_backbone=True),
    "backbone, 30 steps, lr 1e-4": dict(steps=30, lr=1e-4, train_backbone=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--proxy", required=True, help="the frozen proxy's folder (the run's starting head)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--ensemble", type=int, default=4)
    ap.add_argument("--mix", type=float, default=0.5)
    ap.add_argument("--only", nargs="*", default=None, help="names of SETTINGS to run")
    args = ap.parse_args()

    from visalign.rewards.head_data import LabelledSet
    from visalign.rewards.head_train import update
    from visalign.toy.proxy_reward import ShapesProxyReward
    from visalign.trainers.common.checkpoint import latest_checkpoint, load_checkpoint
    from visalign.trainers.common.refresh import expand_ensemble, head_agreement

    store = load_checkpoint(latest_checkpoint(args.run_dir))["reward_refresh"]["store"]
    full = LabelledSet.from_tensors(store["images"], store["prompts"], store["targets"])
    n = len(full) // args.samples
    rounds = [full.select(torch.arange(r * args.samples, (r + 1) * args.samples)) for r in range(n)]
    results = {}
    for name, kw in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        model = ShapesProxyReward(args.proxy).model
        if kw is not None:
            expand_ensemble(model, args.ensemble)
        accs, t0, replay = [], time.time(), None
        for r, new in enumerate(rounds):
            imgs = new.image_batch(torch.arange(len(new)))
            accs.append(head_agreement(model, "binary", imgs, new.prompts, new.targets)["accuracy"])
            if kw is not None:
                update(model, new, batch=64, replay=replay, replay_fraction=args.mix if replay is not None else 0.0,
                       seed=r, log=lambda _m: None, **kw)
                model.eval().requires_grad_(False)
                replay = new if replay is None else LabelledSet.concat(replay, new)
        results[name] = {"held_out_accuracy_per_round": [round(a, 3) for a in accs],
                         "mean_from_round_2": round(sum(accs[1:]) / max(1, len(accs) - 1), 4),
                         "seconds": round(time.time() - t0, 1)}
        print(json.dumps({name: results[name]}), flush=True)


if __name__ == "__main__":
    main()
