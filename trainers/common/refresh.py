"""Reward refresh in the loop: the trained reward head keeps learning from the policy's own samples.

A reward trained once on base samples is judged by the samples it was trained on; the policy soon
draws samples it cannot judge and climbs its errors.  The remedy of RLHF's labelling rounds
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
sec. 3.5) and of adversarial reward updates such as Adv-GRPO: every ``every`` iterations the
trainer floor (:meth:`visalign.trainers.base.Trainer.step`)

1. draws ``samples`` training prompts and samples one image each from the *current* policy (ODE,
   the run's evaluation steps and guidance unless set here), without gradient; for a pairwise
   (Bradley-Terry) head two images each, from two seeds;
2. has the judge (:mod:`visalign.rewards.judge`) label them (a pairwise head: compare each pair,
   :meth:`~visalign.rewards.judge.Judge.compare`), counting every label;
3. measures the head on the new labels (accuracy for a binary head, mean absolute error for a
   rating head, the share of decided pairs ranked as the judge did for a pairwise head),
   fine-tunes it in place with the reward kit (:func:`visalign.rewards.head_train.update`:
   each batch draws ``mix`` of its units from the labels of earlier rounds, the rest from the new
   ones) and measures it again;
4. keeps the new labels in the label store for the next rounds' replay.

The head is updated in place, so every holder of the reward (the algorithm's combined reward, an
evaluation reward of the same spec) scores with the refreshed head from the next call on.  The
refresh draws from its own generators inside a forked RNG, so it never shifts the training's
random stream; the head's weights, the label store and the judge's counters are checkpointed with
the trainer, so a resumed run continues exactly.  docs/reward_refresh.md has the loop, the judge
protocol and the toy measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .seeds import derive_seed

__all__ = ["RefreshSettings", "RewardRefresher", "build_refresher", "expand_ensemble", "head_agreement"]


@dataclass
class RefreshSettings:
    """The ``reward_refresh:`` section of a recipe.

    Args:
        every (`int`): refresh before iterations ``every, 2 every, ...`` (0-based); 0 = never
            (the run is exactly the run without this section).
        samples (`int`): images sampled from the current policy and labelled per refresh; for a
            pairwise head, pairs (two images of one prompt each, one label per pair).
        judge: who labels: a reward spec string (``"shapes"``) or a mapping
            (:class:`visalign.rewards.judge.JudgeSettings`: ``reward`` + ``component`` /
            ``threshold``, ``function``, or ``folder`` + ``timeout_s``).
        reward (`str`, *optional*): which trained reward is refreshed (a key of ``rewards:``); the
            only trained reward that is a kit head by default.
        mix (`float`): the share of each fine-tuning batch drawn from earlier rounds' labels
            (replay; the kit's ``replay_fraction``); the first round has none.
        ensemble (`int`, *optional*): grow the head to this many ensemble members at the first
            refresh (new members start as copies of the existing ones and diverge through their
            bootstrap resamples); null keeps the head's.
        steps / batch / lr: the kit's fine-tuning steps per refresh, units per step and learning rate.
        train_backbone (`bool`): also fine-tune a trainable backbone (``shapes-proxy``'s, a ``cnn``).
        max_labels (`int`, *optional*): the label budget: no refresh starts once this many labels
            were given (a refresh that would exceed it labels only what is left); a pair's label
            counts one.
        num_steps / guidance_scale: sampling of the labelled images (default: the run's evaluation
            steps and guidance).
    """

    every: int = 0
    samples: int = 64
    judge: Any = None
    reward: str | None = None
    mix: float = 0.5
    ensemble: int | None = None
    steps: int = 100
    batch: int = 64
    lr: float = 5e-4
    train_backbone: bool = False
    max_labels: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    #: images per sampling batch
    batch_size: int = 64
    #: offsets the refresh's own seeds (prompts, noise, fine-tuning batches) from the run's seed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"reward_refresh.every must be >= 0 (0 = no refresh), got {self.every}")
        if self.samples < 1:
            raise ValueError(f"reward_refresh.samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.mix < 1.0:
            raise ValueError(f"reward_refresh.mix (the replay share of each batch) must be in [0, 1), got {self.mix}")
        if self.ensemble is not None and self.ensemble < 1:
            raise ValueError(f"reward_refresh.ensemble must be >= 1 or null, got {self.ensemble}")
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"reward_refresh.steps, batch must be >= 1 and lr > 0; got {self.steps}, {self.batch}, "
                             f"{self.lr}")
        if self.max_labels is not None and self.max_labels < 1:
            raise ValueError(f"reward_refresh.max_labels must be >= 1 or null, got {self.max_labels}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"reward_refresh.num_steps must be >= 1 or null, got {self.num_steps}")
        if self.batch_size < 1:
            raise ValueError(f"reward_refresh.batch_size must be >= 1, got {self.batch_size}")
        if self.every and self.judge is None:
            raise ValueError("reward_refresh.judge: a refresh needs a judge, e.g. judge: {reward: shapes, component: "
                             "strict} (the toy world's gold verifier), a 'module:function' or a label folder")
        if self.judge is not None:
            from visalign.rewards.judge import JudgeSettings

            JudgeSettings.parse(self.judge)  # validates

    @property
    def judge_settings(self):
        from visalign.rewards.judge import JudgeSettings

        return JudgeSettings.parse(self.judge)


def expand_ensemble(model, members: int) -> bool:
    """Grow a head's ensemble to ``members`` (member ``j`` starts as a copy of member ``j mod K``, so
    the score is unchanged when ``members`` is a multiple of ``K``, e.g. from one member); returns
    whether it changed.  Shrinking is refused."""
    from visalign.rewards.head import EnsembleMLP

    old = model.heads
    k = old.members
    if members == k:
        return False
    if members < k:
        raise ValueError(f"reward_refresh.ensemble={members}: the head already has {k} members; an ensemble is "
                         f"grown, never cut (set ensemble: null or >= {k})")
    new = EnsembleMLP(old.in_dim, old.hidden, members).to(old.weight[0].device)
    idx = torch.arange(members) % k
    with torch.no_grad():
        for w_new, w_old in zip(new.weight, old.weight):
            w_new.copy_(w_old[idx])
        for b_new, b_old in zip(new.bias, old.bias):
            b_new.copy_(b_old[idx])
    new.requires_grad_(False)
    model.heads = new
    return True


def head_agreement(model, task: str, images: torch.Tensor, prompts: list, labels: torch.Tensor,
                   pairs: torch.Tensor | None = None) -> dict:
    """The head against labels: ``accuracy`` (binary: ``(score > 0.5) == (label > 0.5)``; pairwise,
    over the pairs ``(a, b)`` of item indices whose label is not a tie (0.5):
    ``(score_a > score_b) == (label > 0.5)``, absent when every pair is a tie) or ``mae`` (rating),
    and the mean score of the items."""
    with torch.no_grad():
        scores = model(images.float(), prompts if model.uses_prompts else None)["score"].float().cpu()
    out = {"score_mean": float(scores.mean())}
    if task == "pairwise":
        if pairs is None:
            raise ValueError("head_agreement: a pairwise head is measured on pairs; pass pairs=(P, 2) item indices")
        decided = labels != 0.5
        if decided.any():
            agree = (scores[pairs[:, 0]] > scores[pairs[:, 1]]) == (labels > 0.5)
            out["accuracy"] = float(agree[decided].float().mean())
    elif task == "binary":
        out["accuracy"] = float(((scores > 0.5) == (labels > 0.5)).float().mean())
    else:
        out["mae"] = float((scores - labels).abs().mean())
    return out


class RewardRefresher:
    """Refreshes one trained head reward with a judge's labels (module docstring).

    Args:
        settings: :class:`RefreshSettings`.
        reward: the trained reward (a kit head: :class:`visalign.rewards.head.HeadReward`), binary,
            rating or pairwise; a pairwise head is refreshed from pairs the judge compares.
        judge: a :class:`visalign.rewards.judge.Judge`.
        name: the reward's name in the recipe (for messages and metrics).
    """

    def __init__(self, settings: RefreshSettings, reward, judge, name: str = "reward") -> None:
        model = getattr(reward, "model", None)
        if model is None or not hasattr(model, "heads"):
            raise ValueError(f"reward_refresh: the trained reward {name!r} is not a reward head of the kit (a "
                             "`head:path=DIR` trained with `visalign rewards train`, or shapes-proxy); only such a "
                             "head can be refreshed")
        if model.task == "pairwise":
            from visalign.rewards.judge import Judge

            if isinstance(judge, Judge) and type(judge).label_pairs is Judge.label_pairs:
                raise ValueError(f"reward_refresh: {name!r} is a pairwise (Bradley-Terry) head, refreshed from "
                                 f"compared pairs, but the judge {judge.describe()} labels single images only; use a "
                                 "reward, function or folder judge (each compares pairs) or refresh a binary or "
                                 "rating head")
        self.settings, self.reward, self.judge, self.name = settings, reward, judge, name
        self.model = model
        self.rounds = 0
        self.skipped = 0
        self.store = None  # LabelledSet of every label so far
        self.last: dict = {}

    @property
    def labels(self) -> int:
        return self.judge.labels

    def due(self, it: int) -> bool:
        s = self.settings
        if not s.every or it <= 0 or it % s.every:
            return False
        return s.max_labels is None or self.judge.labels < s.max_labels

    # ---- one refresh -------------------------------------------------------------------------
    def _prompts(self, trainer, it: int, n: int) -> list[dict]:
        pool = trainer.train_prompts
        if not pool:
            raise ValueError("reward_refresh: the run has no training prompts to sample the labelled images from")
        g = torch.Generator().manual_seed(derive_seed(trainer.run.seed, self.settings.seed, it, 23) % (1 << 63))
        reps = -(-n // len(pool))
        order = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(reps)])[:n]
        return [pool[i] for i in order.tolist()]

    @property
    def pairwise(self) -> bool:
        """Whether the head learns from pairs (a Bradley-Terry head): the judge compares pairs."""
        return self.model.task == "pairwise"

    def _draw(self, trainer, it: int, per_prompt: int) -> tuple[torch.Tensor, list[str], list]:
        """``per_prompt`` images of each of this round's prompts (prompt ``j``'s images are rows
        ``j * per_prompt ...``, each from its own seed), with the prompts and metadata."""
        from visalign.samplers import collect

        s = self.settings
        n = s.samples if s.max_labels is None else min(s.samples, s.max_labels - self.judge.labels)
        records = self._prompts(trainer, it, n)
        prompts = [r["prompt"] for r in records]
        metadata = [r.get("metadata") for r in records]
        base = derive_seed(trainer.run.seed, s.seed, it, 29) % (1 << 31)
        guidance = s.guidance_scale if s.guidance_scale is not None else (
            trainer.run.eval_guidance_scale if trainer.run.eval_guidance_scale is not None else trainer.eval_guidance)
        with torch.no_grad():
            out = collect(trainer.sampler, [p for p in prompts for _ in range(per_prompt)], None,
                          metadata=[m for m in metadata for _ in range(per_prompt)],
                          num_steps=s.num_steps or trainer.run.eval_num_steps, guidance_scale=guidance,
                          seeds=[base + j for j in range(n * per_prompt)], batch_size=s.batch_size,
                          keep_images=True, autocast=trainer.acc.autocast, size=trainer.size)
        images = out.images
        if images.ndim == 5:
            raise ValueError("reward_refresh: refreshing a reward of video samples is not supported; refresh an image "
                             "reward")
        return images.float().clamp(0, 1), prompts, metadata

    def sample(self, trainer, it: int) -> tuple[torch.Tensor, list[str], list]:
        """``samples`` images of the current policy (no gradient) with their prompts and metadata."""
        return self._draw(trainer, it, 1)

    def sample_pairs(self, trainer, it: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list]:
        """``samples`` pairs of the current policy (no gradient): two images of each prompt from two
        seeds, ``(images_a, images_b, prompts, metadata)``."""
        images, prompts, metadata = self._draw(trainer, it, 2)
        return images[0::2], images[1::2], prompts, metadata

    def _ask(self, trainer, it: int):
        """Sample and label this round: ``(new LabelledSet or None when the judge gave nothing,
        sampling seconds)``; only finite labels are kept."""
        from visalign.rewards.head_data import LabelledSet

        t0 = time.perf_counter()
        if self.pairwise:
            images_a, images_b, prompts, metadata = self.sample_pairs(trainer, it)
        else:
            images, prompts, metadata = self.sample(trainer, it)
        t_sample = time.perf_counter() - t0
        if hasattr(self.judge, "write"):  # a folder judge: only the main process writes the round's files
            self.judge.write = bool(trainer.acc.is_main_process)
        if not self.pairwise:
            labels = self.judge(images, prompts, metadata)
            if labels is None:
                return None, t_sample
            keep = torch.isfinite(labels)
            return LabelledSet.from_tensors(images[keep], [p for p, k in zip(prompts, keep.tolist()) if k],
                                            labels[keep]), t_sample
        labels = self.judge.compare(images_a, images_b, prompts, metadata)
        if labels is None:
            return None, t_sample
        keep = torch.isfinite(labels)
        kept = [p for p, k in zip(prompts, keep.tolist()) if k]
        m = len(kept)  # items: the kept pairs' first images, then their second images
        pairs = torch.stack([torch.arange(m), torch.arange(m) + m], 1)
        return LabelledSet.from_tensors(torch.cat([images_a[keep], images_b[keep]]), kept + kept, None,
                                        pairs=pairs, pair_labels=labels[keep]), t_sample

    def refresh(self, trainer, it: int) -> dict:
        """One round (module docstring); returns its metrics (``refresh/...``)."""
        from visalign.rewards.head_data import LabelledSet
        from visalign.rewards.head_train import update

        s = self.settings
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            new, t_sample = self._ask(trainer, it)
            t_judge = time.perf_counter() - t0 - t_sample
            row: dict = {"refresh/round": self.rounds + 1}
            if new is None:
                self.skipped += 1
                row.update({"refresh/new_labels": 0, "refresh/skipped": self.skipped})
            else:
                row["refresh/new_labels"] = new.units
                if new.units:
                    targets = new.pair_labels if self.pairwise else new.targets
                    row["refresh/label_mean"] = float(targets.mean())
                    imgs = new.image_batch(torch.arange(len(new)))
                    measure = lambda: head_agreement(self.model, self.model.task, imgs, new.prompts,  # noqa: E731
                                                     targets, new.pairs)
                    before = measure()
                    if s.ensemble is not None:
                        expand_ensemble(self.model, s.ensemble)
                    update(self.model, new, steps=s.steps, batch=s.batch, lr=s.lr, replay=self.store,
                           replay_fraction=s.mix if self.store is not None else 0.0,
                           train_backbone=s.train_backbone, seed=derive_seed(trainer.run.seed, s.seed, it, 31) % (1 << 62),
                           log=lambda _msg: None, log_every=max(1, s.steps))
                    self.model.eval().requires_grad_(False)
                    after = measure()
                    for key, value in before.items():
                        row[f"refresh/{key}_before"] = value
                        row[f"refresh/{key}_after"] = after[key]
                    self.store = new if self.store is None else LabelledSet.concat(self.store, new)
            self.rounds += 1
        row.update({"refresh/seconds": time.perf_counter() - t0, "refresh/sample_seconds": t_sample,
                    "refresh/judge_seconds": t_judge})
        self.last = row
        return row

    def metrics(self) -> dict:
        """The counters every logged row carries: the label budget spent, judge calls, rounds."""
        return {"refresh/labels": self.judge.labels, "refresh/judge_calls": self.judge.calls,
                "refresh/rounds": self.rounds}

    def save(self, out_dir) -> None:
        """Write the refreshed head as a kit head folder (``head:path=DIR``; for ``shapes-proxy``
        also ``shapes-proxy:path=DIR``), with the rounds and labels it was refreshed on."""
        from visalign.rewards.head import save_head

        meta = getattr(self.reward, "meta", {}) or {}
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model")}
        extra["refreshed"] = {"rounds": self.rounds, "labels": self.judge.labels, "judge": self.judge.describe()}
        save_head(self.model, out_dir, extra=extra, seed=meta.get("model", {}).get("seed", 0))

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        store = None
        if self.store is not None:
            store = {"images": self.store.images, "prompts": list(self.store.prompts), "targets": self.store.targets,
                     "pairs": self.store.pairs, "pair_labels": self.store.pair_labels}
        return {"rounds": self.rounds, "skipped": self.skipped, "members": self.model.heads.members,
                "head": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "store": store, "judge": self.judge.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from visalign.rewards.head_data import LabelledSet
        from visalign.rewards.loading import load_strict

        expand_ensemble(self.model, int(state["members"]))
        load_strict(self.model, state["head"], f"the refreshed head of {self.name!r} in the checkpoint")
        self.model.eval().requires_grad_(False)
        self.rounds, self.skipped = int(state["rounds"]), int(state["skipped"])
        st = state.get("store")
        self.store = None if st is None else LabelledSet.from_tensors(
            st["images"], st["prompts"], st["targets"], pairs=st.get("pairs"), pair_labels=st.get("pair_labels"))
        self.judge.load_state_dict(state["judge"])


def build_refresher(settings: RefreshSettings | None, rewards: Mapping[str, tuple] | None,
                    reward_options: dict | None = None, write: bool = True) -> RewardRefresher | None:
    """The refresher of a recipe's ``reward_refresh`` section over its loaded ``{name: (reward,
    weight)}``; ``None`` when ``every`` is 0 (the run is then exactly a run without the section)."""
    if settings is None or not settings.every:
        return None
    from visalign.rewards.judge import build_judge

    rewards = dict(rewards or {})
    if settings.reward is not None:
        if settings.reward not in rewards:
            raise ValueError(f"reward_refresh.reward={settings.reward!r} is not a trained reward of this recipe "
                             f"(rewards: {sorted(rewards)}); name one of them")
        name = settings.reward
    else:
        heads = [n for n, (r, _) in rewards.items() if hasattr(getattr(r, "model", None), "heads")]
        if len(heads) != 1:
            raise ValueError(f"reward_refresh: {'no' if not heads else 'several'} trained rewards are kit heads "
                             f"({heads or sorted(rewards)}); name the one to refresh with reward_refresh.reward "
                             "(a `head:path=DIR` or shapes-proxy)")
        name = heads[0]
    judge = build_judge(settings.judge_settings, reward_options, write=write)
    return RewardRefresher(settings, rewards[name][0], judge, name=name)
