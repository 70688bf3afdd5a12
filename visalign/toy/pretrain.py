"""Pretraining of the toy-shapes model: rectified flow on renderer images, on CPU.

Objective (rectified flow / flow matching; Liu et al. 2022, Lipman et al. 2023; SD3, Esser et al.
2024): for an image ``x0`` in [-1, 1], noise ``eps`` and ``s ~ logit-normal(0, 1)`` (SD3's
``sigmoid(N(0, 1))``, which spends most steps at mid noise), ``x_s = (1 - s) x0 + s eps`` and the
loss is ``|| unet(x_s, 1000 s, text) - (eps - x0) ||^2``.  The prompt is replaced by ``""`` with
probability 0.1 so the model learns the unconditional velocity for classifier-free guidance.

Data: prompts of the ``train`` split, drawn category-balanced (a category uniformly, then a prompt
in it uniformly; otherwise colour attribution, 126 of 183 prompts, would dominate), rendered on the
fly.  Every step's randomness derives from ``(seed, step)``, so a resumed run draws the same
batches as an uninterrupted one.

Writes to ``out_dir``: ``log.jsonl`` (loss every ``log_every`` steps, an ``eval`` record with
per-category strict accuracy every ``eval_every`` steps), ``ckpt.pt`` (model, EMA, optimiser,
step; loaded with ``weights_only=True``), ``final/`` and ``snapshots/step_XXXXXX/`` (EMA weights in
diffusers layout, see :mod:`.model`).

Run: ``python -m visalign.toy.pretrain --out runs/toy_pretrain --steps 20000 --batch 32``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import model as M
from .prompts import TAGS, by_tag, mutate, overall, split
from .render import render_batch
from .verify import verify

__all__ = ["pretrain", "evaluate", "main"]


def _batch(step: int, batch: int, seed: int, train_by_tag: dict, p_uncond: float, caption_noise: float = 0.0):
    rng = np.random.default_rng([seed, step, 1])
    tags = list(train_by_tag)
    metas = [train_by_tag[tags[i]][int(rng.integers(len(train_by_tag[tags[i]])))]
             for i in rng.integers(len(tags), size=batch)]
    scenes = metas
    if caption_noise > 0:  # the draw is skipped at 0, so noiseless runs keep their exact batches
        scenes = [mutate(m, rng) if rng.random() < caption_noise else m for m in metas]
    x0 = torch.from_numpy(render_batch(scenes, rng)) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    prompts = ["" if rng.random() < p_uncond else m["prompt"] for m in metas]
    return x0, prompts


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pl in zip(ema.parameters(), live.parameters()):
            pe.lerp_(pl, 1 - decay)


def evaluate(model: M.ToyShapes, per_category: int = 16, seed: int = 1234, num_steps: int = 20,
             guidance_scale: float = 3.0, batch: int = 48) -> dict:
    """Strict / partial accuracy of Euler ODE samples on the eval split, category-balanced:
    ``per_category`` prompts per category (cycling through a category's prompts), one image each
    (sample ``n`` uses seed ``seed + n``), through the library's sampler and collect step."""
    from visalign.samplers import collect

    from .family import ToySampler

    groups = by_tag(split("eval"))
    rng = np.random.default_rng(seed)
    metas = []
    for tag in TAGS:
        g = groups[tag]
        order = rng.permutation(len(g))
        metas += [g[order[i % len(g)]] for i in range(per_category)]
    out = collect(ToySampler(model), [m["prompt"] for m in metas], num_steps=num_steps, guidance_scale=guidance_scale,
                  seeds=[seed + n for n in range(len(metas))], batch_size=batch)
    verdicts = verify(out.images, metadata=metas)
    cat = {t: float(np.mean([v.strict for v, m in zip(verdicts, metas) if m["tag"] == t])) for t in TAGS}
    held = [v.strict for v, m in zip(verdicts, metas) if m["heldout"]]
    return {
        "strict": overall(cat),
        "partial": float(np.mean([v.partial for v in verdicts])),
        "per_category": cat,
        "heldout_strict": float(np.mean(held)) if held else None,
        "n": len(metas),
        "guidance_scale": guidance_scale,
        "num_steps": num_steps,
    }


def _state(model, ema, opt, step, train_seconds=0.0):
    return {
        "unet": model.unet.state_dict(),
        "text_encoder": model.text_encoder.state_dict(),
        "ema_unet": ema.unet.state_dict(),
        "ema_text_encoder": ema.text_encoder.state_dict(),
        "opt": opt.state_dict(),
        "step": torch.tensor(step),
        "train_seconds": torch.tensor(train_seconds, dtype=torch.float64),
    }


def pretrain(
    out_dir: str | os.PathLike,
    steps: int = 20000,
    batch: int = 32,
    seed: int = 0,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup: int = 200,
    ema_decay: float = 0.999,
    p_uncond: float = 0.1,
    grad_clip: float = 1.0,
    log_every: int = 25,
    ckpt_every: int = 250,
    eval_every: int = 500,
    eval_per_category: int = 16,
    threads: int | None = 1,
    bf16: bool = False,
    caption_noise: float = 0.0,
    init: str | os.PathLike | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Pretrain (or resume) the toy-shapes model in ``out_dir``; returns ``out_dir / "final"``.

    Args:
        steps (`int`): optimiser steps in total (a resumed run continues to this number).
        batch (`int`): images per step.
        lr (`float`): AdamW peak learning rate, linear warm-up over ``warmup`` steps, then constant.
        eval_every (`int`): steps between evaluations of the EMA weights (and snapshots); 0 = never.
        ema_decay (`float`): EMA of the weights (evaluated and saved), with the usual
            ``min(decay, (1 + n) / (10 + n))`` warm-up.
        p_uncond (`float`): probability of the empty prompt (classifier-free guidance).
        threads (`int`, *optional*): ``torch.set_num_threads``; 1 keeps a shared machine usable.
        bf16 (`bool`): bf16 autocast on CPU.  Off by default: measured slower than float32 for
            this model on the development CPU (docs/toy_world.md).
        caption_noise (`float`): probability that an image shows a near miss of its caption
            (:func:`.prompts.mutate`: another colour, shape, count or relation, swapped colours, a
            dropped object) while the caption stays the same, like web alt-text that does not
            quite describe its image.  The model then learns a prompt-following error rate that
            alignment can remove, next to the drawing errors of a small model.
        init (`str`, *optional*): start from this saved toy-shapes model instead of random
            weights (ignored when ``out_dir`` holds a checkpoint to resume); a built-in name
            (``"toy-shapes"``, ``"toy-shapes-cn"``) is the shipped model of that name.
        max_minutes (`float`, *optional*): a wall-clock budget: stop (with a checkpoint and
            ``final/``) once the optimiser steps, resumed runs included, have taken this many
            minutes; evaluations and checkpoints are not counted.  Calling again with a larger
            budget continues.  The toy alignment bench's oracle row (supervised fine-tuning on
            renderer scenes for the same wall time as the alignment methods) runs this way.
    """
    if not 0.0 <= caption_noise < 1.0:
        raise ValueError(f"caption_noise={caption_noise}: expected a probability in [0, 1)")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes={max_minutes}: expected a positive number of minutes or None (no budget)")
    if init is not None and not Path(init).exists():
        from visalign.samplers.loading import BUILTIN_MODELS, builtin_model_path

        if str(init) in BUILTIN_MODELS:
            init = builtin_model_path(str(init))
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = M.load(init) if init else M.build(seed)
    ema = M.ToyShapes(copy.deepcopy(model.unet), copy.deepcopy(model.text_encoder), model.tokenizer, model.scheduler)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step, train_s = 0, 0.0
    ckpt = out / "ckpt.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=True)
        model.unet.load_state_dict(st["unet"])
        model.text_encoder.load_state_dict(st["text_encoder"])
        ema.unet.load_state_dict(st["ema_unet"])
        ema.text_encoder.load_state_dict(st["ema_text_encoder"])
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
        train_s = float(st.get("train_seconds", torch.tensor(0.0)))
    for m in (ema.unet, ema.text_encoder):
        m.requires_grad_(False).eval()
    train_by_tag = by_tag(split("train"))
    log = open(out / "log.jsonl", "a")

    def emit(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    emit({"event": "start", "step": step, "steps": steps, "batch": batch, "seed": seed, "lr": lr,
          "params": sum(p.numel() for p in params), "threads": torch.get_num_threads(), "bf16": bf16,
          "caption_noise": caption_noise, "init": str(init) if init else None})
    losses, t0, n0 = [], time.time(), step
    model.unet.train()
    model.text_encoder.train()
    def out_of_time():
        return max_minutes is not None and train_s >= 60.0 * max_minutes

    while step < steps and not out_of_time():
        ts = time.perf_counter()
        x0, prompts = _batch(step, batch, seed, train_by_tag, p_uncond, caption_noise)
        x0 = M.to_latent(x0)  # (B, 12, 16, 16): the UNet's space-to-depth view of the pixels
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        eps = torch.randn(x0.shape, generator=g)  # (B, 3, H, W)
        s = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1)
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            text = M.encode_prompts(model, prompts)
            v = model.unet(xs, s * 1000, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        step += 1
        d = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema.unet, model.unet, d)
        _ema_update(ema.text_encoder, model.text_encoder, d)
        losses.append(loss.item())
        train_s += time.perf_counter() - ts
        if step % log_every == 0:
            dt = time.time() - t0
            emit({"event": "train", "step": step, "loss": float(np.mean(losses)),
                  "lr": opt.param_groups[0]["lr"], "steps_per_s": (step - n0) / max(dt, 1e-9),
                  "elapsed_s": dt})
            losses = []
        if step % ckpt_every == 0 or step == steps or out_of_time():
            tmp = out / "ckpt.pt.tmp"
            torch.save(_state(model, ema, opt, step, train_s), tmp)
            tmp.replace(ckpt)
        if eval_every and (step % eval_every == 0 or step == steps):
            te = time.time()
            res = evaluate(ema, per_category=eval_per_category)
            emit({"event": "eval", "step": step, **res, "eval_s": time.time() - te})
            M.save(ema, out / "snapshots" / f"step_{step:06d}")
    M.save(ema, out / "final")
    emit({"event": "done", "step": step, "train_seconds": train_s})
    log.close()
    return out / "final"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain the toy-shapes model (resumes from OUT/ckpt.pt).")
    ap.add_argument("--out", required=True, help="output folder (log.jsonl, ckpt.pt, snapshots/, final/)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--eval-per-category", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--caption-noise", type=float, default=0.0,
                    help="probability that an image shows a near miss of its caption (default 0)")
    ap.add_argument("--init", default=None,
                    help="start from this saved toy-shapes model, or toy-shapes for the shipped one (default: random weights)")
    ap.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock budget of the optimiser steps (resumed runs included); default: none, --steps only")
    a = ap.parse_args(argv)
    pretrain(a.out, steps=a.steps, batch=a.batch, seed=a.seed, lr=a.lr, eval_every=a.eval_every,
             ckpt_every=a.ckpt_every, eval_per_category=a.eval_per_category, threads=a.threads, bf16=a.bf16,
             caption_noise=a.caption_noise, init=a.init, ema_decay=a.ema_decay, max_minutes=a.max_minutes)


if __name__ == "__main__":
    main()
