"""DPO trainers: Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct
Preference Optimization") for eps / v models and Flow-DPO (Liu et al. 2025, "Improving Video
Generation with Human Feedback") for rectified-flow models.

- :class:`OfflineDPOTrainer` (a :class:`Trainer`) trains on labelled pairs from a dataset through a
  VAE-latent cache, one optimizer step per iteration;
- :class:`OnlineDPOTrainer` (a :class:`GroupTrainer`) trains on the model's own groups ranked by a
  reward (D3PO, Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any
  Reward Model"; Flow-GRPO's online DPO);
- :class:`DPOTrainer` (``algorithm: dpo``) builds the one its config's ``mode`` names.

Both share the pair objective of :mod:`.loss` (:class:`~.loss.DPOPairLoss`): for a pair with the
same noise and time, ``inside = -beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref))`` and a loss of it
(``loss_type``; Diffusion-DPO's ``-log sigmoid(inside)`` by default) ``[+ sft_weight * e_w]``, with
``e_ref`` from the reference model (``sampler.reference()``: LoRA off, or a kept copy; optionally the
weights of ``ref_refresh_every`` iterations ago).  The implicit reward accuracy is the fraction of
pairs with ``inside > 0`` (the reference script's), the margin is ``mean(inside)``.
docs/dpo.md gives the equations, defaults and their sources, and the deviations.
"""

from __future__ import annotations

import math
import time

import torch

from ..base import Trainer, derive_seed
from ..common.data import PromptSampler
from ..group import GroupBatch, GroupTrainer
from .config import OfflineDPOConfig, OnlineDPOConfig
from .loss import DPOPairLoss, dpo_loss

__all__ = ["DPOTrainer", "OfflineDPOTrainer", "OnlineDPOTrainer", "dpo_loss"]


def _refuse_rewards(rewards) -> None:
    if rewards:
        raise ValueError(f"offline DPO trains on labelled pairs and uses no reward; remove rewards "
                         f"({', '.join(rewards)}) with rewards: {{}} (keep them in eval_rewards), or set "
                         "dpo.mode: online")


class OfflineDPOTrainer(DPOPairLoss, Trainer):
    """Diffusion-DPO / Flow-DPO on labelled pairs (see the module docstring).

    Args:
        sampler: the model; a reference is needed (LoRA adapters, or a kept copy for full tuning).
        config: :class:`OfflineDPOConfig`.
        The other arguments are :class:`Trainer`'s.
    """

    algorithm = "dpo"
    progress_keys = ("loss", "implicit_acc")

    @classmethod
    def from_parts(cls, sampler, config, *, rewards=None, **kwargs) -> "OfflineDPOTrainer":
        _refuse_rewards(rewards)
        return cls(sampler, config, **kwargs)

    def __init__(self, sampler, config: OfflineDPOConfig, **kwargs) -> None:
        if not isinstance(config, OfflineDPOConfig):
            raise TypeError(f"OfflineDPOTrainer takes an OfflineDPOConfig, got {type(config).__name__}")
        self._check_sampler(sampler, config)
        super().__init__(sampler, config, **kwargs)
        self._setup_pairs()
        self._cache = None
        self.pair_sampler: PromptSampler | None = None
        self._pending_pair_state: dict | None = None

    # ---- the pairs -------------------------------------------------------------------------------
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

    # ---- one iteration: one optimizer step ----------------------------------------------------------
    def _update(self, x_w: torch.Tensor, x_l: torch.Tensor, cond_of, gen: torch.Generator) -> dict:
        """One optimizer step over ``len(x_w)`` pairs, in micro-batches of ``train_batch_size`` pairs
        (in a random order); ``cond_of(rows)`` gives the conditioning of pairs ``rows``.

        The order and the noise / time draws are those of the step's pairs over all processes, of
        which this process takes its own (``gen`` is the same on every process): a step's draws do not
        depend on how many processes share it, so two processes train as one with the same global
        batch."""
        c = self.config
        n, k = x_w.shape[0], c.timesteps_per_pair
        procs, rank = self.acc.num_processes, self.acc.process_index
        lo, hi = rank * n, (rank + 1) * n
        noise, times = self.pair_draws(x_w.new_empty((n * procs, *x_w.shape[1:])), gen)
        noise, times = noise[:, lo:hi], times[:, lo:hi]
        order = torch.randperm(n * procs, generator=gen)
        order = order[(order >= lo) & (order < hi)] - lo
        stats: dict[str, list[torch.Tensor]] = {}
        t0 = time.perf_counter()

        def scaled():
            for m0 in range(0, n, c.train_batch_size):
                mb = order[m0: m0 + c.train_batch_size]
                cond = cond_of(mb)
                for j in range(k):
                    loss, st = self.pair_losses(x_w[mb], x_l[mb], cond, noise[j, mb], times[j, mb])
                    yield loss.sum() / (n * k)  # a non-finite one ends the step here: no stats
                    for name, val in st.items():
                        stats.setdefault(name, []).append(val.detach().cpu())

        result = self.optimizer_step(scaled)
        nan = float("nan")
        row = {"loss": nan if result.skipped else result.loss, "grad_norm": nan if result.skipped else result.grad_norm,
               "optimizer_steps": 0 if result.skipped else 1, "skipped_steps": int(result.skipped), "pairs": n,
               "time/train": time.perf_counter() - t0}
        row.update(self.pair_metrics({name: torch.cat(v) for name, v in stats.items()}))
        return row

    def train_step(self, it: int) -> dict:
        c, acc = self.config, self.acc
        cache = self.cache
        # the step's draws are made for the pairs of all processes, each process taking its share
        gen = torch.Generator().manual_seed(derive_seed(self.run.seed, it, 0, 2))
        per_step = c.train_batch_size * c.gradient_accumulation
        picked = self.pair_sampler.next(per_step * acc.num_processes)
        lo, hi = acc.process_index * per_step, (acc.process_index + 1) * per_step
        mine = torch.tensor(picked[lo:hi])
        flips = (torch.rand(per_step * acc.num_processes, generator=gen) < 0.5)[lo:hi] if cache.hflip else None
        drop = (torch.rand(per_step * acc.num_processes, generator=gen) < c.caption_dropout)[lo:hi]
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

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        pairs = self.pair_sampler.state_dict() if self.pair_sampler is not None else self._pending_pair_state
        state["dpo"] = {"pair_sampler": pairs}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dpo = state.get("dpo") or {}
        if dpo.get("pair_sampler") is not None:
            if self.pair_sampler is not None:
                self.pair_sampler.load_state_dict(dpo["pair_sampler"])
            else:
                self._pending_pair_state = dict(dpo["pair_sampler"])


class OnlineDPOTrainer(DPOPairLoss, GroupTrainer):
    """DPO on the model's own groups ranked by a reward (see the module docstring).

    Args:
        sampler: the model; a reference is needed (LoRA adapters, or a kept copy for full tuning).
        rewards: ``{name: (reward, weight)}`` that rank the groups (at least one).
        config: :class:`OnlineDPOConfig`.
        The other arguments are :class:`Trainer`'s.
    """

    algorithm = "dpo"
    progress_keys = ("loss", "implicit_acc")

    def __init__(self, sampler, rewards, config: OnlineDPOConfig, **kwargs) -> None:
        if not isinstance(config, OnlineDPOConfig):
            raise TypeError(f"OnlineDPOTrainer takes an OnlineDPOConfig, got {type(config).__name__}")
        self._check_sampler(sampler, config)
        if not rewards:
            raise ValueError("dpo.mode: online ranks each group with the recipe's rewards; give at least one "
                             "(e.g. rewards: {shapes-proxy: 1.0}) or set dpo.mode: offline with dpo.pairs")
        flow = sampler.parameterization == "flow"
        kernel_ok = {"ode": True, "ddim": not flow, "flow_sde": flow, "flow_cps": flow}[config.rollout_kernel]
        if not kernel_ok:
            raise ValueError(f"dpo.rollout_kernel {config.rollout_kernel!r} does not fit a "
                             f"{sampler.parameterization}-prediction model: use ode or "
                             f"{'flow_sde / flow_cps' if flow else 'ddim'}")
        super().__init__(sampler, rewards, config, **kwargs)
        self._setup_pairs()
        self.reward_calls = 0

    @property
    def steps_per_iteration(self) -> int:
        c = self.config
        groups = c.prompts_per_iteration // self.acc.num_processes
        pairs = groups * (1 if c.pairing == "best_worst" else c.group_size * (c.group_size - 1) // 2)
        return max(1, c.inner_epochs * math.ceil(pairs / (c.train_batch_size * c.gradient_accumulation)))

    @property
    def eval_guidance(self) -> float:
        return float(self.config.guidance_scale)

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

    def _update(self, x_w: torch.Tensor, x_l: torch.Tensor, cond_of, gen: torch.Generator,
                n_pairs: int | None = None) -> dict:
        """Optimizer steps over the first ``n_pairs`` (default all) of ``len(x_w)`` pairs (all the draws
        first, then :meth:`~GroupTrainer.minibatch_updates`); ``cond_of(rows)`` gives the conditioning
        of pairs ``rows``."""
        k = self.config.timesteps_per_pair
        n = x_w.shape[0] if n_pairs is None else n_pairs
        noise, times = self.pair_draws(x_w, gen)

        def terms(mb):
            cond = cond_of(mb)
            for j in range(k):
                yield self.pair_losses(x_w[mb], x_l[mb], cond, noise[j, mb], times[j, mb])

        t0 = time.perf_counter()
        out = self.minibatch_updates(torch.arange(n), gen, k, terms)
        st = out.pop("stats")
        return {**out, "pairs": n, "time/train": time.perf_counter() - t0, **self.pair_metrics(st)}

    def train_step(self, it: int) -> dict:
        batch = self.collect_groups(it)
        self.reward_calls += int(batch.all_scores.numel())
        w_rows, l_rows, gaps = self.make_pairs(batch)
        row = {**self.reward_metrics(batch), "reward_calls": self.reward_calls}
        # every group tied on every process: nothing to learn from this iteration
        if self.lockstep_count(w_rows.numel()) == 0:
            return {**row, "loss": float("nan"), "grad_norm": float("nan"), "optimizer_steps": 0, "skipped_steps": 0,
                    "pairs": 0}
        traj = batch.traj
        x0 = traj.final.float().cpu()
        cond = traj.cond
        n_pairs = w_rows.numel()
        # a process without pairs while others have some takes weightless steps on its first sample
        src_w, src_l = (w_rows, l_rows) if n_pairs else (torch.zeros(1, dtype=torch.long),) * 2

        def cond_of(mb):
            return cond[src_w[mb]].to(self.sampler.device)

        row.update(self._update(x0[src_w], x0[src_l], cond_of, batch.generator, n_pairs=n_pairs))
        if n_pairs:
            row.update({"reward/gap": float(gaps.mean()), "reward/chosen": float(batch.scores[w_rows].mean()),
                        "reward/rejected": float(batch.scores[l_rows].mean())})
        return row

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dpo"] = {"reward_calls": self.reward_calls}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reward_calls = int((state.get("dpo") or {}).get("reward_calls", 0))


class DPOTrainer:
    """``algorithm: dpo``: :class:`OfflineDPOTrainer` for an :class:`OfflineDPOConfig` (labelled pairs),
    :class:`OnlineDPOTrainer` for an :class:`OnlineDPOConfig` (reward-ranked groups).

    ``DPOTrainer(sampler, rewards, config, **kwargs)`` returns an instance of that class; offline,
    ``rewards`` must be empty (the pairs carry the preferences).
    """

    algorithm = "dpo"
    #: offline needs none; the online trainer checks for its own
    needs_rewards = False

    def __new__(cls, sampler, rewards, config, **kwargs) -> OfflineDPOTrainer | OnlineDPOTrainer:
        if isinstance(config, OnlineDPOConfig):
            return OnlineDPOTrainer(sampler, rewards, config, **kwargs)
        return cls.from_parts(sampler, config, rewards=rewards, **kwargs)

    @classmethod
    def from_parts(cls, sampler, config, *, rewards=None, **kwargs) -> OfflineDPOTrainer | OnlineDPOTrainer:
        """Build from a recipe's loaded parts (``visalign.trainers.build_trainer``)."""
        if isinstance(config, OnlineDPOConfig):
            return OnlineDPOTrainer.from_parts(sampler, config, rewards=rewards, **kwargs)
        if isinstance(config, OfflineDPOConfig):
            return OfflineDPOTrainer.from_parts(sampler, config, rewards=rewards, **kwargs)
        raise TypeError(f"DPOTrainer takes an OfflineDPOConfig or an OnlineDPOConfig (DPOConfig(mode=...) builds "
                        f"one), got {type(config).__name__}")
