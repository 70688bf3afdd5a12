"""``DPOTrainer``: Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct
Preference Optimization") for eps / v models and Flow-DPO (Liu et al. 2025, "Improving Video
Generation with Human Feedback") for rectified-flow models, offline from preference pairs and online
from the model's own groups ranked by a reward (D3PO, Yang et al. 2024, "Using Human Feedback to
Fine-tune Diffusion Models without Any Reward Model"; Flow-GRPO's online DPO).

For a pair (winner ``w``, loser ``l``) of clean latents with the *same* noise ``eps`` and time ``t``:
``x_t = add_noise(x0, eps, t)``, target ``u = training_target(x0, eps, t)`` (``eps``, ``v`` or
``eps - x0``), ``e = mean((pred(x_t, t, c) - u)^2)`` over every latent dimension, and

    inside = -beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref))
    loss   = -log sigmoid(inside)   [+ sft_weight * e_w]

with ``e_ref`` from the reference model (``sampler.reference()``: LoRA off, or a kept copy; online
optionally the weights of ``ref_refresh_every`` iterations ago).  At initialisation the model is the
reference, ``inside = 0`` and the loss is ``log 2``.  The implicit reward accuracy is the fraction of
pairs with ``inside > 0`` (the reference script's), the margin is ``mean(inside)``.
docs/dpo.md gives the equations, defaults and their sources, and the deviations.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..base import Trainer, derive_seed
from ..common.data import PromptSampler
from ..group import GroupBatch, GroupTrainer
from .config import DPOConfig, default_beta

__all__ = ["DPOTrainer", "dpo_loss"]


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss ``-log sigmoid(-beta/2 ((e_w - e_l) - (e_w_ref - e_l_ref)))`` and
    the term inside the sigmoid (the implicit reward margin; > 0 when the pair is ranked right)."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside), inside


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every non-batch dimension (the reference scripts' mean)."""
    return ((pred.float() - target) ** 2).flatten(1).mean(1)


class DPOTrainer(GroupTrainer):
    """Diffusion-DPO / Flow-DPO on any Sampler (see the module docstring).

    Args:
        sampler: the model; a reference is needed (LoRA adapters, or a kept copy for full tuning).
        rewards: ``{name: (reward, weight)}`` that rank the online groups; ``None`` / empty offline.
        config: :class:`DPOConfig`.
        The other arguments are :class:`Trainer`'s.
    """

    algorithm = "dpo"
    progress_keys = ("loss", "implicit_acc")
    needs_rewards = False  # offline needs none; the online mode checks for its own

    def __init__(self, sampler, rewards, config: DPOConfig, **kwargs) -> None:
        flow = sampler.parameterization == "flow"
        if config.time_distribution == "logit_normal" and not flow:
            raise ValueError(f"dpo.time_distribution: {sampler.family} is {sampler.parameterization}-prediction and "
                             "trains on integer DDPM timesteps: set time_distribution: uniform (or null)")
        if config.mode == "online":
            if not rewards:
                raise ValueError("dpo.mode: online ranks each group with the recipe's rewards; give at least one "
                                 "(e.g. rewards: {shapes-proxy: 1.0}) or set dpo.mode: offline with dpo.pairs")
            kernel_ok = {"ode": True, "ddim": not flow, "flow_sde": flow, "flow_cps": flow}[config.rollout_kernel]
            if not kernel_ok:
                raise ValueError(f"dpo.rollout_kernel {config.rollout_kernel!r} does not fit a "
                                 f"{sampler.parameterization}-prediction model: use ode or "
                                 f"{'flow_sde / flow_cps' if flow else 'ddim'}")
            super().__init__(sampler, rewards, config, **kwargs)
        else:
            if rewards:
                raise ValueError(f"offline DPO trains on labelled pairs and uses no reward; remove rewards "
                                 f"({', '.join(rewards)}) with rewards: {{}} (keep them in eval_rewards), or set "
                                 "dpo.mode: online")
            Trainer.__init__(self, sampler, config, **kwargs)
            config.check_geometry(self.acc.num_processes)
            self.reward, self.reward_weights, self.per_prompt = None, {}, None
        self.beta = float(config.beta) if config.beta is not None else default_beta(sampler.family,
                                                                                     sampler.parameterization)
        self._cache = None
        self.pair_sampler: PromptSampler | None = None
        self._pending_pair_state: dict | None = None
        if config.ref_refresh_every:  # the DPO name of the floor's adaptive reference
            if self.guards.reference_refresh_every not in (0, config.ref_refresh_every):
                raise ValueError(f"dpo.ref_refresh_every ({config.ref_refresh_every}) and "
                                 f"guards.reference_refresh_every ({self.guards.reference_refresh_every}) disagree: "
                                 "set one of them")
            self.guards.reference_refresh_every = config.ref_refresh_every
        self.reward_calls = 0

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def steps_per_iteration(self) -> int:
        c = self.config
        if c.mode == "offline":
            return 1
        groups = c.prompts_per_iteration // self.acc.num_processes
        pairs = groups * (1 if c.pairing == "best_worst" else c.group_size * (c.group_size - 1) // 2)
        return max(1, c.inner_epochs * math.ceil(pairs / (c.train_batch_size * c.gradient_accumulation)))

    @property
    def eval_guidance(self) -> float:
        return float(self.config.guidance_scale)

    # ---- the reference ---------------------------------------------------------------------------
    def reference(self):
        """The reference model: the base (``sampler.reference()``: LoRA off or a kept copy), or, after a
        refresh (``ref_refresh_every`` / ``guards.reference_refresh_every``), the weights of that moment
        (``Sampler.refresh_reference``: a frozen second adapter or module copy)."""
        return self.sampler.reference()

    def refresh_reference(self) -> None:
        """The reference becomes the current weights now (the floor does this every
        ``ref_refresh_every`` iterations; checkpointed with the run)."""
        self.sampler.refresh_reference()
        self.reference_refreshes += 1

    # ---- the loss of a micro-batch of pairs -------------------------------------------------------
    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training times of ``n`` pairs: integer DDPM timesteps (uniform) or flow noise levels (logit-
        normal by default, optionally shifted)."""
        c = self.config
        flow = self.sampler.parameterization == "flow"
        dist = c.time_distribution or ("logit_normal" if flow else "uniform")
        t = self.sampler.sample_times(n, generator, distribution=dist, logit_mean=c.logit_mean, logit_std=c.logit_std)
        if flow and c.time_shift != 1.0:
            t = c.time_shift * t / (1 + (c.time_shift - 1) * t)
        return t

    def pair_losses(self, x_w: torch.Tensor, x_l: torch.Tensor, cond, noise: torch.Tensor, t: torch.Tensor):
        """Per-pair loss ``(b,)`` and statistics for winners ``x_w`` and losers ``x_l`` (clean latents),
        their conditioning ``cond`` and one shared draw of ``noise`` / ``t`` per pair."""
        c, s = self.config, self.sampler
        dev = s.device
        x = torch.cat([x_w, x_l]).to(dev)
        nz = torch.cat([noise, noise]).to(dev)
        tt = torch.cat([t, t]).to(dev)
        from visalign.samplers import Conditioning

        cc = Conditioning.cat([cond, cond])
        x_t = s.add_noise(x, nz, tt)
        target = s.training_target(x, nz, tt)
        g = c.train_guidance_scale
        with torch.no_grad(), self.reference(), self.acc.autocast():
            ref_err = _mse(s.predict_at(x_t, tt, cc, g), target)
        with self.acc.autocast():
            err = _mse(s.predict_at(x_t, tt, cc, g), target)
        n = x_w.shape[0]
        loss, inside = dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], self.beta)
        if c.sft_weight > 0:
            loss = loss + c.sft_weight * err[:n]
        e = err.detach()
        return loss, {"inside": inside.detach(), "mse_w": e[:n], "mse_l": e[n:], "ref_mse_w": ref_err[:n],
                      "ref_mse_l": ref_err[n:]}

    def _update(self, x_w: torch.Tensor, x_l: torch.Tensor, cond_of, gen: torch.Generator) -> dict:
        """Optimizer steps over ``len(x_w)`` pairs (all the draws first, then
        :meth:`~GroupTrainer.minibatch_updates`); ``cond_of(rows)`` gives the conditioning of pairs ``rows``."""
        c = self.config
        n, k = x_w.shape[0], c.timesteps_per_pair
        noise = torch.randn((k, *x_w.shape), generator=gen)
        times = torch.stack([self.draw_times(n, gen) for _ in range(k)])

        def terms(mb):
            cond = cond_of(mb)
            for j in range(k):
                yield self.pair_losses(x_w[mb], x_l[mb], cond, noise[j, mb], times[j, mb])

        t0 = time.perf_counter()
        out = self.minibatch_updates(torch.arange(n), gen, k, terms)
        st = out.pop("stats")
        row = {**out, "pairs": n, "time/train": time.perf_counter() - t0}
        if "inside" in st:
            inside = st["inside"]
            row.update({"implicit_acc": float((inside > 0).float().mean()), "margin": float(inside.mean()),
                        "model_mse_w": float(st["mse_w"].mean()), "model_mse_l": float(st["mse_l"].mean()),
                        "ref_mse_w": float(st["ref_mse_w"].mean()), "ref_mse_l": float(st["ref_mse_l"].mean())})
        return row

    def encode(self, prompts: list[str]):
        """Conditioning of ``prompts``, each encoded on its own (cached when
        ``run.cache_prompt_embeddings``): an embedding then does not depend on the batch it was first
        encoded in (batched text encoders differ in the last bits), so a resumed run equals an
        uninterrupted one exactly."""
        from visalign.samplers import Conditioning

        return Conditioning.cat([super(DPOTrainer, self).encode([p]) for p in prompts])

    # ---- offline ------------------------------------------------------------------------------------
    @property
    def cache(self):
        """The pairs' latent cache, built on first use (the main process first; the others then read it)."""
        if self._cache is None:
            from .data import build_latent_cache, cache_root, open_pairs

            c = self.config
            h, w = self._image_size()
            frames = c.num_frames or (getattr(self.sampler, "num_frames", None) if self.sampler.is_video else None)
            with self.acc.main_process_first():
                with self.sampler.reference():  # a registered source may sample the base model
                    source = open_pairs(c.pairs, split=c.split, max_pairs=c.max_pairs, sampler=self.sampler,
                                        options=c.pairs_options)
                self._cache = build_latent_cache(
                    source, self.sampler, cache_root(c.latent_cache, self.run_dir), height=h, width=w, num_frames=frames,
                    hflip=c.hflip, dtype=c.cache_dtype, num_workers=c.num_workers,
                    encode_batch_size=c.encode_batch_size, progress=self.run.progress and self.acc.is_main_process,
                    log=print if self.acc.is_main_process else None)
            self.pair_sampler = PromptSampler(list(range(len(self._cache))), seed=self.run.seed)
            if self._pending_pair_state is not None:
                self.pair_sampler.load_state_dict(self._pending_pair_state)
                self._pending_pair_state = None
        return self._cache

    def _image_size(self) -> tuple[int, int]:
        c = self.config
        if c.resolution is not None:
            return c.resolution, c.resolution
        dh, dw = self.sampler.default_size()
        return int(self.size.get("height") or dh), int(self.size.get("width") or dw)

    def _offline_step(self, it: int) -> dict:
        c, acc = self.config, self.acc
        cache = self.cache
        gen = torch.Generator().manual_seed(derive_seed(self.run.seed, it, acc.process_index, 2))
        per_step = c.train_batch_size * c.gradient_accumulation
        picked = self.pair_sampler.next(per_step * acc.num_processes)
        mine = torch.tensor(picked[acc.process_index * per_step:(acc.process_index + 1) * per_step])
        flips = torch.rand(per_step, generator=gen) < 0.5 if cache.hflip else None
        drop = torch.rand(per_step, generator=gen) < c.caption_dropout
        x_w, x_l = cache.get(mine, flips)
        prompts = ["" if d else p for d, p in zip(drop.tolist(), cache.prompts(mine))]

        def cond_of(rows):
            return self.encode([prompts[int(r)] for r in rows]).to(self.sampler.device)

        row = self._update(x_w, x_l, cond_of, gen)
        row["epoch"] = self.pair_sampler.epoch
        scores = cache.scores(mine)
        if scores is not None:  # the labeller's scores of this step's pairs
            row.update({"reward/mean": float(scores.mean()), "reward/chosen": float(scores[:, 0].mean()),
                        "reward/rejected": float(scores[:, 1].mean()), "reward/valid_fraction": 1.0})
        return row

    # ---- online ---------------------------------------------------------------------------------------
    def rollout_options(self, it: int, n_prompts: int, generator: torch.Generator) -> dict:
        c = self.config
        if c.rollout_kernel == "ode":
            return {"kernel": "ode", "record_means": False}
        opts = {} if c.noise_level is None else {("eta" if c.rollout_kernel == "ddim" else "noise_level"): c.noise_level}
        return {"kernel": c.rollout_kernel, "kernel_options": opts, "record_means": False}

    def make_pairs(self, batch: GroupBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(winner rows, loser rows, reward gaps)`` of this process's groups: each group's best and
        worst valid sample (``pairing: best_worst``) or every ordered pair (``all``) whose reward
        difference exceeds ``min_reward_gap``."""
        c = self.config
        g = c.group_size
        scores, valid = batch.scores, batch.valid
        w_rows, l_rows, gaps = [], [], []
        for start in range(0, scores.numel(), g):
            rows = torch.arange(start, start + g)[valid[start:start + g]]
            if rows.numel() < 2:
                continue
            s = scores[rows]
            if c.pairing == "best_worst":
                cand = [(int(rows[s.argmax()]), int(rows[s.argmin()]))]
            else:
                cand = [(int(a), int(b)) for a in rows for b in rows if a != b]
            for a, b in cand:
                gap = float(scores[a] - scores[b])
                if gap > c.min_reward_gap:
                    w_rows.append(a)
                    l_rows.append(b)
                    gaps.append(gap)
        return torch.tensor(w_rows, dtype=torch.long), torch.tensor(l_rows, dtype=torch.long), torch.tensor(gaps)

    def _online_step(self, it: int) -> dict:
        c = self.config
        batch = self.collect_groups(it)
        self.reward_calls += int(batch.all_scores.numel())
        w_rows, l_rows, gaps = self.make_pairs(batch)
        row = {**self.reward_metrics(batch), "reward_calls": self.reward_calls}
        if w_rows.numel() == 0:  # every group tied: nothing to learn from this iteration
            return {**row, "loss": float("nan"), "grad_norm": float("nan"), "optimizer_steps": 0, "skipped_steps": 0,
                    "pairs": 0}
        traj = batch.traj
        x0 = traj.final.float().cpu()
        cond = traj.cond

        def cond_of(mb):
            return cond[w_rows[mb]].to(self.sampler.device)

        row.update(self._update(x0[w_rows], x0[l_rows], cond_of, batch.generator))
        row.update({"reward/gap": float(gaps.mean()), "reward/chosen": float(batch.scores[w_rows].mean()),
                    "reward/rejected": float(batch.scores[l_rows].mean())})
        return row

    def train_step(self, it: int) -> dict:
        if self.config.mode == "online":
            return self._online_step(it)
        return self._offline_step(it)

    def plot_keys(self, last: dict, final_eval: dict) -> tuple[list[str], list[str]]:
        train, evals = super().plot_keys(last, final_eval)
        return [k for k in ("loss", "implicit_acc", "reward/mean") if k in last] or train, evals

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        pairs = self.pair_sampler.state_dict() if self.pair_sampler is not None else self._pending_pair_state
        state["dpo"] = {"pair_sampler": pairs, "reward_calls": self.reward_calls}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dpo = state.get("dpo") or {}
        self.reward_calls = int(dpo.get("reward_calls", 0))
        if dpo.get("pair_sampler") is not None:
            if self.pair_sampler is not None:
                self.pair_sampler.load_state_dict(dpo["pair_sampler"])
            else:
                self._pending_pair_state = dict(dpo["pair_sampler"])
