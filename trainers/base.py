"""The floor under every training algorithm: :class:`Trainer` and :class:`OptimConfig`.

An algorithm is a config dataclass (a subclass of :class:`OptimConfig`, so the optimiser, LR
schedule, EMA and NaN guard are set the same way everywhere) and a trainer that implements one
method, :meth:`Trainer.train_step`, on this base.  The base owns everything else:

- the run loop with its progress bar (:meth:`train`), periodic evaluation on held-out prompts
  (:meth:`evaluate`, through the shared collect step), ``eval.jsonl`` / ``eval.json`` and the plot;
- accelerate (devices, mixed precision, several processes, sharded training with FSDP2 or DeepSpeed
  ZeRO: :mod:`.common.sharding`) and its trackers, metric logging;
- AdamW, the LR schedule and an EMA of the trainable weights (:meth:`optimizer_step` with the
  NaN / inf guard and gradient clipping);
- checkpoints that resume exactly (:meth:`save_checkpoint`, :meth:`resume`), export of a kept
  checkpoint's LoRA (:meth:`export`) and the final weights (:meth:`save_final`).

docs/architecture.md shows a complete toy algorithm in 30 lines.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from visalign.io import atomic_write, atomic_write_json, atomic_write_text, read_jsonl

from .common import sharding
from .common.checkpoint import (
    checkpoint_iteration,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    sharded_checkpoint_path,
)
from .common.data import PromptSampler
from .common.ema import EMA
from .common.guards import GuardSettings, HackingAlarm, kl_gate, uncertainty_of
from .common.metrics import MetricsLog, plot_metrics
from .common.run import RunSettings
from .common.seeds import derive_seed

__all__ = ["OptimConfig", "Trainer", "TrainingStopped", "OptimStep", "derive_seed"]


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many NaN steps); a checkpoint was written first."""


@dataclass
class OptimConfig:
    """Optimisation settings every algorithm shares (its config subclasses this one)."""

    #: AdamW learning rate
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    #: "constant" or "cosine" (over run.iterations), after `warmup_iterations` of linear warm-up
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    #: gradient-norm clipping per optimizer step
    max_grad_norm: float = 1.0
    #: EMA of the trainable weights, updated after every optimizer step; 0 disables
    ema_decay: float = 0.9
    #: stop after this many consecutive skipped (NaN / inf loss or gradient) optimizer steps
    max_nan_steps: int = 3

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {self.warmup_iterations}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.max_nan_steps < 1:
            raise ValueError(f"max_nan_steps must be >= 1, got {self.max_nan_steps}")


@dataclass
class OptimStep:
    """What :meth:`Trainer.optimizer_step` did: the summed loss, the gradient norm before clipping
    and whether the step was skipped (a NaN / inf loss or gradient)."""

    loss: float
    grad_norm: float
    skipped: bool


class Trainer(abc.ABC):
    """Run management shared by every algorithm; subclasses implement :meth:`train_step`.

    Args:
        sampler: the model (``visalign.samplers.load(...)``).
        config: the algorithm's config (an :class:`OptimConfig` subclass).
        train_prompts / eval_prompts: prompt records ``{"prompt", "metadata"}``.
        eval_rewards: ``{name: reward}`` for evaluation (may include rewards not trained on, so
            reward hacking shows).
        run: :class:`RunSettings`.
        trainable: the parameters to train (LoRA parameters from ``add_lora``); ``None`` trains
            the whole denoiser (a frozen reference copy is kept for ``sampler.reference()``).
        accelerator: an ``accelerate.Accelerator``; one is made from ``run`` (and the accelerate launch
            config: FSDP2 or DeepSpeed ZeRO shard the denoiser, docs/scaling.md) when omitted.
        log_config: extra sections written to ``config.json`` (the recipe's model, data, rewards).
        size: ``{"height", "width", "num_frames"}`` of rollouts.
        guards: :class:`~visalign.trainers.common.guards.GuardSettings` (gated KL, adaptive
            reference, held-out alarm).
        reward_refresh: a :class:`~visalign.trainers.common.refresh.RewardRefresher` (the trained
            reward head keeps learning from a judge's labels of the policy's samples), or ``None``.
    """

    #: the registry name; also the progress bar's label and the config's key in config.json
    algorithm: str = ""
    #: metrics shown on the progress bar
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(self, sampler, config: OptimConfig, *, train_prompts=(), eval_prompts=None,
                 eval_rewards: Mapping | None = None, run: RunSettings | None = None, trainable=None,
                 accelerator=None, log_config: dict | None = None, size: dict | None = None,
                 guards: GuardSettings | None = None, reward_refresh=None) -> None:
        from visalign.threads import configure_threads

        self.sampler, self.config, self.run = sampler, config, run or RunSettings()
        if self.run.threads is not None:  # "auto" (null) is applied by the command line, not by the library
            configure_threads(self.run.threads, sampler.device)
        if accelerator is None:
            accelerator = sharding.make_accelerator(
                device=sampler.device, mixed_precision={"fp32": "no"}.get(self.run.mixed_precision, self.run.mixed_precision),
                log_with=self._available_trackers() or None, project_dir=self.run.run_dir)
        else:
            sharding.adopt_cpu_fsdp(accelerator)
        self.acc = accelerator
        #: ``"fsdp"`` (FSDP2), ``"deepspeed"`` (ZeRO) or ``None``: how the denoiser is distributed
        self.sharding = sharding.kind_of(self.acc)
        self._zero3 = self.sharding == "deepspeed" and int(self.acc.state.deepspeed_plugin.zero_stage) == 3
        if self.run.gradient_checkpointing:
            enable = getattr(sampler.denoiser, "enable_gradient_checkpointing", None)
            if enable is None or not getattr(sampler.denoiser, "_supports_gradient_checkpointing", False):
                raise ValueError(f"run.gradient_checkpointing: the {type(sampler.denoiser).__name__} denoiser does not "
                                 "support gradient checkpointing; set run.gradient_checkpointing: false")
            enable()
        if trainable is None:
            sampler.keep_reference_copy()
            sampler.denoiser.requires_grad_(True)
            trainable = list(sampler.denoiser.parameters())
        self.params = [p for p in trainable if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad")
        if self.acc.num_processes > 1:  # every process starts from rank 0's weights
            import torch.distributed as dist

            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)
        sampler.denoiser.eval()  # no dropout: the network that samples is the one trained
        c = config
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                           weight_decay=c.weight_decay, eps=c.adam_eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        #: the prepared denoiser (the denoiser itself under FSDP2, DeepSpeed's engine under ZeRO)
        self.model = sampler.denoiser
        if self.sharding is not None:
            refresh = (guards.reference_refresh_every if guards is not None else 0) or \
                getattr(config, "ref_refresh_every", 0)
            if refresh and getattr(sampler.denoiser, "peft_config", None):
                # the adaptive reference's frozen adapter exists before sharding, which covers it with the
                # trained one (a copy of the initial adapter: the base while LoRA starts at zero)
                sampler.refresh_reference()
            self._prepare_sharded()
        self.ema = EMA(self.params, c.ema_decay, resync=self.resync_weights) if c.ema_decay > 0 else None
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts or [])
        self.prompt_sampler = PromptSampler(self.train_prompts, seed=self.run.seed)
        self.eval_rewards = dict(eval_rewards or {})
        self.iteration = 0
        self.nan_steps = 0
        self.run_dir = Path(self.run.run_dir)
        self.metrics = MetricsLog(self.run_dir, self.acc, enabled=self.acc.is_main_process)
        self._cond_cache: dict[str, object] = {}
        self.log_config = log_config or {}
        self.size = dict(size or {})
        self.guards = guards or GuardSettings()
        #: the names of the rewards trained on (set by algorithms that train on rewards): every other
        #: evaluation reward is held out for the hacking alarm
        self.trained_reward_names: list[str] = []
        self.alarm: HackingAlarm | None = None
        self.reference_refreshes = 0
        #: wall-clock seconds spent in iterations (resumed runs included): the clock of run.max_minutes
        self.train_seconds = 0.0
        self.reward_refresh = reward_refresh

    #: whether the algorithm trains on rewards (a recipe must then name at least one)
    needs_rewards: bool = False

    @classmethod
    def from_parts(cls, sampler, config, *, rewards=None, **kwargs) -> "Trainer":
        """Build from a recipe's loaded parts (``visalign.trainers.build_trainer``); an algorithm
        that takes rewards overrides this to pass them on."""
        return cls(sampler, config, **kwargs)

    # ---- what an algorithm implements ---------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, it: int) -> dict:
        """One iteration of the algorithm (iteration ``it``, 0-based): collect, compute losses, call
        :meth:`optimizer_step`; return its metrics (the base adds ``iteration``, ``lr`` and time)."""

    #: nominal optimizer steps per iteration: the LR schedule's clock (warm-up and cosine are given
    #: in iterations)
    steps_per_iteration: int = 1

    @property
    def eval_guidance(self) -> float:
        """The CFG scale evaluations use unless ``run.eval_guidance_scale`` sets one."""
        return float(getattr(self.config, "guidance_scale", self.sampler.default_guidance))

    # ---- setup helpers -------------------------------------------------------------------------
    def _available_trackers(self) -> list[str]:
        import importlib.util

        return [t for t in self.run.trackers if importlib.util.find_spec(t) is not None]

    def _prepare_sharded(self) -> None:
        """``accelerator.prepare`` of the denoiser with its optimizer.  FSDP2 shards the denoiser in
        place (its parameters become DTensors, the optimizer's references are re-pointed to them) and
        the frozen reference copy of full fine-tuning is sharded the same way; DeepSpeed wraps the
        denoiser in its engine, which reduces, clips and steps (its config is completed first:
        :func:`~.common.sharding.prepare_deepspeed_config`)."""
        acc, den = self.acc, self.sampler.denoiser
        if self.sharding == "deepspeed":
            sharding.prepare_deepspeed_config(acc, max_grad_norm=self.config.max_grad_norm)
        model, optimizer = acc.prepare(den, self.optimizer)
        self.model, self.optimizer = model, optimizer
        if self.sharding == "fsdp":
            if model is not den:
                raise RuntimeError("FSDP2 was expected to shard the denoiser in place")
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
            ref = getattr(self.sampler, "_reference_module", None)
            if ref is not None:
                self.sampler._reference_module = sharding.shard_like(acc, ref)

    def resync_weights(self) -> None:
        """Drop the gathered (unsharded) copies a sharded denoiser keeps between forward passes, so the
        next forward gathers the weights as they are now; call it after writing the weights outside the
        optimizer (EMA swaps, loading).  Nothing to do unless the run is sharded with FSDP2 or ZeRO-3."""
        if self._zero3:
            sharding.release_zero3_gathered(self.params)
            return
        if self.sharding != "fsdp":
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.sampler.denoiser.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def lockstep_count(self, n: int) -> int:
        """The largest ``n`` over processes (``n`` with one process): how many samples each process
        trains on when every process must take as many forward passes and optimizer steps as the others
        (gradients are reduced, and a sharded denoiser is gathered, in every one of them)."""
        if self.acc.num_processes == 1:
            return int(n)
        return int(self.acc.gather(torch.tensor([int(n)], device=self.acc.device)).max())

    def _lr_lambda(self, step: int) -> float:
        c = self.config
        per_iter = max(1, int(self.steps_per_iteration))
        warm = c.warmup_iterations * per_iter
        if warm and step < warm:
            return (step + 1) / warm
        if c.lr_schedule == "cosine":
            total = max(1, self.run.iterations * per_iter - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
        return 1.0

    def encode(self, prompts: list[str]):
        """Conditioning for ``prompts``, each prompt encoded once when ``run.cache_prompt_embeddings``
        (text encoders are frozen)."""
        from visalign.samplers import Conditioning

        if not self.run.cache_prompt_embeddings:
            with torch.no_grad():
                return self.sampler.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cond_cache))
        if missing:
            with torch.no_grad():
                cond = self.sampler.encode(missing)
            for j, p in enumerate(missing):
                self._cond_cache[p] = cond[j]
        return Conditioning.cat([self._cond_cache[p] for p in prompts])

    # ---- the optimizer step -----------------------------------------------------------------------
    def optimizer_step(self, losses: Callable[[], torch.Tensor | Iterable[torch.Tensor]]) -> OptimStep:
        """One guarded optimizer step.

        ``losses()`` returns a scalar loss or yields several (micro-batches, steps), each already
        scaled to its share of the step; each is back-propagated as it comes, so only one graph is
        alive at a time.  A non-finite loss or gradient norm skips the step (gradients dropped,
        counted); ``max_nan_steps`` skips in a row write a checkpoint and raise
        :class:`TrainingStopped`.  Otherwise: gradients averaged over processes, clipped to
        ``max_grad_norm``, AdamW step, LR schedule step, EMA update.

        With several processes the returned loss is the mean over processes, and a non-finite loss on
        one process skips the step on all of them (every process still runs each backward pass, since a
        sharded denoiser communicates in them).  Under FSDP2 the gradients are reduced by FSDP and
        clipped with ``accelerator.clip_grad_norm_``; under DeepSpeed its engine reduces, clips (to
        ``max_grad_norm``) and steps, and a non-finite gradient is DeepSpeed's to handle.  ZeRO-3
        back-propagates the step's losses in one pass (its engine does not add up the gradients of
        several passes before a step), so the graphs of a step's micro-batches are alive together.
        """
        multi = self.acc.num_processes > 1
        self._zero_grad()
        total, bad = 0.0, False
        pending = None  # ZeRO-3: the step's losses, back-propagated together
        out = losses()
        for loss in ([out] if isinstance(out, torch.Tensor) else out):
            if not torch.isfinite(loss.detach()):
                bad = True
                if not multi:
                    break
            if self._zero3:
                pending = loss if pending is None else pending + loss
            elif self.sharding == "deepspeed":
                self.model.backward(loss, scale_wrt_gas=False)
            elif self.sharding == "fsdp":
                self.acc.backward(loss)
            else:
                loss.backward()
            total += float(loss.detach())
        if pending is not None:
            self.model.backward(pending, scale_wrt_gas=False)
        if multi:  # one decision for every process; the loss of the step over all of them
            agreed = self.acc.reduce(torch.tensor([float(bad), total], device=self.acc.device), reduction="sum")
            bad, total = bool(agreed[0] > 0), float(agreed[1]) / self.acc.num_processes
        norm = float("nan")
        if not bad and self.sharding != "deepspeed":
            if self.sharding is None:
                self._all_reduce_grads()
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            else:
                norm = self.acc.clip_grad_norm_(self.params, self.config.max_grad_norm)
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            bad = not math.isfinite(norm)
        if bad:
            self._zero_grad()
            self.nan_steps += 1
            if self.nan_steps >= self.config.max_nan_steps:
                path = self.save_checkpoint()
                raise TrainingStopped(
                    f"{self.nan_steps} optimizer steps in a row had a NaN/inf loss or gradient (iteration "
                    f"{self.iteration + 1}); stopped with a checkpoint at {path}. Lower learning_rate, or check "
                    "the rewards and data for NaNs.")
            return OptimStep(float("nan"), float("nan"), True)
        self.nan_steps = 0
        if self.sharding == "deepspeed":
            self.model.step()
            norm = self.model.get_global_grad_norm()
            norm = float("nan") if norm is None else float(norm)
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return OptimStep(total, norm, False)

    def _zero_grad(self) -> None:
        if self.sharding == "deepspeed":  # the ZeRO optimizer holds the accumulated (partitioned) gradients
            self.model.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _all_reduce_grads(self) -> None:
        """Average gradients over processes (LoRA-sized, so one all-reduce per parameter is cheap)."""
        if self.acc.num_processes == 1:
            return
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.acc.reduce(g, reduction="mean")

    # ---- the adaptive reference -----------------------------------------------------------------
    def refresh_reference(self) -> None:
        """The reference becomes the current weights (``guards.reference_refresh_every``; GARDO, online
        DPO's ``ref_refresh_every``): ``Sampler.refresh_reference``, or in a sharded run a copy of each
        trained weight's part into the reference's (the frozen ``"reference"`` adapter, created before
        sharding, or the reference copy of full fine-tuning)."""
        if self.sharding is None:
            self.sampler.refresh_reference()
        else:
            self._refresh_sharded_reference()
        self.reference_refreshes += 1

    def _reference_pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``(trained weight, reference weight)`` pairs of a sharded run, each in its shards /
        partitions (what :func:`~.common.sharding.local` reads and writes)."""
        den = self.sampler.denoiser
        self.resync_weights()
        if getattr(den, "peft_config", None):
            tag, ref_tag = ".default.", f".{self.sampler.REFERENCE_ADAPTER}."
            named = dict(den.named_parameters())
            return [(p, named[n.replace(tag, ref_tag)]) for n, p in named.items() if "lora_" in n and tag in n]
        ref = self.sampler._reference_module
        if self.sharding == "fsdp":
            self._reshard_reference()
        live, frozen = list(den.named_parameters()), list(ref.named_parameters())
        if [n for n, _ in live] != [n for n, _ in frozen]:
            raise RuntimeError("the reference copy does not mirror the trained denoiser")
        return [(p, q) for (_, p), (_, q) in zip(live, frozen)]

    def _reshard_reference(self) -> None:
        """FSDP2 keeps the root module's weights gathered after a forward pass: put the reference copy
        back in its shards (before its parts are written, and after, so it gathers them anew)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.sampler._reference_module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def _refresh_sharded_reference(self) -> None:
        lora = bool(getattr(self.sampler.denoiser, "peft_config", None))
        pairs = self._reference_pairs()
        for p, q in pairs:
            if self._zero3 and not lora:  # the reference copy is whole on each process: gather the weight
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    q.copy_(p.data)
            else:  # both sharded alike (FSDP2, a ZeRO-3 adapter) or both whole (ZeRO-2)
                sharding.local(q).copy_(sharding.local(p))
        if self._zero3 and lora:
            sharding.release_zero3_gathered([q for _, q in pairs])

    def _reference_state(self):
        """The refreshed reference for checkpoints: a sharded run's adapter is in the model's state
        (``accelerator.save_state``); its reference copy of full fine-tuning is saved per process."""
        if not self.reference_refreshes:
            return None
        if self.sharding is None:
            return self.sampler.reference_state()
        if getattr(self.sampler.denoiser, "peft_config", None):
            return None
        return {"local": [sharding.local(q).detach().clone() for _, q in self._reference_pairs()]}

    @torch.no_grad()
    def _load_reference_state(self, state) -> None:
        if state is None:
            return
        if self.sharding is None:
            self.sampler.load_reference_state(state)
            return
        for (_, q), v in zip(self._reference_pairs(), state["local"], strict=True):
            sharding.local(q).copy_(v)

    # ---- one logged iteration ------------------------------------------------------------------
    def step(self) -> dict:
        """One iteration: the adaptive reference's refresh when due (``guards.reference_refresh_every``),
        the trained reward's refresh when due (``reward_refresh.every``), :meth:`train_step`, then
        ``iteration``, ``lr`` and wall time are added and the row is logged to ``metrics.jsonl`` (and
        the trackers)."""
        it = self.iteration
        t0 = time.perf_counter()
        every = self.guards.reference_refresh_every
        if every and it > 0 and it % every == 0:
            self.refresh_reference()
        rr = self.reward_refresh
        refreshed = rr.refresh(self, it) if rr is not None and rr.due(it) else {}
        row = {"iteration": it + 1, **self.train_step(it), **refreshed}
        if every:
            row["reference/refreshes"] = self.reference_refreshes
        if rr is not None:
            row.update(rr.metrics())
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["time/iteration"] = time.perf_counter() - t0
        self.train_seconds += row["time/iteration"]
        row["time/train_total"] = self.train_seconds
        self.iteration += 1
        self.metrics.log(row)
        return row

    # ---- guards ---------------------------------------------------------------------------------------
    def kl_weights(self, components: dict) -> torch.Tensor | None:
        """``(B,)`` per-sample weights of a KL / anchor term from a reward output's components:
        GARDO's gate on the reward's uncertainty (``guards.kl_gate_quantile``), or ``None`` (all 1)."""
        g = self.guards
        if g.kl_gate_quantile is None:
            return None
        u = uncertainty_of(components, g.uncertainty_component)
        if u is None:
            raise ValueError(f"guards.kl_gate_quantile needs a trained reward with an {g.uncertainty_component!r} "
                             f"component (a head ensemble from `visalign rewards train`, or shapes-proxy); the "
                             f"reward has {sorted(components)}. Set guards.kl_gate_quantile: null or change the reward")
        return kl_gate(u, g.kl_gate_quantile)

    # ---- evaluation ------------------------------------------------------------------------------
    def ema_weights(self):
        """Inside this block the EMA weights are live (when an EMA is kept and ``run.eval_with_ema``)."""
        if self.ema is not None and self.run.eval_with_ema:
            return self.ema.swapped()
        return contextlib.nullcontext()

    def evaluate(self) -> dict:
        """ODE samples of the held-out prompts scored by every eval reward; appended to ``eval.jsonl``
        with a grid of samples.  The same noise at every evaluation, so curves compare like with like."""
        if not self.eval_prompts or not self.eval_rewards:
            return {}
        from .common.evaluate import evaluate, save_grid

        guidance = self.run.eval_guidance_scale if self.run.eval_guidance_scale is not None else self.eval_guidance
        with self.ema_weights():
            metrics, images = evaluate(
                self.sampler, self.eval_prompts, self.eval_rewards, num_steps=self.run.eval_num_steps,
                guidance_scale=guidance, samples_per_prompt=self.run.eval_samples_per_prompt,
                seed=derive_seed(self.run.seed, 7) % (1 << 31), autocast=self.acc.autocast,
                keep_images=32 if self.run.save_sample_grid else 0, size=self.size,
            )
        metrics = {"iteration": self.iteration, **metrics}
        if self.reward_refresh is not None:  # the label budget spent by this evaluation (labels per point of gain)
            metrics.update(self.reward_refresh.metrics())
        if self.trained_reward_names:
            if self.alarm is None:
                self.alarm = HackingAlarm(self.trained_reward_names, self.guards.alarm_tolerance)
            metrics.update(self.alarm.update(metrics, list(self.eval_rewards)))
            if metrics.get("alarm/hacking") and self.acc.is_main_process:
                from tqdm.auto import tqdm

                held = ", ".join(f"{k.split('/')[1]} -{v:.3f}" for k, v in metrics.items()
                                 if k.endswith("/below_peak") and v > self.guards.alarm_tolerance)
                tqdm.write(f"{self.algorithm}: hacking alarm at iteration {self.iteration}: the trained reward rose "
                           f"while held-out rewards fell below their peak ({held})")
        if self.acc.is_main_process:
            from visalign.io import JsonlAppender

            with JsonlAppender(self.run_dir / "eval.jsonl") as w:
                w.write([metrics])
            if images is not None:
                save_grid(images, self.run_dir / "samples" / f"iter_{self.iteration:06d}.png")
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue as if it had not stopped (plain tensors and
        numbers).  Algorithms with state of their own extend it.  In a sharded run this is the
        process's own state (its EMA shards, its random state); the denoiser and the optimizer are
        saved by ``accelerator.save_state`` beside it."""
        weights = {} if self.sharding else {"trainable": [p.detach().cpu().clone() for p in self.params],
                                            "optimizer": self.optimizer.state_dict()}
        return {
            "iteration": self.iteration,
            **weights,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "nan_steps": self.nan_steps,
            "torch_rng": torch.get_rng_state(),
            "reference_refreshes": self.reference_refreshes,
            "reference": self._reference_state(),
            "alarm": self.alarm.state_dict() if self.alarm is not None else None,
            "train_seconds": self.train_seconds,
            "reward_refresh": self.reward_refresh.state_dict() if self.reward_refresh is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if "trainable" in state:  # not in a sharded run's (accelerator.load_state restores the weights)
            with torch.no_grad():
                for p, v in zip(self.params, state["trainable"]):
                    p.copy_(v.to(p.device, p.dtype))
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        self.nan_steps = int(state["nan_steps"])
        self.iteration = int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])
        self.reference_refreshes = int(state.get("reference_refreshes", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._load_reference_state(state.get("reference"))
        if state.get("alarm") is not None:
            self.alarm = HackingAlarm(self.trained_reward_names, self.guards.alarm_tolerance)
            self.alarm.load_state_dict(state["alarm"])
        if state.get("reward_refresh") is not None:
            if self.reward_refresh is None:
                raise ValueError("the checkpoint holds a refreshed reward head but this run has no reward_refresh "
                                 "section: resume with the recipe the run was started with")
            self.reward_refresh.load_state_dict(state["reward_refresh"])

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/iter_NNNNNN.pt`` (the main process), or in a sharded run the folder
        ``checkpoints/iter_NNNNNN/`` (every process: ``accelerator.save_state`` in ``accelerate/``
        and each process's own state in ``trainer_rankR.pt``, made complete before it takes its
        name); the newest ``run.keep_checkpoints`` are kept."""
        if self.sharding is not None:
            return self._save_sharded_checkpoint()
        if not self.acc.is_main_process:
            return None
        return save_checkpoint(self.run_dir, self.iteration, self.state_dict(), keep=self.run.keep_checkpoints)

    def _save_sharded_checkpoint(self) -> Path:
        acc = self.acc
        final = sharded_checkpoint_path(self.run_dir, self.iteration)
        partial = final.with_name(f".{final.name}.partial")
        if acc.is_main_process:
            final.parent.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a run that was killed while saving
                shutil.rmtree(partial)
        acc.wait_for_everyone()
        acc.save_state(str(partial / "accelerate"))
        state = self.state_dict()
        atomic_write(partial / f"trainer_rank{acc.process_index}.pt", lambda p: torch.save(state, p))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            prune_checkpoints(self.run_dir, self.run.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint of :meth:`save_checkpoint` (a file, or a sharded run's folder)."""
        if path.is_dir():
            if self.sharding is None:
                raise ValueError(f"{path} was written by a sharded run (FSDP2 / DeepSpeed): continue it with "
                                 "the accelerate config it was started with (accelerate launch --config_file ...)")
            ranks = sorted(path.glob("trainer_rank*.pt"))
            if len(ranks) != self.acc.num_processes:
                raise ValueError(f"{path} was written by {len(ranks)} processes and this run has "
                                 f"{self.acc.num_processes}: continue it with --num_processes {len(ranks)}")
            self.acc.load_state(str(path / "accelerate"))
            self.resync_weights()
            self.load_state_dict(load_checkpoint(path / f"trainer_rank{self.acc.process_index}.pt"))
            return
        if self.sharding is not None:
            raise ValueError(f"{path} was written by a run that was not sharded: continue it without the FSDP2 / "
                             "DeepSpeed accelerate config")
        self.load_state_dict(load_checkpoint(path))

    def resume(self, run_dir: str | Path | None = None) -> bool:
        """Continue from the newest checkpoint in ``run_dir``; False if there is none.  Metrics and
        evaluations logged after that checkpoint are dropped, so the history is not duplicated."""
        path = latest_checkpoint(run_dir or self.run_dir)
        if path is None:
            return False
        self._load_checkpoint(path)
        if self.acc.is_main_process:
            self.metrics.truncate_after(self.iteration)
            evals = [r for r in read_jsonl(self.run_dir / "eval.jsonl") if int(r["iteration"]) <= self.iteration]
            atomic_write_text(self.run_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))
        return True

    def export(self, iteration: int | None = None) -> Path:
        """Write the LoRA (EMA weights when kept) of a kept checkpoint, the newest by default, to
        ``run_dir/export/iter_NNNNNN`` in diffusers' format, like ``final/``; for evaluating an
        intermediate or interrupted run (``visalign toy eval --lora DIR``)."""
        if iteration is None:
            path = latest_checkpoint(self.run_dir)
        else:
            path = next((p for p in list_checkpoints(self.run_dir) if checkpoint_iteration(p) == iteration),
                        checkpoint_path(self.run_dir, iteration))
        if path is None or not path.exists():
            have = ", ".join(str(checkpoint_iteration(p)) for p in list_checkpoints(self.run_dir)) or "none"
            raise FileNotFoundError(f"no checkpoint {'' if iteration is None else f'for iteration {iteration} '}in "
                                    f"{self.run_dir / 'checkpoints'} (kept: {have}); run.keep_checkpoints sets how "
                                    "many are kept")
        self._load_checkpoint(path)
        return self.save_final(self.run_dir / "export" / path.stem)

    def save_final(self, out: str | Path | None = None) -> Path | None:
        """LoRA (EMA weights when kept) to ``out`` (default ``run_dir/final``) in diffusers' format;
        after full fine-tuning, the denoiser's weights as ``denoiser.safetensors``; with reward
        refresh, the refreshed reward head in ``reward_head/``.  In a sharded run every process calls
        it: the full weights are gathered (``accelerator.get_state_dict``) and the main process writes
        them, in the same layout."""
        gathered = None
        if self.sharding is not None:
            with self.ema_weights():
                gathered = self.acc.get_state_dict(self.model)
        if not self.acc.is_main_process:
            return None
        from visalign.samplers.lora import has_lora, save_lora

        out = self.run_dir / "final" if out is None else Path(out)
        with self.ema_weights() if gathered is None else contextlib.nullcontext():
            if has_lora(self.sampler):
                path = save_lora(self.sampler, out, state_dict=gathered)
            else:
                from safetensors.torch import save_file

                out.mkdir(parents=True, exist_ok=True)
                full = self.sampler.denoiser.state_dict() if gathered is None else gathered
                state = {k: v.contiguous().cpu() for k, v in full.items()}
                atomic_write(out / "denoiser.safetensors", lambda p: save_file(state, str(p)))
                path = out
        if self.reward_refresh is not None:  # the refreshed reward head, loadable as head:path=.../reward_head
            self.reward_refresh.save(out / "reward_head")
        return path

    # ---- the run loop ------------------------------------------------------------------------------
    @property
    def out_of_time(self) -> bool:
        """Whether ``run.max_minutes`` is set and the iterations so far have used it up."""
        return self.run.max_minutes is not None and self.train_seconds >= 60.0 * self.run.max_minutes

    def plot_keys(self, last: dict, final_eval: dict) -> tuple[list[str], list[str]]:
        """Training and evaluation metrics drawn in ``metrics.png``."""
        keys = [k for k in last if k.startswith("reward/") and k.endswith("/mean")]
        train = (["reward/mean"] if "reward/mean" in last else []) + [k for k in keys if k != "reward/mean"][:4]
        return train or ["loss"], [k for k in final_eval if k.startswith("eval/") and k.count("/") == 1]

    def train(self, iterations: int | None = None) -> dict:
        """Run to ``iterations`` (default ``run.iterations``), or until the iterations have taken
        ``run.max_minutes`` of wall-clock time (:attr:`out_of_time`; checked after each iteration, so
        the last one may run past the budget): evaluates at the start, every ``run.eval_every``
        iterations and at the end; checkpoints every ``run.checkpoint_every``; writes ``final/``,
        ``eval.json`` and ``metrics.png``.  May be called again (with a larger budget or more
        iterations) to continue.  Returns ``{"initial", "final", "iterations"}``."""
        from tqdm.auto import tqdm

        total = self.run.iterations if iterations is None else iterations
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            atomic_write_json(self.run_dir / "config.json", {**self.log_config, "algorithm": self.algorithm,
                                                             self.algorithm: asdict(self.config),
                                                             "run": asdict(self.run)})
        if self.acc.trackers == [] and self._available_trackers():
            self.acc.init_trackers("visalign")
        first_eval = self.evaluate() if self.iteration == 0 else {}
        bar = tqdm(total=total, initial=self.iteration, desc=self.algorithm or "train",
                   disable=not (self.run.progress and self.acc.is_main_process))
        last: dict = {}
        while self.iteration < total and not self.out_of_time:
            last = self.step()
            bar.update(1)
            bar.set_postfix({k.split("/")[-2] if k.endswith("/mean") else k: f"{last[k]:.3g}"
                             for k in self.progress_keys if isinstance(last.get(k), (int, float))})
            if (self.run.eval_every and self.iteration % self.run.eval_every == 0 and self.iteration < total
                    and not self.out_of_time):
                self.evaluate()
            if self.run.checkpoint_every and self.iteration % self.run.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        final_eval = self.evaluate()
        self.save_checkpoint()
        self.save_final()
        summary: dict = {}
        if self.acc.is_main_process:
            evals = read_jsonl(self.run_dir / "eval.jsonl")
            summary = {"initial": evals[0] if evals else first_eval, "final": final_eval, "iterations": self.iteration}
            atomic_write_json(self.run_dir / "eval.json", summary)
            train_keys, eval_keys = self.plot_keys(last, final_eval)
            plot_metrics(self.run_dir, train_keys, eval_keys, self.run_dir / "metrics.png")
        self.metrics.close()
        self.acc.end_training()
        return summary
