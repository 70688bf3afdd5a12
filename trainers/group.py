"""Group rollouts with group-relative advantages: what GRPO, DiffusionNFT and online DPO share.

Each iteration draws ``prompts_per_iteration`` prompts, rolls out ``group_size`` samples of each
(through the shared collect step), scores them, gathers the scores over processes and turns them
into advantages (Flow-GRPO's group normalisation, or DDPO's per-prompt running statistics).
Groups never straddle processes, so advantages need no communication beyond one gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .base import OptimConfig, Trainer
from .common.advantages import PerPromptStats, group_advantages
from .common.metrics import masked_stats
from .common.seeds import derive_seed

__all__ = ["GroupConfig", "GroupBatch", "GroupTrainer"]


@dataclass
class GroupConfig(OptimConfig):
    """Rollout geometry and advantages of group-based algorithms (plus :class:`OptimConfig`)."""

    # ---- rollout -----------------------------------------------------------------------------
    #: samples per prompt (G); Flow-GRPO uses 24 on SD3.5-M
    group_size: int = 24
    #: prompts per iteration, over all processes (each process takes an equal share of whole groups)
    prompts_per_iteration: int = 2
    #: denoising steps of a training rollout (Flow-GRPO: 10)
    num_steps: int = 10
    #: CFG scale used in rollout AND in training (the same, so the ratio is on-policy)
    guidance_scale: float = 4.5
    #: train the model to be good without CFG: rollout and training both use guidance 1
    train_without_cfg: bool = False
    # ---- advantages ----------------------------------------------------------------------------
    #: "group": std per group; "global": std over the whole gathered batch (Flow-GRPO's default);
    #: "per_prompt": DDPO's running statistics over the last per_prompt_buffer rewards of a prompt
    advantage_std: str = "global"
    per_prompt_buffer: int = 16
    advantage_clip: float = 5.0
    #: with several rewards: "reward" (combine the rewards, then normalise) or "advantage"
    #: (normalise each reward within its group, then weight)
    multi_reward: str = "reward"
    # ---- update geometry -----------------------------------------------------------------------
    #: passes over each iteration's samples
    inner_epochs: int = 1
    #: samples per micro-batch (per process)
    train_batch_size: int = 8
    #: micro-batches per optimizer step
    gradient_accumulation: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.group_size >= 2, f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        need(self.prompts_per_iteration >= 1, f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        need(self.num_steps >= 2, f"num_steps must be >= 2, got {self.num_steps}")
        need(self.advantage_std in ("group", "global", "per_prompt"),
             f"advantage_std must be group, global or per_prompt, got {self.advantage_std!r}")
        need(self.multi_reward in ("reward", "advantage"), f"multi_reward must be reward or advantage, got {self.multi_reward!r}")
        need(self.train_batch_size >= 1 and self.gradient_accumulation >= 1 and self.inner_epochs >= 1,
             "train_batch_size, gradient_accumulation and inner_epochs must be >= 1")

    def check_geometry(self, num_processes: int) -> None:
        """Batch-geometry checks that need the number of processes; errors say what to change."""
        if self.prompts_per_iteration % num_processes:
            raise ValueError(
                f"prompts_per_iteration ({self.prompts_per_iteration}) must be a multiple of the number of "
                f"processes ({num_processes}) so each process holds whole groups; set prompts_per_iteration to "
                f"{max(num_processes, self.prompts_per_iteration // num_processes * num_processes)}"
            )
        per_process = self.prompts_per_iteration // num_processes * self.group_size
        per_step = self.train_batch_size * self.gradient_accumulation
        if per_process % per_step:
            raise ValueError(
                f"each process holds {per_process} samples per iteration (prompts_per_iteration / processes x "
                f"group_size) but one optimizer step takes train_batch_size x gradient_accumulation = {per_step}; "
                f"choose train_batch_size and gradient_accumulation whose product divides {per_process}"
            )


@dataclass
class GroupBatch:
    """One iteration's groups on this process, scored, with advantages.

    ``rollout`` is the collect step's :class:`~visalign.samplers.Rollout` (its ``trajectory``
    recorded); ``advantages`` / ``keep`` are this process's rows, ``all_*`` the gathered batch.
    ``generator`` is the iteration's generator, for the algorithm's further draws.
    """

    rollout: Any
    scores: torch.Tensor
    valid: torch.Tensor
    advantages: torch.Tensor
    keep: torch.Tensor
    all_scores: torch.Tensor
    all_valid: torch.Tensor
    all_keep: torch.Tensor
    generator: torch.Generator
    #: ``(B,)`` per-sample weights of the KL term (GARDO's uncertainty gate), or ``None`` (all 1)
    kl_weight: torch.Tensor | None = None

    @property
    def traj(self):
        return self.rollout.trajectory


class GroupTrainer(Trainer):
    """A :class:`Trainer` whose iterations start with scored groups (:meth:`collect_groups`).

    Args:
        rewards: ``{name: (reward, weight)}`` trained on.  With ``multi_reward="reward"`` they are
            combined (``visalign.rewards.combine``) before the advantages; with ``"advantage"``
            each is group-normalised and the advantages are weighted.
        The other arguments are :class:`Trainer`'s.
    """

    progress_keys = ("reward/mean", "kl")
    needs_rewards = True

    @classmethod
    def from_parts(cls, sampler, config, *, rewards=None, **kwargs) -> "GroupTrainer":
        return cls(sampler, rewards, config, **kwargs)

    def __init__(self, sampler, rewards: Mapping[str, tuple], config: GroupConfig, **kwargs) -> None:
        from visalign.rewards.compose import CombinedReward

        super().__init__(sampler, config, **kwargs)
        config.check_geometry(self.acc.num_processes)
        self.reward_weights = {name: float(w) for name, (_, w) in rewards.items()}
        self.trained_reward_names = list(rewards)
        if len(rewards) > 1:  # components keep each reward's native score under its name
            self.reward = CombinedReward([(n, r, float(w)) for n, (r, w) in rewards.items()], "none", None, "sum", None)
        else:
            self.reward = next(iter(rewards.values()))[0]
        self.per_prompt = PerPromptStats(config.per_prompt_buffer) if config.advantage_std == "per_prompt" else None

    @property
    def guidance(self) -> float:
        """The CFG scale of rollouts and of training."""
        return 1.0 if self.config.train_without_cfg else self.config.guidance_scale

    def rollout_options(self, it: int, n_prompts: int, generator: torch.Generator) -> dict:
        """Keyword arguments of this iteration's collect step (kernel, SDE steps, initial noise...);
        the default is an ODE rollout."""
        return {"kernel": "ode", "record_means": False}

    def collect_groups(self, it: int) -> GroupBatch:
        """Roll out this process's groups, score them and compute advantages."""
        from visalign.samplers import collect

        c, acc = self.config, self.acc
        records = self.prompt_sampler.next(c.prompts_per_iteration)
        per_proc = c.prompts_per_iteration // acc.num_processes
        mine = records[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]
        prompts = [r["prompt"] for r in mine for _ in range(c.group_size)]
        metadata = [r.get("metadata") for r in mine for _ in range(c.group_size)]
        gen = torch.Generator().manual_seed(derive_seed(self.run.seed, it, acc.process_index, 1))
        options = self.rollout_options(it, len(mine), gen)
        rollout = collect(self.sampler, prompts, {"reward": self.reward}, metadata=metadata, num_steps=c.num_steps,
                          guidance_scale=self.guidance, generator=gen, keep_trajectory=True, keep_images=False,
                          encode=lambda ps: self.encode(ps).to(self.sampler.device), autocast=acc.autocast,
                          size=self.size, **options)
        out = rollout.outputs["reward"]
        scores = out.scores.detach().float().cpu()
        valid = out.valid.cpu() & torch.isfinite(scores)
        # advantages over the gathered batch (groups never straddle processes)
        all_scores, all_valid = acc.gather(scores.to(acc.device)).cpu(), acc.gather(valid.to(acc.device)).cpu()
        if c.multi_reward == "advantage" and len(self.reward_weights) > 1:
            adv = torch.zeros_like(all_scores)
            for name, w in self.reward_weights.items():
                comp = acc.gather(out.components[name].detach().float().to(acc.device)).cpu()
                a, _ = group_advantages(comp, all_valid, c.group_size, std="group", clip=c.advantage_clip)
                adv += w * a
            informative = (adv.view(-1, c.group_size).abs().sum(1, keepdim=True) > 0).expand(-1, c.group_size).flatten()
            keep = all_valid & informative
        elif c.advantage_std == "per_prompt":
            all_prompts = [r["prompt"] for r in records for _ in range(c.group_size)]
            adv, keep = self.per_prompt.advantages(all_prompts, all_scores, all_valid, c.advantage_clip)
        else:
            adv, keep = group_advantages(all_scores, all_valid, c.group_size, std=c.advantage_std, clip=c.advantage_clip)
        n = scores.shape[0]
        lo = acc.process_index * n
        return GroupBatch(rollout, scores, valid, adv[lo : lo + n], keep[lo : lo + n], all_scores, all_valid, keep, gen,
                          kl_weight=self.kl_weights(out.components))

    def reward_metrics(self, batch: GroupBatch) -> dict:
        """The iteration's reward, component and advantage statistics, and the collect timings."""
        row: dict = {}
        mean, std = masked_stats(batch.all_scores, batch.all_valid)
        row.update({"reward/mean": mean, "reward/std": std, "reward/valid_fraction": float(batch.all_valid.float().mean())})
        for name, comp in batch.rollout.outputs["reward"].components.items():
            m, s = masked_stats(comp.cpu(), batch.valid)
            row[f"reward/{name}/mean"], row[f"reward/{name}/std"] = m, s
        adv = batch.advantages[batch.keep]
        row.update({"advantage/mean": float(adv.mean()) if adv.numel() else 0.0,
                    "advantage/std": float(adv.std(unbiased=False)) if adv.numel() > 1 else 0.0,
                    "advantage/abs_max": float(adv.abs().max()) if adv.numel() else 0.0,
                    "groups/kept_fraction": float(batch.all_keep.float().mean())})
        if batch.kl_weight is not None:
            row["kl/gated_fraction"] = float(batch.kl_weight.mean())
        t = batch.rollout.timings
        row.update({"time/rollout": t["rollout"] + t["decode"], "time/reward": t["reward"]})
        return row

    def minibatch_updates(self, indices: torch.Tensor, generator: torch.Generator, terms_per_sample: int,
                          loss_terms, pad_index: int = 0) -> dict:
        """The update loop of group algorithms: for each inner epoch, the ``indices`` (samples of this
        process) in a fresh random order, cut into optimizer steps of ``train_batch_size x
        gradient_accumulation`` samples and micro-batches of ``train_batch_size``.

        ``loss_terms(mb)`` yields ``(per-sample loss (b,), stats)`` for each of the
        ``terms_per_sample`` terms of micro-batch ``mb`` (e.g. one per trained step); each term's sum
        is scaled by ``1 / (samples in the step x terms_per_sample)`` and back-propagated at once.
        Returns the mean loss and gradient norm over the steps taken, the step counts and each
        statistic concatenated over the terms that were applied (``stats``).

        With several processes every process takes as many micro-batches as the one with the most
        samples (:meth:`~.base.Trainer.lockstep_count`): a process with fewer pads its order with
        repeats of ``pad_index`` (or its own first sample) whose terms weigh 0, so the gradient
        reductions and a sharded denoiser's gathers meet on every process.
        """
        c = self.config
        per_step = c.train_batch_size * c.gradient_accumulation
        stats: dict[str, list[torch.Tensor]] = {}
        losses, norms, skipped = [], [], 0
        n_real = indices.numel()
        n_all = self.lockstep_count(n_real)
        for _epoch in range(c.inner_epochs):
            order = indices[torch.randperm(n_real, generator=generator)]
            weight = torch.ones(n_all)
            if n_all > n_real:
                fill = order[:1] if n_real else torch.tensor([pad_index], dtype=torch.long)
                order = torch.cat([order, fill.repeat(n_all - n_real)])
                weight[n_real:] = 0.0
            for g0 in range(0, n_all, per_step):
                group, w_group = order[g0 : g0 + per_step], weight[g0 : g0 + per_step]
                denom = max(1.0, float(w_group.sum())) * terms_per_sample

                def scaled(group=group, w_group=w_group, denom=denom):
                    for m0 in range(0, group.numel(), c.train_batch_size):
                        w = w_group[m0 : m0 + c.train_batch_size]
                        real = w > 0
                        for loss, st in loss_terms(group[m0 : m0 + c.train_batch_size]):
                            if bool(real.all()):
                                yield loss.sum() / denom  # a non-finite one ends the step here: no stats
                            else:
                                yield (loss * w.to(loss.device, loss.dtype)).sum() / denom
                            for name, val in st.items():
                                val = val.detach().cpu()
                                if val.ndim and val.shape[0] == real.numel() and not bool(real.all()):
                                    val = val[real]
                                stats.setdefault(name, []).append(val)

                result = self.optimizer_step(scaled)
                if result.skipped:
                    skipped += 1
                    continue
                losses.append(result.loss)
                norms.append(result.grad_norm)
        nan = float("nan")
        return {"loss": sum(losses) / len(losses) if losses else nan,
                "grad_norm": sum(norms) / len(norms) if norms else nan,
                "optimizer_steps": len(losses), "skipped_steps": skipped,
                "stats": {k: torch.cat(v) for k, v in stats.items()}}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["per_prompt"] = self.per_prompt.state_dict() if self.per_prompt is not None else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.per_prompt is not None and state.get("per_prompt") is not None:
            self.per_prompt.load_state_dict(state["per_prompt"])
