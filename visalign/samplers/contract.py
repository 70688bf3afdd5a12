"""The Sampler contract: a generator seen as a chain of denoising steps (docs/samplers.md).

A rollout reads as ``for i in steps: pred = denoiser(x, i, schedule, cond); x = kernel(pred, x,
schedule, i)``.  Family adapters (``families/``) supply text encoding, the raw model call, initial
noise, decoding and their family facts (LoRA targets and weight prefix); everything else
(guidance, rollout, log-prob recomputation, the forward process, hooks, the reference model) is
written once here.

A *denoiser* is any callable ``denoiser(x, i, schedule, cond) -> prediction``.  Classifier-free
guidance is one (:class:`CFGDenoiser`, what ``rollout`` uses by default); reward guidance and
other steering terms wrap a denoiser in another, as k-diffusion wraps its denoisers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .kernels import get_kernel
from .types import (
    Conditioning,
    Denoiser,
    HookResult,
    HookState,
    RandomWindow,
    Schedule,
    StepOutput,
    Trajectory,
    resolve_sde_steps,
)

__all__ = [
    "Conditioning",
    "Schedule",
    "StepOutput",
    "Trajectory",
    "HookState",
    "HookResult",
    "RandomWindow",
    "Denoiser",
    "CFGDenoiser",
    "Sampler",
    "resolve_sde_steps",
]


# --------------------------------------------------------------------------------------------
# Denoisers: the prediction of one step, as a callable that can be wrapped
# --------------------------------------------------------------------------------------------


@dataclass
class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser:
    ``pred = uncond + g * (cond - uncond)``; with ``g <= 1``, no negative conditioning or a
    family without CFG (FLUX.1-dev's embedded guidance) it is the model's prediction alone.

    Args:
        sampler (`Sampler`): the model.
        guidance_scale (`float`): ``g``.
        detach_uncond (`bool`, *optional*, defaults to ``False``): stop the gradient through the
            unconditional branch, ``pred = sg(uncond) + g * (cond - sg(uncond))``: Flow-GRPO's
            reference does this when it recomputes log-probs for training, so only the
            conditional branch trains.  Values are unchanged; only gradients differ.
    """

    sampler: "Sampler"
    guidance_scale: float = 1.0
    detach_uncond: bool = False

    def __call__(self, x: torch.Tensor, i: int, schedule: Schedule, cond: Conditioning) -> torch.Tensor:
        t = schedule.timesteps[i].to(x.device)
        return self.sampler.predict(x, t, cond, self.guidance_scale, detach_uncond=self.detach_uncond)


def _call(denoiser: Callable, x: torch.Tensor, i: int, schedule: Schedule, cond: Conditioning,
          checkpoint: bool) -> torch.Tensor:
    """One denoiser call; under gradient checkpointing its activations are recomputed in backward."""
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as ckpt

        return ckpt(lambda inp: denoiser(inp, i, schedule, cond), x, use_reentrant=False)
    return denoiser(x, i, schedule, cond)


# --------------------------------------------------------------------------------------------
# The Sampler
# --------------------------------------------------------------------------------------------


class Sampler:
    """One loaded model exposed as a chain of denoising steps.

    Family adapters subclass this and implement ``encode``, ``noise``, ``schedule``,
    ``_model`` (one raw forward pass on a batch) and ``decode``.  ``guidance`` tells how
    ``guidance_scale`` acts: ``"cfg"`` (classifier-free guidance with the negative prompt),
    ``"embedded"`` (FLUX.1-dev's guidance embedding) or ``"none"``.

    Family facts used by training live here too: ``lora_targets`` (the module names LoRA adapts by
    default, after the reference implementations), ``lora_prefix`` (the component name diffusers'
    LoRA loaders use) and ``lora_writer`` (the diffusers pipeline class whose LoRA writer matches
    the family's loader).
    """

    family: str = ""
    parameterization: str = "flow"
    guidance: str = "cfg"
    #: whether CFG runs cond and uncond in one concatenated batch (as the pipeline does)
    cfg_batched: bool = True
    #: whether decode() returns video (B, F, 3, H, W)
    is_video: bool = False
    #: the model card's sampling defaults, used when the user gives none
    default_steps: int = 30
    default_guidance: float = 1.0
    #: LoRA defaults (see the class docstring)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_prefix: str = "transformer"
    lora_writer: str = ""

    def __init__(self, denoiser: torch.nn.Module, *, pipeline: Any = None, name: str = "") -> None:
        self.denoiser = denoiser
        self.pipeline = pipeline
        self.name = name
        self._reference_module: torch.nn.Module | None = None

    # ---- what an adapter provides -----------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        raise NotImplementedError

    def noise(self, n: int, generator=None, *, height: int | None = None, width: int | None = None, **kw) -> torch.Tensor:
        raise NotImplementedError

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        raise NotImplementedError

    def _model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], guidance_scale: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The inverse of :meth:`decode`: images ``(B, 3, H, W)`` (video ``(B, F, 3, H, W)``) in
        ``[0, 1]`` -> float32 latents in this Sampler's layout, on its device, ready for
        :meth:`add_noise` (the VAE's scaling / shift factors or latent statistics applied as the
        family's training scripts do).  VAE families return the posterior mean, or a draw from the
        posterior with ``generator``; ``toy-shapes`` is exact (space-to-depth of the pixels).
        What offline preference data (DPO) and supervised fine-tuning train on."""
        raise NotImplementedError

    # ---- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (diffusers' ``ModelMixin.dtype`` skips the modules a model
        keeps in float32, such as Wan's time embedder)."""
        dtype = getattr(self.denoiser, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.denoiser.parameters()).dtype

    def default_size(self) -> tuple[int, int]:
        """Default image height and width in pixels."""
        raise NotImplementedError

    # ---- predictions -------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0, *,
                detach_uncond: bool = False) -> torch.Tensor:
        """The model prediction at model time ``t`` (a scalar, or ``(B,)`` per sample), classifier-free
        guidance included (see :class:`CFGDenoiser`).  ``x`` is cast to the model's dtype; the
        caller chooses grad mode: nothing here disables autograd."""
        x = x.to(self.dtype)
        t = torch.as_tensor(t, device=x.device)
        g = float(guidance_scale)
        if self.guidance == "cfg" and g > 1.0 and cond.neg is not None:
            if self.cfg_batched:
                both = {k: torch.cat([cond.neg[k], cond.pos[k]]) for k in cond.pos}
                tt = torch.cat([t, t]) if t.ndim == 1 else t
                pred_uncond, pred_text = self._model(torch.cat([x, x]), tt, both, g).chunk(2)
            else:
                pred_text = self._model(x, t, cond.pos, g)
                pred_uncond = self._model(x, t, cond.neg, g)
            if detach_uncond:
                pred_uncond = pred_uncond.detach()
            return self._guide(pred_uncond, pred_text, g, t)
        return self._model(x, t, cond.pos, g)

    def _guide(self, pred_uncond: torch.Tensor, pred_text: torch.Tensor, guidance_scale: float,
               t: torch.Tensor) -> torch.Tensor:
        """Combine the two CFG branches at model time ``t``: ``uncond + g (text - uncond)`` (Ho &
        Salimans 2022); a family whose pipeline combines them otherwise overrides it."""
        return pred_uncond + guidance_scale * (pred_text - pred_uncond)

    def denoise(self, x: torch.Tensor, i: int, schedule: Schedule, cond: Conditioning, guidance_scale: float = 1.0,
                *, detach_uncond: bool = False) -> torch.Tensor:
        """The model prediction at step ``i``, classifier-free guidance included:
        ``CFGDenoiser(self, guidance_scale, detach_uncond)(x, i, schedule, cond)``."""
        return CFGDenoiser(self, guidance_scale, detach_uncond)(x, i, schedule, cond)

    # ---- the forward process (what DPO, NFT and supervised fine-tuning train on) ---------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipeline.scheduler.config.get("num_train_timesteps", 1000))

    def sample_times(self, n: int, generator: torch.Generator | None = None, *, distribution: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
        """``n`` training times: noise levels ``s`` in ``(0, 1)`` for flow models, integer DDPM
        timesteps in ``[0, num_train_timesteps)`` for eps / v models (uniform).

        ``distribution="logit_normal"`` (flow models): ``s = sigmoid(N(logit_mean, logit_std^2))``,
        SD3's training density (Esser et al. 2024, sec. 3.1)."""
        if self.parameterization == "flow":
            if distribution == "uniform":
                return torch.rand(n, generator=generator)
            if distribution == "logit_normal":
                return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
            raise ValueError(f"distribution must be uniform or logit_normal, got {distribution!r}")
        if distribution != "uniform":
            raise ValueError(f"{self.parameterization}-prediction models draw integer timesteps: distribution must "
                             f"be uniform, got {distribution!r}")
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ac = self.pipeline.scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)
        return ac[t.to(like.device).long()].view(-1, *([1] * (like.ndim - 1)))

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` of the forward process (float32) at training times ``t (B,)`` (see :meth:`sample_times`).

        Flow: ``x_s = (1 - s) x0 + s noise`` (rectified flow); eps / v: ``x_t = sqrt(ab_t) x0 +
        sqrt(1 - ab_t) noise`` (DDPM, Ho et al. 2020 eq. 4)."""
        x0, noise = x0.float(), noise.float()
        if self.parameterization == "flow":
            s = self._sigma(t, x0)
            return (1 - s) * x0 + s * noise
        ab = self._alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser should predict at ``add_noise(x0, noise, t)`` (float32): the velocity
        ``noise - x0`` (flow), ``noise`` (eps) or ``sqrt(ab_t) noise - sqrt(1 - ab_t) x0`` (v-prediction,
        Salimans & Ho 2022)."""
        x0, noise = x0.float(), noise.float()
        if self.parameterization == "flow":
            return noise - x0
        if self.parameterization == "eps":
            return noise
        ab = self._alpha_bar(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input for training times ``t``: ``1000 s`` for flow models (the
        schedules' ``timesteps``), the integer timestep itself for DDPM models."""
        if self.parameterization == "flow":
            return t.float() * self.num_train_timesteps
        return t.long()

    def predict_at(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0, *,
                   detach_uncond: bool = False) -> torch.Tensor:
        """The prediction at per-sample training times ``t (B,)`` (compare with :meth:`training_target`)."""
        return self.predict(x_t, self.model_time(t).to(x_t.device), cond, guidance_scale, detach_uncond=detach_uncond)

    # ---- generic machinery -------------------------------------------------------------------
    def _as_cond(self, prompts_or_cond, negative_prompts=None) -> Conditioning:
        if isinstance(prompts_or_cond, Conditioning):
            return prompts_or_cond
        if isinstance(prompts_or_cond, str):
            prompts_or_cond = [prompts_or_cond]
        return self.encode(list(prompts_or_cond), negative_prompts)

    def rollout(
        self,
        prompts_or_cond,
        *,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        kernel: str = "ode",
        kernel_options: dict[str, Any] | None = None,
        sde_steps="all",
        generator=None,
        latents: torch.Tensor | None = None,
        hooks: Sequence[Any] = (),
        record_x0: bool = False,
        record_means: bool = True,
        negative_prompts: Sequence[str] | None = None,
        denoiser: Callable | None = None,
        grad_steps: int | None = None,
        checkpoint: bool = False,
        height: int | None = None,
        width: int | None = None,
        **noise_kwargs,
    ) -> Trajectory:
        """One full generation, recorded step by step.

        Args:
            prompts_or_cond: a list of prompts or a :class:`Conditioning` from ``encode``.
            num_steps: denoising steps.
            guidance_scale: CFG scale (or the embedded guidance for FLUX.1-dev).
            kernel: ``"ode"``, ``"flow_sde"``, ``"flow_cps"`` or ``"ddim"``; steps outside
                ``sde_steps`` use ``"ode"``.
            kernel_options: e.g. ``{"noise_level": 0.7}`` or ``{"eta": 1.0}``.
            sde_steps: which steps are stochastic; see :func:`resolve_sde_steps`.
            generator: a ``torch.Generator`` (or a list, one per sample) for all randomness.
            latents: initial noise; drawn from ``generator`` when omitted.
            hooks: callables ``hook(HookState) -> None | Tensor | HookResult`` run after each
                step, or objects with ``after_step`` and/or ``on_prediction(state, pred)``.
            record_x0: also record the x0-prediction of every step.
            denoiser: the prediction of a step, ``denoiser(x, i, schedule, cond)``; defaults to
                ``CFGDenoiser(self, guidance_scale)``.  Wrap it to add guidance terms.
            grad_steps: ``None``: every step follows the caller's grad mode.  ``K``: only the
                last ``K`` steps carry gradients (DRaFT-K / AlignProp); the earlier steps run
                under ``torch.no_grad`` and the sample entering step ``N - K`` is detached.
            checkpoint: gradient checkpointing on each denoiser call that carries gradients
                (activations are recomputed in backward, so memory stays nearly flat in ``K``).
        """
        cond = self._as_cond(prompts_or_cond, negative_prompts)
        n = len(cond)
        if latents is None:
            latents = self.noise(n, generator, height=height, width=width, **noise_kwargs)
        # float32 from here on: the kernels score float32 samples and the trajectory keeps them
        latents = latents.to(device=self.device, dtype=torch.float32).contiguous()
        schedule = self.schedule(num_steps, latents)
        kernel_options = dict(kernel_options or {})
        sde_kernel = get_kernel(kernel, self.parameterization)
        ode_kernel = get_kernel("ode", self.parameterization)
        mask = resolve_sde_steps(sde_steps, num_steps, generator) if kernel != "ode" else torch.zeros(num_steps, dtype=torch.bool)
        denoiser = CFGDenoiser(self, guidance_scale) if denoiser is None else denoiser
        if grad_steps is not None and not 0 <= int(grad_steps) <= num_steps:
            raise ValueError(f"grad_steps must be in 0..num_steps ({num_steps}), got {grad_steps}")
        first_grad = 0 if grad_steps is None else num_steps - int(grad_steps)

        xs = [latents]
        log_probs = torch.zeros(n, num_steps, device=latents.device)
        stds = torch.zeros(num_steps)
        means: list[torch.Tensor] = []
        x0s: list[torch.Tensor] = []
        x = latents
        for i in range(num_steps):
            if i == first_grad and grad_steps is not None:
                x = x.detach()  # no gradient reaches the steps before the last K
            with contextlib.nullcontext() if i >= first_grad else torch.no_grad():
                pred = _call(denoiser, x, i, schedule, cond, checkpoint)
                for hook in hooks:
                    on_pred = getattr(hook, "on_prediction", None)
                    if on_pred is not None:
                        new = on_pred(HookState(self, i, x, None, schedule, cond, cond.prompts), pred)  # type: ignore[arg-type]
                        pred = pred if new is None else new
                if mask[i]:
                    out = sde_kernel(pred, x, schedule, i, generator=generator, **kernel_options)
                    if out.log_prob is None:  # the kernel is deterministic here (e.g. CPS's last step)
                        mask[i] = False
                    else:
                        log_probs[:, i] = out.log_prob
                else:
                    out = ode_kernel(pred, x, schedule, i)
            stds[i] = out.std.detach().float().cpu()
            x = out.prev_sample
            if record_means:
                means.append(out.mean)
            if record_x0:
                x0s.append(out.x0)
            for hook in hooks:
                after = hook if callable(hook) and not hasattr(hook, "after_step") else getattr(hook, "after_step", None)
                if after is None:
                    continue
                res = after(HookState(self, i, x, out, schedule, cond, cond.prompts))
                if isinstance(res, torch.Tensor):
                    res = HookResult(latents=res)
                if isinstance(res, HookResult):
                    if res.indices is not None:
                        idx = res.indices.to(latents.device)
                        xs = [h[idx] for h in xs]
                        means = [m[idx] for m in means]
                        x0s = [h[idx] for h in x0s]
                        log_probs = log_probs[idx]
                        cond = cond[idx.cpu()]
                        x = x[idx]
                    if res.latents is not None:
                        x = res.latents.float().contiguous()
            xs.append(x)
        return Trajectory(
            latents=torch.stack(xs, dim=1),
            log_probs=log_probs,
            means=torch.stack(means, dim=1) if record_means else None,
            stds=stds,
            sde_mask=mask,
            cond=cond,
            schedule=schedule,
            guidance_scale=guidance_scale,
            kernel=kernel,
            kernel_options=kernel_options,
            x0=torch.stack(x0s, dim=1) if record_x0 else None,
        )

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | None = None, *, detach_uncond: bool = False,
                 denoiser: Callable | None = None) -> StepOutput:
        """Recompute log-probs and means of stored transitions under the current weights.

        Uses the same kernel function that sampled them.  Returns a :class:`StepOutput` whose
        fields are stacked over ``steps`` on dim 1: ``log_prob (B, S)``, ``mean (B, S, ...)``,
        ``std (S,)``, ``kl_std (S,)``, ``prev_sample (B, S, ...)``.  Defaults to every stochastic
        step.  ``detach_uncond`` stops the gradient through the unconditional CFG branch (Flow-GRPO's
        training); ``denoiser`` replaces the default ``CFGDenoiser(self, traj.guidance_scale)``.
        """
        steps = traj.sde_steps if steps is None else [int(s) for s in steps]
        if not steps:
            raise ValueError("no steps to score: this trajectory has no stochastic steps (kernel='ode'?)")
        kernel = get_kernel(traj.kernel, self.parameterization)
        denoiser = CFGDenoiser(self, traj.guidance_scale, detach_uncond) if denoiser is None else denoiser
        outs = []
        for i in steps:
            if not bool(traj.sde_mask[i]):
                raise ValueError(f"step {i} was deterministic (ODE) in this rollout and has no log-prob")
            x = traj.latents[:, i]
            pred = denoiser(x, i, traj.schedule, traj.cond)
            outs.append(kernel(pred, x, traj.schedule, i, prev_sample=traj.latents[:, i + 1], **traj.kernel_options))
        return StepOutput(
            prev_sample=torch.stack([o.prev_sample for o in outs], 1),
            mean=torch.stack([o.mean for o in outs], 1),
            std=torch.stack([o.std for o in outs]),
            log_prob=torch.stack([o.log_prob for o in outs], 1),
            x0=torch.stack([o.x0 for o in outs], 1),
            kl_std=torch.stack([o.kl_std for o in outs]),
        )

    #: the peft adapter that holds a refreshed reference (see :meth:`refresh_reference`)
    REFERENCE_ADAPTER = "reference"

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run ``denoise`` with the frozen reference weights inside this block.

        With peft LoRA adapters on ``denoiser`` the adapters are disabled (no second model
        copy), or, after :meth:`refresh_reference`, the frozen ``"reference"`` adapter is the
        active one; after full fine-tuning a copy kept by :meth:`keep_reference_copy` (or the
        latest refresh) is swapped in.  The trainable weights are never written, so a graph built
        before the block stays valid.
        """
        peft = getattr(self.denoiser, "peft_config", None)
        if peft and self.REFERENCE_ADAPTER in peft:
            active = [a for a in self.denoiser.active_adapters() if a != self.REFERENCE_ADAPTER]
            self.denoiser.set_adapters([self.REFERENCE_ADAPTER])
            try:
                yield
            finally:
                self.denoiser.set_adapters(active)
        elif peft:
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
        elif self._reference_module is not None:
            trained, self.denoiser = self.denoiser, self._reference_module
            try:
                yield
            finally:
                self.denoiser = trained
        else:
            raise RuntimeError(
                "no reference model: add LoRA adapters to sampler.denoiser (peft) or call "
                "sampler.keep_reference_copy() before full fine-tuning"
            )

    def keep_reference_copy(self) -> None:
        """Keep a frozen copy of the current denoiser as the reference (full fine-tuning)."""
        import copy

        ref = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self._reference_module = ref

    def refresh_reference(self, adapter_name: str = "default") -> None:
        """Make the current weights the reference (an adaptive reference, GARDO / online DPO's
        refresh).  With LoRA the trained adapter's weights are copied into a frozen second adapter
        (``"reference"``), so the reference costs one more LoRA, not a model copy; after full
        fine-tuning the kept copy is replaced by a copy of the current denoiser."""
        peft = getattr(self.denoiser, "peft_config", None)
        if not peft:
            self.keep_reference_copy()
            return
        import copy

        name = self.REFERENCE_ADAPTER
        if name not in peft:
            import warnings

            active = list(self.denoiser.active_adapters())
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.simplefilter("ignore", UserWarning)
                self.denoiser.add_adapter(copy.deepcopy(peft[adapter_name]), adapter_name=name)
            self.denoiser.set_adapters(active)  # add_adapter activates the new one
        self.load_reference_state(self.reference_state(adapter_name))

    def reference_state(self, adapter_name: str | None = None) -> dict[str, torch.Tensor] | None:
        """The refreshed reference's weights (``None`` when the reference is the base): the
        ``"reference"`` adapter's, or those of ``adapter_name`` to copy them there; for checkpoints."""
        peft = getattr(self.denoiser, "peft_config", None)
        if peft:
            src = adapter_name or self.REFERENCE_ADAPTER
            if src not in peft:
                return None
            tag = f".{src}."
            return {n.replace(tag, "."): p.detach().clone() for n, p in self.denoiser.named_parameters()
                    if "lora_" in n and tag in n + "."}
        if self._reference_module is None:
            return None
        return {k: v.detach().clone() for k, v in self._reference_module.state_dict().items()}

    def load_reference_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore :meth:`reference_state` (strict: every key must match)."""
        if state is None:
            return
        peft = getattr(self.denoiser, "peft_config", None)
        if peft:
            if self.REFERENCE_ADAPTER not in peft:
                self.refresh_reference()
            tag = f".{self.REFERENCE_ADAPTER}."
            params = {n.replace(tag, "."): p for n, p in self.denoiser.named_parameters() if "lora_" in n and tag in n + "."}
            if set(params) != set(state):
                raise KeyError(f"reference state does not match the reference adapter: {sorted(set(params) ^ set(state))[:4]}")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k].to(p.device, p.dtype))
                    p.requires_grad_(False)
            return
        if self._reference_module is None:
            self.keep_reference_copy()
        self._reference_module.load_state_dict(state, strict=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], **rollout_kwargs) -> torch.Tensor:
        """Convenience entry point: ODE rollout + decode, images in ``[0, 1]``."""
        traj = self.rollout(list(prompts), record_means=False, **rollout_kwargs)
        return self.decode(traj.final)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, name={self.name!r}, parameterization={self.parameterization!r})"
