"""Wan text-to-video adapter (``WanPipeline``): Wan2.1 T2V, Wan2.2 T2V-A14B (two experts) and
Wan2.2 TI2V-5B (text-to-video); 5-D latents, UMT5 text encoder.

The Sampler's video latents are ``(B, F, C, H, W)`` (frames before channels, like the decoded
video); the Wan transformer and VAE take ``(B, C, F, H, W)``, so the adapter transposes around
them.  Noise is drawn in Wan's layout, so a seed gives the pipeline's noise.  The ODE sampler is
Euler on the flow-matching sigmas with Wan's ``flow_shift``; ``ode_scheduler()`` returns the
``FlowMatchEulerDiscreteScheduler`` that makes the pipeline do the same (Wan ships UniPC, a
multistep solver, which a single-step RL kernel cannot reproduce).

Wan2.2-T2V-A14B is a mixture of two experts (Wan 2.2 report, 2025): ``transformer`` denoises the
high-noise steps, model time ``t >= boundary_ratio * 1000``, and ``transformer_2`` the rest, each
with its own guidance scale (``guidance_scale_2`` for the low-noise expert; the pipeline's default
is the same scale for both).  Every prediction is routed by its time, per sample, so rollouts,
log-prob recomputation and training at sampled times all see the expert the pipeline would use.
Which experts train is the ``experts`` option (see :class:`WanSampler`).

Wan2.2-TI2V-5B (``expand_timesteps``) conditions on one timestep per latent token; for text-to-video
every token has the step's time, which is what the adapter passes.  Its VAE has 48 latent channels
and compresses 16x in space.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Sampler, Schedule
from ._common import flow_schedule, from_unit_range, module_dtype, randn, vae_encode

EXPERTS = ("both", "high", "low")


def _experts_module():
    """``WanExperts``: the two Wan2.2 experts as one module, so that LoRA, the reference model and
    full fine-tuning treat them as one denoiser (built lazily: diffusers is imported on use)."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.modeling_utils import ModelMixin

    class WanExperts(ModelMixin, PeftAdapterMixin):
        """The high-noise expert (``transformer``) and the low-noise expert (``transformer_2``) of
        Wan2.2-A14B, the same module objects the pipeline holds."""

        def __init__(self, transformer, transformer_2) -> None:
            super().__init__()
            self.transformer = transformer
            self.transformer_2 = transformer_2

        @property
        def dtype(self) -> torch.dtype:
            return self.transformer.dtype

    return WanExperts


class WanSampler(Sampler):
    """Wan2.1 / Wan2.2 text-to-video.

    Options (``vs.load(model, **options)``):
        max_sequence_length: UMT5 tokens (512).
        num_frames: default frame count, ``4k + 1`` (81; Wan2.2-TI2V-5B 121).
        experts: Wan2.2-A14B only, which experts the denoiser holds and training adapts:
            ``"both"`` (default; LoRA goes on both experts, the saved keys are ``transformer.transformer.*``
            and ``transformer.transformer_2.*``), ``"high"`` (``transformer``, the steps at
            ``t >= boundary_ratio * 1000``) or ``"low"`` (``transformer_2``).  The other expert then stays
            frozen and still denoises its steps; a LoRA of one expert is saved in diffusers' Wan layout
            (load a ``"low"`` one with ``pipe.load_lora_weights(dir, load_into_transformer_2=True)``).
        guidance_scale_2: Wan2.2-A14B only, the CFG scale of the low-noise expert's steps; ``None``
            (default) uses the rollout's ``guidance_scale`` for both, as the pipeline does.
    """

    family = "wan"
    lora_writer = "WanPipeline"
    parameterization = "flow"
    guidance = "cfg"
    cfg_batched = False  # the pipeline runs cond, then uncond, as two calls
    is_video = True
    default_steps = 50
    default_guidance = 5.0

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 512, num_frames: int | None = None,
                 experts: str = "both", guidance_scale_2: float | None = None) -> None:
        if pipe.transformer is None:
            raise ValueError(f"{name or 'model'}: a Wan pipeline without its (high-noise) transformer is not supported")
        ratio = pipe.config.get("boundary_ratio")
        two = pipe.transformer_2 is not None and ratio is not None
        if experts not in EXPERTS:
            raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
        if not two and (experts != "both" or guidance_scale_2 is not None):
            raise ValueError(f"{name or 'model'} has one transformer: the experts and guidance_scale_2 options are "
                             "for Wan2.2-A14B's two experts")
        if two and experts == "both":
            denoiser = _experts_module()(pipe.transformer, pipe.transformer_2)
        else:
            denoiser = pipe.transformer_2 if experts == "low" else pipe.transformer
        super().__init__(denoiser, pipeline=pipe, name=name)
        self.experts = experts if two else "high"
        #: model time at and above which the high-noise expert denoises (None: one transformer)
        self.boundary = float(ratio) * self.num_train_timesteps if two else None
        self.guidance_scale_2 = guidance_scale_2
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        self.max_sequence_length = max_sequence_length
        self.scale_spatial = pipe.vae_scale_factor_spatial
        self.scale_temporal = pipe.vae_scale_factor_temporal
        self.in_channels = pipe.transformer.config.in_channels
        if self.expand_timesteps:  # Wan2.2-TI2V-5B: 121 frames at 1280x704, 50 steps, CFG 5 (its model card)
            self.num_frames, self.size = num_frames or 121, (704, 1280)
        else:  # Wan2.1 and Wan2.2-A14B: 81 frames at 480x832; A14B 40 steps at CFG 4 (3 low-noise)
            self.num_frames, self.size = num_frames or 81, (480, 832)
            if two:
                self.default_steps, self.default_guidance = 40, 4.0

    def default_size(self) -> tuple[int, int]:
        return self.size

    def ode_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = self.pipeline.scheduler.config
        if type(self.pipeline.scheduler) is FlowMatchEulerDiscreteScheduler:
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        shift = cfg.get("flow_shift") or cfg.get("shift") or 1.0
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=shift)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, npe = self.pipeline.encode_prompt(
            prompt=list(prompts),
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return Conditioning({"encoder_hidden_states": pe}, {"encoder_hidden_states": npe}, list(prompts))

    def noise(self, n: int, generator=None, *, height=None, width=None, num_frames=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        frames = num_frames or self.num_frames
        if (frames - 1) % self.scale_temporal:
            raise ValueError(f"num_frames must be {self.scale_temporal}k + 1 for Wan, got {frames}")
        shape = (
            n,
            self.in_channels,
            (frames - 1) // self.scale_temporal + 1,
            (height or dh) // self.scale_spatial,
            (width or dw) // self.scale_spatial,
        )
        # Wan keeps its latents in float32 whatever the transformer's dtype.
        return randn(shape, generator, self.device, torch.float32).transpose(1, 2)  # (B, F, C, H, W)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        return flow_schedule(self.ode_scheduler(), num_steps, self.device)

    # ---- the model: one transformer, or the expert of each sample's time ----------------------------
    def _expert_modules(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """(high-noise, low-noise) transformers as they are now (the reference swaps the denoiser)."""
        d = self.denoiser
        if self.boundary is None:
            return d, None
        if self.experts == "both":
            return d.transformer, d.transformer_2
        if self.experts == "low":
            return self.pipeline.transformer, d
        return d, self.pipeline.transformer_2

    def _call(self, model, hidden: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        timestep = t
        if self.expand_timesteps:  # one time per latent token (patch 1x2x2), as the pipeline builds it
            tokens = hidden[0, 0, :, ::2, ::2].numel()
            timestep = t[:, None].expand(-1, tokens)
        return model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=ehs, return_dict=False)[0]

    def _model(self, x, t, cond, guidance_scale):
        hidden = x.transpose(1, 2).to(self.dtype)  # (B, C, F, H, W)
        t = t.expand(x.shape[0])
        ehs = cond["encoder_hidden_states"]
        high, low = self._expert_modules()
        if self.boundary is None:
            return self._call(high, hidden, t, ehs).transpose(1, 2)
        is_high = t >= self.boundary
        if bool(is_high.all()) or not bool(is_high.any()):
            model = high if bool(is_high.all()) else low
            return self._call(model, hidden, t, ehs).transpose(1, 2)
        out = torch.empty_like(hidden)  # a batch of training times on both sides of the boundary
        for model, rows in ((high, is_high), (low, ~is_high)):
            out[rows] = self._call(model, hidden[rows], t[rows], ehs[rows]).to(out.dtype)
        return out.transpose(1, 2)

    def _guide(self, pred_uncond, pred_text, guidance_scale, t):
        """CFG with the low-noise expert's own scale on its steps (``guidance_scale_2``)."""
        g = guidance_scale
        if self.boundary is not None and self.guidance_scale_2 is not None:
            t = t.expand(pred_text.shape[0]).to(pred_text.device)
            g = torch.where(t >= self.boundary, float(guidance_scale), float(self.guidance_scale_2))
            g = g.view(-1, *([1] * (pred_text.ndim - 1))).to(pred_text.dtype)
        return pred_uncond + g * (pred_text - pred_uncond)

    # ---- the VAE -------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipeline.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, h, w)`` latents -> video ``(B, F, 3, H, W)`` in ``[0, 1]``."""
        vae = self.pipeline.vae
        z = latents.transpose(1, 2).to(module_dtype(vae))  # (B, C, F, h, w)
        mean, std = self._latent_stats(z)
        video = vae.decode(z * std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
        return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Video ``(B, F, 3, H, W)`` in ``[0, 1]`` (``F = 4k + 1``) -> latents ``(B, (F - 1) / 4 + 1, C,
        h, w)``, ``(z - latents_mean) / latents_std``: the inverse of :meth:`decode`."""
        if images.ndim != 5:
            raise ValueError(f"Wan encodes videos (B, F, 3, H, W); got a tensor of shape {tuple(images.shape)}")
        frames = images.shape[1]
        if (frames - 1) % self.scale_temporal:
            raise ValueError(f"Wan encodes {self.scale_temporal}k + 1 frames; got {frames}: trim the videos to "
                             f"{(frames - 1) // self.scale_temporal * self.scale_temporal + 1} frames")
        z = vae_encode(self.pipeline.vae, from_unit_range(images).transpose(1, 2), generator)  # (B, C, F', h, w)
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).transpose(1, 2).to(self.device)
